"""Sweep stage: a Ray Tune grid with one trial per sampler setting (calibrated or not). Each
trial samples num_images images with per-image seeds, measures them against the reference
statistics with tasks.metrics.evaluate and reports the row through ray.tune.report.
"""
import os
import time

import ray
from ray import tune

from orchestrator.spec import sampler_kwargs, table_key
from tasks import calibration, checkpoints, metrics


# What a trial reports besides the metric values (Tune adds bookkeeping keys we drop).
_METRIC_KEYS = ('num_samples', 'seed_blocks', 'nfe', 'reference_count', 'reference_sha256', 'feature_extractor',
                'weights_source', 'weights_sha256', 'class_idx', 'note', 'device', 'wall_time')
_METRIC_PREFIXES = ('fid', 'frechet', 'kid', 'precision', 'recall', 'f_score')


def describe_trial(trial):
    """A short label, e.g. 'dpm_solver order=3 steps=10 calibrated (data, 1000 images)'."""
    params = ' '.join(f'{k}={v}' for k, v in sampler_kwargs(trial).items())
    per_class = ', per class' if trial.get('calibration_per_class') else ''
    calibrated = (f' calibrated ({trial["calibration_source"]}, {trial["calibration_images"]} images{per_class})'
                  if trial['calibrated'] else '')
    return f'{trial["sampler"]} {params}{calibrated}'


def _trial(config):
    trial, ctx = config['trial'], config['context']
    start = time.time()
    device = 'cuda' if ray.get_gpu_ids() else 'cpu'
    net = checkpoints.load_denoiser(ctx['model']['network'], ctx['model']['format']).to(device)
    if trial['calibrated']:
        table = calibration.CalibrationTable.load(ctx['tables'][table_key(trial['calibration_source'], trial['calibration_images'])])
        net = calibration.CalibratedDenoiser(net, table, context=describe_trial(trial), per_class=trial['calibration_per_class'])
    weights = metrics.resolve_inception_weights(ctx['inception_weights'])
    extractor = metrics.InceptionFeatures(weights, device=device, batch_size=ctx['batch_size'])
    reference = ray.get(ctx['reference'])
    result = metrics.evaluate(net, reference, extractor, ctx['num_images'], trial['sampler'], seed_blocks=ctx['seed_blocks'],
                              batch_size=ctx['batch_size'], device=device, with_kid=ctx['kid'], with_pr=ctx['precision_recall'],
                              class_idx=ctx['class_idx'], **sampler_kwargs(trial))
    blocks = {k: v for k, v in result.items() if k.endswith('_blocks')}
    row = {k: v for k, v in result.items() if not k.endswith('_blocks')}
    row.update({k: str(v) for k, v in blocks.items()}, device=device, wall_time=time.time() - start,
               reference_sha256=reference['sha256'], class_idx=ctx['class_idx'])
    tune.report(row)


def run_sweep(trials, context, resources, stage_dir, verbose=1):
    """One Tune trial per entry of `trials`; returns a list of rows (trial settings + metrics).
    context: model (the model stage's outputs: network path and format), tables ({table_key: path}),
    reference (ObjectRef of the statistics), class_idx, num_images, seed_blocks, batch_size, kid,
    precision_recall, inception_weights."""
    tuner = tune.Tuner(
        tune.with_resources(_trial, {k: v for k, v in resources.items() if v}),
        param_space=dict(trial=tune.grid_search(trials), context=context),
        run_config=tune.RunConfig(name='sweep', storage_path=os.path.abspath(os.path.join(stage_dir, 'ray')), verbose=verbose))
    grid = tuner.fit()
    rows, errors = [], []
    for result in grid:
        trial = result.config['trial']
        if result.error is not None:
            errors.append(f'{describe_trial(trial)}: {result.error}')
            continue
        metrics_row = {k: v for k, v in result.metrics.items() if k in _METRIC_KEYS or k.startswith(_METRIC_PREFIXES)}
        rows.append(dict(label=describe_trial(trial), sampler=trial['sampler'], calibrated=trial['calibrated'],
                         calibration_source=trial.get('calibration_source'), calibration_images=trial.get('calibration_images'),
                         calibration_per_class=trial.get('calibration_per_class'),
                         params=sampler_kwargs(trial), **metrics_row))
    if errors:
        raise RuntimeError('sweep trials failed:\n  ' + '\n  '.join(errors))
    return rows

