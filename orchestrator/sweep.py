"""The evaluation stages: reference (FID statistics of the data, or a published file) and sweep
(Ray Tune trials, one per sampler setting, calibrated or not), and the sweep tables.

A trial samples images with per-image seeds, measures them against the reference statistics and
writes its row under the results root by its content hash (plan.trial_hash). Without a search,
every trial of the grid samples num_images x seed_blocks images; finished trials are never run
again. With sweep.search, a trial grows: it samples seeds 0..n-1 of the first seed block rung by
rung (the same seeds in every trial: paired comparisons), keeps the float64 feature sums
(metrics.FeatureStats) and reports the first block's metric at each rung, with `images` as Tune's
time attribute, so ASHA can stop it early; promoted, it continues from its sums (no image is
generated twice) and at num_images finishes EDM's protocol (every seed block). Its rung records and
latest sums are kept by its hash, so a killed search, a lost node or an extended search replays
finished rungs to the scheduler instead of sampling them again. Trials read networks,
calibration tables and Inception weights through the results root or the inputs' URIs
(orchestrator.storage), the reference statistics from Ray's object store: nothing on the
driver's disk.
"""
import dataclasses
import functools
import io
import math
import os
import random
import tempfile
import time
import warnings

import ray
import torch
from ray import tune
from tqdm import tqdm

from orchestrator import results
from orchestrator.plan import TRIALS, load_data, trial_hash
from orchestrator.spec import (INTEGER_SETTINGS, cpus_gpus, describe_trial, is_range, sampler_kwargs, snapshot_key, stable_hash,
                               table_key)
from orchestrator.storage import fetch, stage_input
from tasks import calibration, checkpoints, data, metrics, samplers


def trial_row(trial):
    """The settings part of a trial's row in the sweep table."""
    return dict(label=describe_trial(trial), sampler=trial['sampler'], calibrated=trial['calibrated'],
                calibration_source=trial.get('calibration_source'), calibration_images=trial.get('calibration_images'),
                calibration_per_class=trial.get('calibration_per_class'), snapshot_kimg=trial.get('snapshot_kimg'),
                params=sampler_kwargs(trial))


def hash_of(trial, ctx):
    """A trial's content hash; under a search it covers the scheduler and its rungs too (a
    stopped trial's row is final for the same scheduler settings)."""
    schedule = ctx['search'] and dict(scheduler=ctx['search']['scheduler'], rungs=ctx['rungs'])
    return trial_hash(ctx['depends'], ctx['evaluate'], trial, schedule or None)


def row_key(h):
    return f'{TRIALS}/{h}.json'


def state_key(h):
    """A growing trial's rung records and latest feature sums (one set per trial, ~32 MiB)."""
    return f'{TRIALS}/{h}.state.pt'


def samples_key(h):
    """A trial's sample grid: its first SAMPLE_GRID images (seeds 0..), as measured."""
    return f'{TRIALS}/{h}.png'


SAMPLE_GRID = 64


def load_state(storage, h):
    """(rung records, FeatureStats or None, sample images) a trial kept, or ([], None, None)."""
    if not storage.exists(state_key(h)):
        return [], None, None
    s = torch.load(io.BytesIO(storage.read_bytes(state_key(h))), weights_only=True)
    return s['records'], metrics.FeatureStats.from_state(s['stats']), s.get('samples')


def save_state(storage, h, records, stats, samples):
    buffer = io.BytesIO()
    torch.save(dict(records=records, stats=stats.state(), samples=samples), buffer)
    storage.write_bytes(state_key(h), buffer.getvalue())
    save_samples(storage, h, samples)


def save_samples(storage, h, samples):
    """The grid of the samples kept so far (8 a row, small images enlarged), as a PNG."""
    if samples is not None and len(samples):
        upscale = max(1, 64 // samples.shape[-1])
        storage.write_file(samples_key(h), lambda path: data.save_image_grid(samples, path, nrow=8, upscale=upscale))


def tune_result(record, metric, new_images=0):
    """What Tune's scheduler and search algorithm see of a rung: `images` (the time attribute),
    the search metric (the first seed block's Frechet distance at that rung) and how many images
    were sampled for it in this run (0 when replayed)."""
    # timesteps_total: the step of Ray's MLflow callback (report.mlflow), images rather than reports.
    return dict(images=record['images'], timesteps_total=record['images'], **{metric: record[record['metric']]},
                new_images=new_images)


def grow(net, reference, extractor, trial, ctx, records, stats, report, save, device='cpu', samples=None, walk=None):
    """Measure `trial` rung by rung (ctx['rungs']): report(record, new_images) at each rung below
    num_images, after save(records, stats, samples) has kept what it measured. Rungs in `records`
    (an earlier run's) are reported again, not sampled; sampling continues from `stats`, the first
    seed block's feature sums over seeds 0..stats.n-1, and `samples`, its first SAMPLE_GRID images
    (uint8, the very images measured). At num_images the full protocol (metrics.evaluate with the
    measured first block) gives the row's metrics: returns (its result, the images sampled for the
    last rung and the other seed blocks, the samples). walk: the trial's samplers.step_summary,
    kept in each rung record (a stopped trial's row reads it there). ctx['stop_at'], a rung below
    num_images (synchronous halving's runs): the trial ends there, its state kept, and None is
    returned."""
    e, kwargs = ctx, dict(sampler_kwargs(trial), class_idx=ctx['class_idx'])
    keep = e['kid'] or e['precision_recall']
    stats = stats or metrics.FeatureStats(dim=getattr(extractor, 'dim', metrics.FEATURES), keep_features=keep)
    kept = [] if samples is None else [samples]

    def keep_samples(images):
        have = sum(len(x) for x in kept)
        if have < SAMPLE_GRID:
            kept.append(images[:SAMPLE_GRID - have].cpu())
    name, nfe = metrics.metric_name(extractor), None
    for n in e['rungs']:
        done = [r for r in records if r['images'] == n]
        if done:  # measured in an earlier run: the scheduler hears it again, nothing is sampled
            nfe = done[0]['nfe']
            report(done[0], 0)
            continue
        start, new = time.time(), n - stats.n
        more, nfe = metrics.sample_statistics(net, range(stats.n, n), extractor, trial['sampler'], e['batch_size'], device,
                                              keep_features=keep, on_images=keep_samples, **kwargs)
        stats.merge(more)
        value = metrics.frechet_distance(*stats.statistics(), reference['mu'], reference['sigma'])
        record = dict(images=n, metric=name, **{name: value}, nfe=nfe, **(walk or {}), seconds=time.time() - start)
        records.append(record)
        if n < e['num_images']:
            save(records, stats, torch.cat(kept))
            report(record, new)
            if n == e.get('stop_at'):
                return None
    result = metrics.evaluate(net, reference, extractor, e['num_images'], trial['sampler'], seed_blocks=e['seed_blocks'],
                              batch_size=e['batch_size'], device=device, kid=e['kid'], precision_recall=e['precision_recall'],
                              first_block=(stats, nfe, records[-1][name]), **kwargs)
    return result, new + (e['seed_blocks'] - 1) * e['num_images'], torch.cat(kept)


@functools.lru_cache(maxsize=1)
def _extractor(weights, device, batch_size):
    """The Inception network of a worker process, built once: Tune hands a finished trial's worker
    to the next trial (reuse_actors), which then skips a process start, the imports and seconds
    of building the network. weights: (URI, sha256) or None (the cached conversion)."""
    return metrics.InceptionFeatures(metrics.resolve_inception_weights(weights and fetch(*weights)), device=device,
                                     batch_size=batch_size)


def _trial(config, ctx):
    trial, start = config['trial'], time.time()
    storage, h, metric = ctx['storage'], hash_of(trial, ctx), ctx['metric']
    if storage.exists(row_key(h)):  # final: its rungs replayed to the scheduler (a search only; a grid skips it)
        for record in storage.read_json(row_key(h)).get('rungs', []):
            tune.report(tune_result(record, metric))
        return
    records, stats, samples = load_state(storage, h)
    device = 'cuda' if ray.get_gpu_ids() else 'cpu'
    model = ctx['snapshots'][snapshot_key(trial['snapshot_kimg'])]
    net = checkpoints.load_denoiser(fetch(model['network'], model.get('sha256')), model['format']).to(device)
    warnings.simplefilter('ignore', samplers.SigmaRangeClamped)  # the driver said it once, before the sweep
    walk = samplers.step_summary(trial['sampler'], net, **sampler_kwargs(trial))
    extractor = _extractor(ctx['inception_weights'], device, ctx['batch_size'])
    reference = ray.get(ctx['reference'])
    try:
        if trial['calibrated']:
            key = table_key(trial['snapshot_kimg'], trial['calibration_source'], trial['calibration_images'])
            table = calibration.CalibrationTable.load(fetch(ctx['tables'][key]))
            net = calibration.CalibratedDenoiser(net, table, interpolate=ctx['interpolate'], context=describe_trial(trial),
                                                 per_class=trial['calibration_per_class'])
        grown = grow(net, reference, extractor, trial, ctx, records, stats, device=device, samples=samples, walk=walk,
                     report=lambda record, new: tune.report(tune_result(record, metric, new)),
                     save=lambda *kept: save_state(storage, h, *kept))
        if grown is None:  # at the rung synchronous halving asked for; the driver decides what goes on
            return
        result, new, samples = grown
    except (samplers.NonFiniteSamples, calibration.CalibrationError) as e:
        # Deterministic (the same seeds give the same NaN; a table that does not fit stays so):
        # reported, not raised, so Tune does not retry it; the driver gives it an error row and the
        # run fails naming it. No row is kept.
        tune.report({'error': f'{type(e).__name__}: {e}', metric: math.nan})
        return
    row = dict(trial_row(trial), trial_hash=h, images=ctx['num_images'], stopped=False, rungs=records, **walk,
               images_generated=ctx['num_images'] * ctx['seed_blocks'],
               **{k: ([float(x) for x in v] if isinstance(v, list) else v) for k, v in result.items()},  # *_blocks: JSON
               device=device, wall_time=time.time() - start, reference_sha256=reference['sha256'], class_idx=ctx['class_idx'])
    # The row is kept before the last report (a scheduler may end the trial there) and as soon as
    # the trial ends, so a killed driver or a later run reuses it; the sums are no longer needed.
    save_samples(storage, h, samples)
    storage.write_json(row_key(h), row)
    storage.delete(state_key(h))
    tune.report(dict({k: v for k, v in row.items() if isinstance(v, (int, float, str))}, **tune_result(records[-1], metric, new)))


class _ProgressBar(tune.Callback):
    """Trials done / running / failed, the best metric so far among trials that reached
    num_images and (a search) how many trials reached each rung, as one tqdm bar on the driver;
    the same summary goes to run.json (record) for `orchestrator show`."""

    def __init__(self, total, reused, metric, num_images, record=None):
        self.bar = tqdm(total=total, initial=reused, unit='trial', desc='sweep')
        self.running, self.failed, self.new_images = set(), 0, 0
        self.metric, self.num_images, self.record = metric, num_images, record
        self.best, self.rungs = None, {}  # (value, label); images -> trials that reported it
        self.changed = time.monotonic()  # when a trial last started or ended (_Stalled reads it)
        self._show()

    def __getstate__(self):  # Tune saves its callbacks with the experiment state; a terminal is not state
        return dict(self.__dict__, bar=None)

    def _show(self):
        self.changed = time.monotonic()
        summary = dict(best=self.best and dict(label=self.best[1], **{self.metric: self.best[0]}),
                       rungs={str(k): v for k, v in sorted(self.rungs.items())}, trials_done=self.bar.n if self.bar is not None else None)
        if self.record is not None and summary != self.record.data.get('sweep'):  # run.json, for `orchestrator show`: when it changes
            self.record.update(sweep=summary)
        text = f'{len(self.running)} running, {self.failed} failed'
        if self.best:
            text += f', best {self.metric} {self.best[0]:.2f} (first seed block)'
        if len(self.rungs) > 1 or self.rungs and min(self.rungs) < self.num_images:
            text += ', rungs ' + ' '.join(f'{n}:{k}' for n, k in sorted(self.rungs.items()))
        if self.bar is not None:
            self.bar.set_postfix_str(text)

    def on_trial_start(self, iteration, trials, trial, **info):
        self.running.add(trial.trial_id)
        self._show()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.new_images += result.get('new_images', 0)
        if 'images' in result and result.get(self.metric) == result.get(self.metric):  # not NaN (a failed trial's)
            n, value = result['images'], result[self.metric]
            self.rungs[n] = self.rungs.get(n, 0) + 1
            if n == self.num_images and (self.best is None or value < self.best[0]):
                self.best = (value, describe_trial(trial.config['trial']))
            self._show()

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.running.discard(trial.trial_id)
        error = (trial.last_result or {}).get('error')
        if error:  # it reported its own (deterministic) failure
            self.failed += 1
            self._say(trial, f'failed, not retried (the same seeds would fail the same way): {error}')
        self._step()

    def on_trial_recover(self, iteration, trials, trial, **info):  # failed, to be retried: waiting again
        self.running.discard(trial.trial_id)
        self._say(trial, f'failed or lost its worker; retrying (failure {trial.num_failures})')
        self._show()

    def on_trial_error(self, iteration, trials, trial, **info):
        self.running.discard(trial.trial_id)
        self.failed += 1
        self._say(trial, f'failed {trial.num_failures} time(s); no retries left (its error: {trial.error_file})')
        self._step()

    def _say(self, trial, what):  # one line instead of Tune's traceback (which goes to the stage's ray.log)
        if self.bar is not None:
            self.bar.write(f'sweep: trial {describe_trial(trial.config["trial"])} {what}')

    def _step(self):
        if self.bar is not None:
            self.bar.update(1)
        self._show()

    def on_experiment_end(self, trials, **info):
        if self.bar is not None:
            self.bar.close()


class _Stalled(tune.Stopper):
    """Ends the sweep when no trial has run for `timeout` seconds although some wait: their
    resources went with a lost node. The waiting trials get no row; the stage fails naming them."""

    def __init__(self, progress, timeout):
        self.progress, self.timeout, self.stalled = progress, timeout, False

    def __call__(self, trial_id, result):
        return False

    def stop_all(self):
        idle = time.monotonic() - self.progress.changed
        self.stalled = self.stalled or bool(self.timeout) and not self.progress.running and idle > self.timeout
        return self.stalled


class OptunaSpace:
    """Tune's OptunaSearch define-by-run function over a sweep's search space (plan: sampler
    entries, calibrations, snapshots): which entry, then each of its ranges (suggest_float, or
    suggest_int for integer settings) and lists (categorical), which calibration and which
    snapshot (categorical). The whole trial config is returned as `trial`, as a grid's is. (A
    class, not a closure: Tune pickles its searcher with the experiment state.)"""

    def __init__(self, space):
        self.space = space

    def __call__(self, ot):
        entries, calibrations, snapshots = self.space['samplers'], self.space['calibrations'], self.space['snapshots']
        names = [calibration_name(c) for c in calibrations]
        i = ot.suggest_categorical('sampler', list(range(len(entries)))) if len(entries) > 1 else 0
        trial = {}
        for key, value in entries[i].items():
            name = key if len(entries) == 1 else f'{i}.{key}'  # each entry's parameters are its own
            if is_range(value):
                step = {'step': value['step']} if value.get('step') else {}
                suggest = ot.suggest_int if key in INTEGER_SETTINGS else ot.suggest_float
                trial[key] = suggest(name, value['low'], value['high'], log=value.get('log', False), **step)
            elif isinstance(value, list) and key != 'sampler':
                trial[key] = ot.suggest_categorical(name, value)
            else:
                trial[key] = value
        c = calibrations[names.index(ot.suggest_categorical('calibration', names))] if len(names) > 1 else calibrations[0]
        kimg = ot.suggest_categorical('snapshot_kimg', snapshots) if len(snapshots) > 1 else snapshots[0]
        return dict(trial=dict(trial, **c, snapshot_kimg=kimg))


def calibration_name(c):
    """A calibration choice as a search parameter: uncalibrated, or source/images[/per-class]."""
    if not c['calibrated']:
        return 'uncalibrated'
    return f'{c["calibration_source"]}/{c["calibration_images"]}' + ('/per-class' if c['calibration_per_class'] else '')


def run_sweep(context, resources, storage_path, trials=None, space=None, history_key=None, max_failures=1, verbose=False,
              log=print, stall_timeout=None, record=None, tracker=None):
    """Rows of the sweep table, one per trial, the labels of the trials that failed and the images
    the trials sampled in this run.
    trials: the grid (trial configs); space: a search space (plan) that context['search']'s
    algorithm proposes num_samples trials from, its proposals kept under history_key so that a
    re-run proposes them again first. Without a search, trials finished before (a row under
    <root>/.trials of context['storage']) are reused and the others run as one Tune grid; with one,
    every trial goes to Tune (finished rungs replayed to the scheduler, not sampled) in an order
    shuffled by context['seed']. The Tune experiment state goes under storage_path; each trial is
    retried up to max_failures times. A failed trial's row holds its error and no metrics; a
    trial the scheduler stopped gets its last rung's row (stopped: true). context: snapshots (the
    model stage's outputs: {snapshot_key: network URI, format, kimg}), tables ({table_key: URI}),
    interpolate, reference (ObjectRef of the statistics), storage, depends and evaluate (for
    trial hashes), search (the spec's, as a dict, or None), rungs, seed, metric, class_idx,
    num_images, seed_blocks, batch_size, kid, precision_recall, inception_weights ((URI, sha256)
    or None). stall_timeout: seconds with trials waiting and none running after which the sweep
    ends (its missing trials named). record: the run's results.RunRecord (the sweep's summary so
    far goes to run.json). tracker: tracking.Tracker (report.mlflow), or None."""
    storage, search = context['storage'], context['search']
    if search and search['scheduler'] == 'sha' and 'stop_at' not in context:
        return successive_halving(trials, context, lambda todo, n: run_sweep(
            dict(context, stop_at=n), resources, storage_path, trials=todo, max_failures=max_failures, verbose=verbose,
            log=log, stall_timeout=stall_timeout, record=record, tracker=tracker), log)
    rung = 'stop_at' in context  # one rung of synchronous halving: its driver says what runs and what was sampled
    if trials is not None:
        kept = [storage.exists(row_key(hash_of(t, context))) for t in trials]  # one lookup per trial (a request on a store)
        todo, finished = [t for t, row in zip(trials, kept) if search or not row], sum(kept)
        if not rung:
            log(f'sweep: {finished} of {len(trials)} trial(s) finished before and reused'
                + (' (their rungs replayed to the scheduler)' if search and finished else '') + f'; {len(trials) - finished} to run')
        if search and search['scheduler'] == 'asha':
            # Asynchronous halving promotes whatever reaches a rung first: a grid listed from worst to
            # best would cost nearly the whole grid. A fixed shuffle (the spec's seed) breaks that order.
            random.Random(context['seed']).shuffle(todo)
    errors, ran, sampled = {}, [], 0
    if trials is None or todo:
        # Tune's new console output prints its experiment box even at verbose=0; the classic one is silent.
        os.environ['RAY_AIR_NEW_OUTPUT'] = '1' if verbose else '0'
        # Ctrl-C stops the run (cli.main) as in every other stage, not only Tune's loop, which would
        # otherwise end the trials and return as if the sweep had finished.
        os.environ['TUNE_DISABLE_SIGINT_HANDLER'] = '1'
        callbacks, tune_config, param_space = [], {}, dict(trial=tune.grid_search(todo) if trials is not None else None)
        if search:
            scheduler = tune.schedulers.FIFOScheduler() if search['scheduler'] != 'asha' else tune.schedulers.ASHAScheduler(
                time_attr='images', max_t=context['num_images'], grace_period=search['min_images'],
                reduction_factor=search['reduction_factor'])
            tune_config = dict(metric=context['metric'], mode='min', scheduler=scheduler)
        if trials is None:
            import optuna
            from ray.tune.search.optuna import OptunaSearch
            optuna.logging.set_verbosity(optuna.logging.INFO if verbose else optuna.logging.WARNING)
            history = storage.read_json(history_key) if storage.exists(history_key) else []
            points = history[:search['num_samples']]
            log(f'sweep: {search["algorithm"]} proposes {search["num_samples"]} trial(s)'
                + (f', first the {len(points)} of the earlier run (their finished rungs replayed)' if points else ''))
            tune_config.update(num_samples=search['num_samples'], search_alg=OptunaSearch(
                space=OptunaSpace(space), metric=context['metric'], mode='min', seed=context['seed'],
                points_to_evaluate=points or None))
            callbacks.append(_History(storage, history_key, history))
            param_space = {}
        total = len(trials) if trials is not None else search['num_samples']
        progress = _ProgressBar(total, total - len(todo) if trials is not None and not search else 0, context['metric'],
                                context['num_images'], record)
        stalled = _Stalled(progress, stall_timeout)
        callbacks.append(progress)
        tracked = tracker and tracker.trial_callback(functools.partial(  # picklable, as Tune keeps its callbacks
            hash_of, ctx={k: context[k] for k in ('depends', 'evaluate', 'search', 'rungs')}))
        callbacks += [tracked] if tracked else []
        tuner = tune.Tuner(
            tune.with_resources(tune.with_parameters(_trial, ctx=context), {k: v for k, v in resources.items() if v}),
            param_space=param_space, tune_config=tune.TuneConfig(reuse_actors=True, **tune_config),
            # Tune's own tables only with verbose; each trial's output goes to files in its folder.
            run_config=tune.RunConfig(name=f'sweep-{time.strftime("%Y%m%d-%H%M%S")}', verbose=1 if verbose else 0,
                                      storage_path=storage_path, log_to_file=True,
                                      failure_config=tune.FailureConfig(max_failures=max_failures),
                                      callbacks=callbacks, stop=stalled))
        for result in tuner.fit():
            if not result.config:  # never started (the sweep stalled first): named below
                continue
            trial = result.config['trial']
            h = hash_of(trial, context)
            ran.append((h, trial))
            if result.error is not None:
                text = str(result.error).strip().splitlines()
                errors[h] = f'{type(result.error).__name__}: {text[-1] if text else ""}'
            elif (result.metrics or {}).get('error'):  # a trial that reported its own failure (not retried)
                errors[h] = result.metrics['error']
            elif not storage.exists(row_key(h)) and (result.metrics or {}).get('images', 0) < context['num_images'] \
                    and 'stop_at' not in context:
                stop_trial(storage, h, trial)  # ended by the scheduler below num_images
        if stalled.stalled:
            ask = ', '.join(f'{v:g} {k.upper()}' for k, v in resources.items())
            log(f'sweep: no progress for {stall_timeout:g} s: trials wait for a worker ({ask} each); the cluster has '
                f'{cpus_gpus(ray.available_resources())} free of {cpus_gpus(ray.cluster_resources())}; the sweep stopped')
            for t in todo if trials is not None else ():  # (an algorithm's unproposed trials have no name)
                errors.setdefault(hash_of(t, context), f'not run: no resources for {stall_timeout:g} s')
        for h, run_id in (tracked.runs.items() if tracked else ()):  # each trial's sample grid, to its MLflow run
            if storage.exists(samples_key(h)):
                tracker.log_artifact(run_id, storage, samples_key(h), 'samples')
        stopped = sum(storage.exists(row_key(h)) and storage.read_json(row_key(h)).get('stopped') for h in dict(ran))
        sampled = progress.new_images
        if not rung:
            log(f'sweep: {sampled} image(s) sampled in this run'
                + (f'; {stopped} of {len(dict(ran))} trial(s) stopped early by {search["scheduler"].upper()}' if search else ''))
    listed = [(hash_of(t, context), t) for t in trials] if trials is not None else list(dict(ran).items())
    rows = []
    for h, trial in dict(listed).items():
        if storage.exists(row_key(h)):
            rows.append(storage.read_json(row_key(h)))
        else:
            rows.append(dict(trial_row(trial), trial_hash=h, error=errors.get(h, 'did not report (its worker was lost)')))
    return rows, [r['label'] for r in rows if r.get('error')], sampled


def halving(reached, rungs, reduction_factor):
    """Synchronous successive halving as a pure function of what the trials measured: reached is
    {trial hash: {rung (images): the rung's metric value}}, NaN where a trial failed. Every trial
    runs the first rung; once every trial in at rung k has its value there, the best
    ceil(n_k / reduction_factor) of them go on to rung k + 1 (NaN ranks last, never compared;
    ties go to the smaller hash). Returns the trials in at each rung (hashes in order), as far as
    the values decide: the last list is that of the rung being measured, or of num_images."""
    inside, out = sorted(reached), []
    for k, n in enumerate(rungs):
        out.append(inside)
        if k == len(rungs) - 1 or any(n not in reached[h] for h in inside):
            break
        rank = {h: (math.isnan(reached[h][n]), 0.0 if math.isnan(reached[h][n]) else reached[h][n], h) for h in inside}
        inside = sorted(sorted(inside, key=rank.get)[:math.ceil(len(inside) / reduction_factor - 1e-9)])
    return out


def _reached(storage, h):
    """{rung: metric value} of the rungs a trial has measured: its row's, else its kept state's."""
    records = storage.read_json(row_key(h)).get('rungs') or [] if storage.exists(row_key(h)) else load_state(storage, h)[0]
    return {r['images']: r[r['metric']] for r in records}


def successive_halving(trials, context, run_rung, log):
    """sweep.search.scheduler: sha. A loop on the driver: the rung halving() says is being
    measured runs as one Tune grid (run_rung(trials, rung) -> run_sweep's (rows, failed, sampled)) over its
    trials that have not measured it, each growing from its kept sums to that rung and stopping
    there; then the next cut. A failed trial counts NaN from then on. Every decision reads the
    kept rung records only, so a driver killed at any point makes the same promotions on re-run.
    Trials cut before num_images get their last rung's row (stopped: true). Returns run_sweep's
    (rows, failed labels, images sampled)."""
    storage, rungs = context['storage'], context['rungs']
    by_hash = {hash_of(t, context): t for t in trials}
    finished = sum(storage.exists(row_key(h)) for h in by_hash)
    log(f'sweep: {finished} of {len(by_hash)} trial(s) finished before and reused; the kept rungs of the others are read, '
        'not sampled again')
    errors, sampled = {}, 0
    while True:
        reached = {h: _reached(storage, h) for h in by_hash}
        for h in errors:  # failed: NaN at every rung it has not measured
            reached[h] = {n: reached[h].get(n, math.nan) for n in rungs}
        inside = halving(reached, rungs, context['search']['reduction_factor'])
        k, n = len(inside) - 1, rungs[len(inside) - 1]
        todo = [by_hash[h] for h in inside[-1] if n not in reached[h]]
        if not todo:
            break
        log(f'sweep: SHA rung {k + 1} of {len(rungs)} ({n} images): {len(inside[-1])} trial(s) in, {len(todo)} to measure')
        rows, _, more = run_rung(todo, n)
        sampled += more
        # A trial that ended at the rung as asked has no row yet; one that did not measure it failed.
        errors.update({r['trial_hash']: r['error'] for r in rows if r.get('error') and n not in _reached(storage, r['trial_hash'])})
    for h, trial in by_hash.items():
        if h not in inside[-1] and h not in errors and not storage.exists(row_key(h)):
            stop_trial(storage, h, trial)
    stopped = sum(h not in inside[-1] for h in by_hash)
    log(f'sweep: {sampled} image(s) sampled in this run; {stopped} of {len(by_hash)} trial(s) stopped early by SHA')
    rows = [storage.read_json(row_key(h)) if storage.exists(row_key(h)) and h not in errors
            else dict(trial_row(t), trial_hash=h, error=errors.get(h, 'did not report (its worker was lost)'))
            for h, t in by_hash.items()]
    return rows, [r['label'] for r in rows if r.get('error')], sampled


def stop_trial(storage, h, trial):
    """The final row of a trial the scheduler stopped: its last rung's first-block metric, with
    `images` that rung's count and stopped: true. Its feature sums are no longer needed."""
    records, _, _ = load_state(storage, h)
    if not records:
        return
    last = records[-1]
    storage.write_json(row_key(h), dict(trial_row(trial), trial_hash=h, images=last['images'], stopped=True, rungs=records,
                                        images_generated=last['images'],
                                        **{last['metric']: last[last['metric']]}, nfe=last['nfe'], num_samples=last['images'],
                                        **{k: last[k] for k in ('distinct_steps', 'sigma_end') if k in last},
                                        seed_blocks=1, wall_time=sum(r['seconds'] for r in records)))
    storage.delete(state_key(h))


class _History(tune.Callback):
    """Keeps the search algorithm's proposals (their parameters, in order) under the results
    root as trials start, so a re-run of the search gives them to the algorithm first."""

    def __init__(self, storage, key, earlier):
        self.storage, self.key, self.earlier, self.started = storage, key, list(earlier), []

    def on_trial_start(self, iteration, trials, trial, **info):
        self.started.append({k: v for k, v in trial.config.items() if k != 'trial'})
        self.storage.write_json(self.key, self.earlier + self.started[len(self.earlier):])


def run_reference_stage(stage, upstream, dataset, opts):
    """FID statistics of the reference images (Inception features, on the driver), or the
    published statistics file the spec names. Outputs: the statistics file's URI (or path) under
    the stage's storage, its sha256, count and the weights' sha256."""
    storage = stage.storage
    if 'stats_sha256' in stage.inputs:
        path = stage.options['path']
        stats = metrics.load_reference_statistics(fetch(path, stage.inputs['stats_sha256']))
        opts.log(f'reference: published statistics {path} (sha256 {stats["sha256"][:16]}...)')
        return dict(stats=stage_input(storage, path, stats['sha256']), count=stats['count'], sha256=stats['sha256'],
                    weights_sha256=None)
    ref = load_data(stage.inputs['data'], stage.options['data_root'])
    weights = stage.options['inception_weights']
    extractor = metrics.InceptionFeatures(metrics.resolve_inception_weights(weights and fetch(weights, stage.inputs['weights'])),
                                          batch_size=stage.options['batch_size'],
                                          device='cuda' if torch.cuda.is_available() else 'cpu')
    opts.log(f'reference: features of {len(ref)} {ref.name} {stage.inputs["data"]["split"]} images ({extractor.weights.source})')
    with tempfile.TemporaryDirectory(prefix='calib-edm-') as tmp:
        # KID and precision/recall compare features, not mean and covariance.
        stats = metrics.reference_statistics(ref, extractor, cache_dir=tmp, keep_features=stage.inputs['features'],
                                             progress=True)
        name = os.path.basename(stats['cache'])
        uri = storage.write_file(f'{stage.key}/{name}', lambda path: os.replace(stats['cache'], path))
    return dict(stats=uri, count=stats['count'], weights_sha256=stats['weights_sha256'])


def run_sweep_stage(stage, upstream, dataset, opts):
    e = dict(stage.inputs['evaluate'], batch_size=stage.options['batch_size'])
    reference = metrics.load_reference_statistics(fetch(upstream['reference']['stats']), features=e['kid'] or e['precision_recall'])
    weights, search = stage.options['inception_weights'], stage.inputs.get('search')
    context = dict(snapshots=(upstream.get('train') or upstream['checkpoint'])['snapshots'],
                   tables=upstream.get('calibrate', {}).get('tables', {}), interpolate=stage.inputs['interpolate'],
                   reference=ray.put(reference), storage=stage.storage, depends=stage.depends, evaluate=stage.inputs['evaluate'],
                   search=search, rungs=stage.inputs.get('rungs') or [e['num_images']], seed=stage.inputs.get('seed', 0),
                   metric=search['metric'] if search else 'fid',
                   inception_weights=weights and (stage_input(stage.storage, weights, e['inception_weights']), e['inception_weights']),
                   **{k: e[k] for k in ('class_idx', 'num_images', 'seed_blocks', 'batch_size', 'kid', 'precision_recall')})
    space = stage.inputs.get('space')
    # An algorithm's proposals are kept by what they depend on, not by num_samples: a larger search reuses them.
    history = space and f'{TRIALS}/search-{stable_hash(dict(space=space, search=dict(search, num_samples=None), depends=stage.depends, evaluate=stage.inputs["evaluate"]))}.json'
    rows, failed, _ = run_sweep(context, stage.options['trial_resources'], stage.storage.uri(stage.key, 'ray'),
                             trials=stage.inputs['trials'], space=space, history_key=history,
                             max_failures=stage.options['max_failures'], verbose=opts.verbose, log=opts.log,
                             stall_timeout=opts.stall_timeout, record=opts.record, tracker=opts.tracker)
    generated, grid = sum(images_generated(r) for r in rows), len(rows) * e['num_images'] * e['seed_blocks']
    opts.log(f'sweep: the {len(rows)} trial(s) generated {generated} image(s), {100 * generated / grid:.1f}% of the grid\'s '
             f'{grid} (trials x num_images x seed_blocks; failed trials count 0)')
    if opts.record is not None:  # run.json, for `orchestrator show`
        opts.record.update(sweep=dict(opts.record.data.get('sweep') or {}, images_generated=generated, grid_images=grid))
    uri = stage.storage.write_json(f'{stage.key}/rows.json', rows)
    return dict(rows=uri, trials=len(rows), failed=failed)


def images_generated(row):
    """Every image a trial sampled: its row's count (a reused row keeps it), else, for rows kept
    before the column existed, its stopping rung or num_samples x seed_blocks. 0 for a failed
    trial (what it sampled before failing is not kept)."""
    if row.get('error'):
        return 0
    if 'images_generated' in row:
        return row['images_generated']
    return row['images'] if row.get('stopped') else row['num_samples'] * row['seed_blocks']


def write_sweep_table(spec, stage, outputs, prov):
    """sweep.parquet (a row per trial), rungs.parquet (a row per trial and rung it reported) and
    samples/<trial_hash>.png (each trial's sample grid, named in the `samples` column)."""
    storage, rows = stage.storage, stage.storage.read_json(f'{stage.key}/rows.json')
    for r in rows:  # each trial's sample grid, beside the tables (a trial may be another experiment's: copied)
        if not r.get('error'):
            r['images_generated'] = images_generated(r)
        if storage.exists(samples_key(r['trial_hash'])):
            r['samples'] = f'samples/{r["trial_hash"]}.png'
            storage.write_bytes(f'{spec.experiment}/{r["samples"]}', storage.read_bytes(samples_key(r['trial_hash'])))
    results.write_table(stage.storage, spec.experiment, 'sweep',
                        [dict(r, evaluate=dataclasses.asdict(spec.evaluate)) for r in rows], prov)
    rungs = [dict(trial_hash=r['trial_hash'], label=r['label'], rung=i, images=record['images'],
                  **{record['metric']: record[record['metric']]}, nfe=record['nfe'], seconds=record['seconds'])
             for r in rows for i, record in enumerate(r.get('rungs') or [])]
    results.write_table(stage.storage, spec.experiment, 'rungs', rungs, prov)
