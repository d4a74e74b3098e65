"""The evaluation stages: reference (FID statistics of the data, or a published file) and sweep
(a Ray Tune grid with one trial per sampler setting, calibrated or not), and the sweep table.

Each trial samples num_images images with per-image seeds, measures them against the reference
statistics with tasks.metrics.evaluate, writes its row under the results root by its content
hash (plan.trial_hashes) and reports it through ray.tune.report. Finished trials are never run
again: a re-run after a crash, a pre-emption, a failed trial or an extended sweep runs only the
trials that have no row. Trials read networks, calibration tables and Inception weights through
the results root or the inputs' URIs (orchestrator.storage), the reference statistics from Ray's
object store, and write their rows to the root: nothing on the driver's disk.
"""
import dataclasses
import os
import tempfile
import time

import ray
import torch
from ray import tune
from tqdm import tqdm

from orchestrator import results
from orchestrator.plan import TRIALS, load_data, trial_hashes
from orchestrator.spec import cpus_gpus, describe_trial, sampler_kwargs, snapshot_key, table_key
from orchestrator.storage import fetch, stage_input
from tasks import calibration, checkpoints, metrics, samplers


def trial_row(trial):
    """The settings part of a trial's row in the sweep table."""
    return dict(label=describe_trial(trial), sampler=trial['sampler'], calibrated=trial['calibrated'],
                calibration_source=trial.get('calibration_source'), calibration_images=trial.get('calibration_images'),
                calibration_per_class=trial.get('calibration_per_class'), snapshot_kimg=trial.get('snapshot_kimg'),
                params=sampler_kwargs(trial))


def _trial(config):
    item, ctx = config['item'], config['context']
    trial = item['trial']
    start = time.time()
    device = 'cuda' if ray.get_gpu_ids() else 'cpu'
    model = ctx['snapshots'][snapshot_key(trial['snapshot_kimg'])]
    net = checkpoints.load_denoiser(fetch(model['network'], model.get('sha256')), model['format']).to(device)
    weights = metrics.resolve_inception_weights(ctx['inception_weights'] and fetch(*ctx['inception_weights']))
    extractor = metrics.InceptionFeatures(weights, device=device, batch_size=ctx['batch_size'])
    reference = ray.get(ctx['reference'])
    try:
        if trial['calibrated']:
            key = table_key(trial['snapshot_kimg'], trial['calibration_source'], trial['calibration_images'])
            table = calibration.CalibrationTable.load(fetch(ctx['tables'][key]))
            net = calibration.CalibratedDenoiser(net, table, interpolate=ctx['interpolate'], context=describe_trial(trial),
                                                 per_class=trial['calibration_per_class'])
        result = metrics.evaluate(net, reference, extractor, ctx['num_images'], trial['sampler'], seed_blocks=ctx['seed_blocks'],
                                  batch_size=ctx['batch_size'], device=device, kid=ctx['kid'],
                                  precision_recall=ctx['precision_recall'], class_idx=ctx['class_idx'], **sampler_kwargs(trial))
    except (samplers.NonFiniteSamples, calibration.CalibrationError) as e:
        # Deterministic (the same seeds give the same NaN; a table that does not fit stays so):
        # reported, not raised, so Tune does not retry it; the driver gives it an error row and the
        # run fails naming it. No row is kept.
        tune.report(dict(error=f'{type(e).__name__}: {e}'))
        return
    row = dict(trial_row(trial), trial_hash=item['hash'],
               **{k: ([float(x) for x in v] if isinstance(v, list) else v) for k, v in result.items()},  # *_blocks: JSON
               device=device, wall_time=time.time() - start, reference_sha256=reference['sha256'], class_idx=ctx['class_idx'])
    # The row is kept as soon as the trial ends, so a killed driver or a later run reuses it.
    ctx['storage'].write_json(f'{TRIALS}/{item["hash"]}.json', row)
    tune.report({k: v for k, v in row.items() if isinstance(v, (int, float, str))})


class _ProgressBar(tune.Callback):
    """Trials done / running / failed, as one tqdm bar on the driver."""

    def __init__(self, total, reused):
        self.bar = tqdm(total=total, initial=reused, unit='trial', desc='sweep')
        self.running, self.failed = set(), 0
        self.changed = time.monotonic()  # when a trial last started or ended (_Stalled reads it)
        self._show()

    def __getstate__(self):  # Tune saves its callbacks with the experiment state; a terminal is not state
        return dict(self.__dict__, bar=None)

    def _show(self):
        self.changed = time.monotonic()
        if self.bar is not None:
            self.bar.set_postfix_str(f'{len(self.running)} running, {self.failed} failed')

    def on_trial_start(self, iteration, trials, trial, **info):
        self.running.add(trial.trial_id)
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
            self.bar.write(f'sweep: trial {describe_trial(trial.config["item"]["trial"])} {what}')

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


def run_sweep(trials, hashes, context, resources, storage_path, max_failures=1, verbose=False, log=print, stall_timeout=None):
    """Rows of the sweep table, one per entry of `trials` (with content hashes `hashes`), and
    the labels of the trials that failed. Trials finished before (a row under <root>/.trials of
    context['storage']) are reused; the others run as one Tune grid (its experiment state under
    storage_path), each retried up to max_failures times. A failed trial's row holds its error
    and no metrics. context: snapshots (the model stage's outputs: {snapshot_key: network URI,
    format, kimg}), tables ({table_key: URI}), interpolate, reference (ObjectRef of the
    statistics), storage, class_idx, num_images, seed_blocks, batch_size, kid, precision_recall,
    inception_weights ((URI, sha256) or None). stall_timeout: seconds with trials waiting and none
    running after which the sweep ends (its missing trials named)."""
    storage = context['storage']
    row_key = lambda h: f'{TRIALS}/{h}.json'
    todo = [dict(hash=h, trial=t) for h, t in zip(hashes, trials) if not storage.exists(row_key(h))]
    log(f'sweep: {len(trials) - len(todo)} of {len(trials)} trial(s) finished before and reused; {len(todo)} to run')
    errors = {}
    if todo:
        # Tune's new console output prints its experiment box even at verbose=0; the classic one is silent.
        os.environ['RAY_AIR_NEW_OUTPUT'] = '1' if verbose else '0'
        # Ctrl-C stops the run (cli.main) as in every other stage, not only Tune's loop, which would
        # otherwise end the trials and return as if the sweep had finished.
        os.environ['TUNE_DISABLE_SIGINT_HANDLER'] = '1'
        progress = _ProgressBar(len(trials), len(trials) - len(todo))
        stalled = _Stalled(progress, stall_timeout)
        tuner = tune.Tuner(
            tune.with_resources(_trial, {k: v for k, v in resources.items() if v}),
            param_space=dict(item=tune.grid_search(todo), context=context),
            # Tune's own tables only with verbose; each trial's output goes to files in its folder.
            run_config=tune.RunConfig(name=f'sweep-{time.strftime("%Y%m%d-%H%M%S")}', verbose=1 if verbose else 0,
                                      storage_path=storage_path, log_to_file=True,
                                      failure_config=tune.FailureConfig(max_failures=max_failures),
                                      callbacks=[progress], stop=stalled))
        for result in tuner.fit():
            if result.error is not None:
                text = str(result.error).strip().splitlines()
                errors[result.config['item']['hash']] = f'{type(result.error).__name__}: {text[-1] if text else ""}'
            elif (result.metrics or {}).get('error'):  # a trial that reported its own failure (not retried)
                errors[result.config['item']['hash']] = result.metrics['error']
        if stalled.stalled:
            ask = ', '.join(f'{v:g} {k.upper()}' for k, v in resources.items())
            log(f'sweep: no progress for {stall_timeout:g} s: trials wait for a worker ({ask} each); the cluster has '
                f'{cpus_gpus(ray.available_resources())} free of {cpus_gpus(ray.cluster_resources())}; the sweep stopped')
            for item in todo:
                errors.setdefault(item['hash'], f'not run: no resources for {stall_timeout:g} s')
    rows = []
    for h, trial in zip(hashes, trials):
        if storage.exists(row_key(h)):
            rows.append(storage.read_json(row_key(h)))
        else:
            rows.append(dict(trial_row(trial), trial_hash=h, error=errors.get(h, 'did not report (its worker was lost)')))
    return rows, [r['label'] for r in rows if r.get('error')]


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
    weights = stage.options['inception_weights']
    context = dict(snapshots=(upstream.get('train') or upstream['checkpoint'])['snapshots'],
                   tables=upstream.get('calibrate', {}).get('tables', {}), interpolate=stage.inputs['interpolate'],
                   reference=ray.put(reference), storage=stage.storage,
                   inception_weights=weights and (stage_input(stage.storage, weights, e['inception_weights']), e['inception_weights']),
                   **{k: e[k] for k in ('class_idx', 'num_images', 'seed_blocks', 'batch_size', 'kid', 'precision_recall')})
    trials = stage.inputs['trials']
    rows, failed = run_sweep(trials, trial_hashes(stage, trials), context, stage.options['trial_resources'],
                             stage.storage.uri(stage.key, 'ray'), max_failures=stage.options['max_failures'],
                             verbose=opts.verbose, log=opts.log, stall_timeout=opts.stall_timeout)
    uri = stage.storage.write_json(f'{stage.key}/rows.json', rows)
    return dict(rows=uri, trials=len(rows), failed=failed)


def write_sweep_table(spec, stage, outputs, prov):
    rows = stage.storage.read_json(f'{stage.key}/rows.json')
    results.write_table(stage.storage, spec.experiment, 'sweep',
                        [dict(r, evaluate=dataclasses.asdict(spec.evaluate)) for r in rows], prov)
