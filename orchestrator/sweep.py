"""Sweep stage: a Ray Tune grid with one trial per sampler setting (calibrated or not). Each
trial samples num_images images with per-image seeds, measures them against the reference
statistics with tasks.metrics.evaluate, writes its row under the results root by its content
hash (plan.trial_hashes) and reports it through ray.tune.report. Finished trials are never run
again: a re-run after a crash, a pre-emption, a failed trial or an extended sweep runs only the
trials that have no row.
"""
import json
import os
import time

import ray
from ray import tune
from tqdm import tqdm

from orchestrator.results import write_json
from orchestrator.spec import cpus_gpus, sampler_kwargs, snapshot_key, table_key
from tasks import calibration, checkpoints, metrics


def describe_trial(trial):
    """A short label, e.g. 'dpm_solver order=3 steps=10 calibrated (data, 1000 images) @ 5 kimg'
    (the snapshot named when the model has a training kimg)."""
    params = ' '.join(f'{k}={v}' for k, v in sampler_kwargs(trial).items())
    per_class = ', per class' if trial.get('calibration_per_class') else ''
    calibrated = (f' calibrated ({trial["calibration_source"]}, {trial["calibration_images"]} images{per_class})'
                  if trial['calibrated'] else '')
    kimg = trial.get('snapshot_kimg')
    return f'{trial["sampler"]} {params}{calibrated}' + ('' if kimg is None else f' @ {kimg:g} kimg')


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
    net = checkpoints.load_denoiser(model['network'], model['format']).to(device)
    if trial['calibrated']:
        key = table_key(trial['snapshot_kimg'], trial['calibration_source'], trial['calibration_images'])
        table = calibration.CalibrationTable.load(ctx['tables'][key])
        net = calibration.CalibratedDenoiser(net, table, interpolate=ctx['interpolate'], context=describe_trial(trial),
                                             per_class=trial['calibration_per_class'])
    weights = metrics.resolve_inception_weights(ctx['inception_weights'])
    extractor = metrics.InceptionFeatures(weights, device=device, batch_size=ctx['batch_size'])
    reference = ray.get(ctx['reference'])
    result = metrics.evaluate(net, reference, extractor, ctx['num_images'], trial['sampler'], seed_blocks=ctx['seed_blocks'],
                              batch_size=ctx['batch_size'], device=device, kid=ctx['kid'], precision_recall=ctx['precision_recall'],
                              class_idx=ctx['class_idx'], **sampler_kwargs(trial))
    row = dict(trial_row(trial), trial_hash=item['hash'],
               **{k: ([float(x) for x in v] if isinstance(v, list) else v) for k, v in result.items()},  # *_blocks: JSON
               device=device, wall_time=time.time() - start, reference_sha256=reference['sha256'], class_idx=ctx['class_idx'])
    # The row is kept as soon as the trial ends, so a killed driver or a later run reuses it.
    write_json(os.path.join(ctx['trials_dir'], f'{item["hash"]}.json'), row)
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


def run_sweep(trials, hashes, context, resources, stage_dir, max_failures=1, verbose=False, log=print, stall_timeout=None):
    """Rows of the sweep table, one per entry of `trials` (with content hashes `hashes`), and
    the labels of the trials that failed. Trials finished before (a row under
    context['trials_dir']) are reused; the others run as one Tune grid, each retried up to
    max_failures times. A failed trial's row holds its error and no metrics.
    context: snapshots (the model stage's outputs: {snapshot_key: network path, format, kimg}), tables ({table_key:
    path}), interpolate, reference (ObjectRef of the statistics), trials_dir, class_idx, num_images,
    seed_blocks, batch_size, kid, precision_recall, inception_weights. stall_timeout: seconds with
    trials waiting and none running after which the sweep ends (its missing trials named)."""
    os.makedirs(context['trials_dir'], exist_ok=True)
    row_path = lambda h: os.path.join(context['trials_dir'], f'{h}.json')
    todo = [dict(hash=h, trial=t) for h, t in zip(hashes, trials) if not os.path.isfile(row_path(h))]
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
                                      storage_path=os.path.abspath(os.path.join(stage_dir, 'ray')), log_to_file=True,
                                      failure_config=tune.FailureConfig(max_failures=max_failures),
                                      callbacks=[progress], stop=stalled))
        for result in tuner.fit():
            if result.error is not None:
                text = str(result.error).strip().splitlines()
                errors[result.config['item']['hash']] = f'{type(result.error).__name__}: {text[-1] if text else ""}'
        if stalled.stalled:
            ask = ', '.join(f'{v:g} {k.upper()}' for k, v in resources.items())
            log(f'sweep: no progress for {stall_timeout:g} s: trials wait for a worker ({ask} each); the cluster has '
                f'{cpus_gpus(ray.available_resources())} free of {cpus_gpus(ray.cluster_resources())}; the sweep stopped')
            for item in todo:
                errors.setdefault(item['hash'], f'not run: no resources for {stall_timeout:g} s')
    rows = []
    for h, trial in zip(hashes, trials):
        if os.path.isfile(row_path(h)):
            with open(row_path(h)) as f:
                rows.append(json.load(f))
        else:
            rows.append(dict(trial_row(trial), trial_hash=h, error=errors.get(h, 'did not report (its worker was lost)')))
    return rows, [r['label'] for r in rows if r.get('error')]
