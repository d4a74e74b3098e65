"""Orchestration overhead on the CPU: a Ray Tune grid of N sampler trials against a plain Python
loop over the same configurations, with the same trial body (load the network, sample, reduce).

    python bench/tune_overhead.py [--trials 8] [--images 32] [--cpus 2]

Rows: the plain loop; Tune with one trial at a time (its per-trial overhead is the difference
to the loop, divided by N); Tune with as many trials at once as there are CPUs (what a sweep
gets from Ray on this machine). Ray's start-up is timed apart. The trial body is sampling only
(no Inception), so the overhead is not hidden behind FID.
"""
import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tasks import precond, samplers  # noqa: E402


def trial_body(config):
    """What a sweep trial does minus the metric: load the network, sample, reduce."""
    torch.set_num_threads(config['threads'])
    net = precond.build_denoiser('ddpmpp-tiny', 'edm', img_resolution=16, img_channels=1)
    net.load_state_dict(torch.load(config['weights'], weights_only=True))
    images, nfe = samplers.generate(net, range(config['images']), 'dpm_solver', batch_size=config['images'],
                                    steps=config['steps'], order=config['order'], method='singlestep')
    return dict(mean=float(images.mean()), nfe=nfe)


def tune_trial(config):
    from ray import tune
    tune.report(trial_body(config))


def run_tune(configs, concurrent, storage):
    from ray import tune
    tuner = tune.Tuner(tune.with_resources(tune_trial, {'cpu': 1}),
                       param_space=tune.grid_search(configs),
                       tune_config=tune.TuneConfig(max_concurrent_trials=concurrent),
                       run_config=tune.RunConfig(storage_path=storage, verbose=0))
    grid = tuner.fit()
    if grid.errors:
        raise RuntimeError(grid.errors[0])
    return sorted((r.config['steps'], r.config['order'], r.metrics['mean']) for r in grid)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--trials', type=int, default=8)
    p.add_argument('--images', type=int, default=32)
    p.add_argument('--cpus', type=int, default=os.cpu_count())
    args = p.parse_args()
    tmp = tempfile.mkdtemp(prefix='tune-overhead-')
    weights = os.path.join(tmp, 'net.pt')
    torch.manual_seed(0)
    torch.save(precond.build_denoiser('ddpmpp-tiny', 'edm', img_resolution=16, img_channels=1).state_dict(), weights)
    steps = [10, 15, 20, 25]
    configs = [dict(weights=weights, images=args.images, threads=1, steps=steps[i % len(steps)], order=2 + (i // len(steps)) % 2)
               for i in range(args.trials)]
    nfe = sum(c['steps'] for c in configs)

    start = time.perf_counter()
    loop = sorted((c['steps'], c['order'], trial_body(c)['mean']) for c in configs)
    t_loop = time.perf_counter() - start

    os.environ.setdefault('RAY_AUTH_MODE', 'disabled')
    os.environ.setdefault('RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER', '0')
    import ray
    start = time.perf_counter()
    ray.init(num_cpus=args.cpus, object_store_memory=256 * 1024 ** 2, include_dashboard=False,
             _node_ip_address='127.0.0.1', log_to_driver=False)
    t_init = time.perf_counter() - start
    start = time.perf_counter()
    serial = run_tune(configs, 1, os.path.join(tmp, 'serial'))
    t_serial = time.perf_counter() - start
    start = time.perf_counter()
    parallel = run_tune(configs, args.cpus, os.path.join(tmp, 'parallel'))
    t_parallel = time.perf_counter() - start
    ray.shutdown()
    # Same configurations, same seeds: the three runs must agree exactly, or timing them means nothing.
    assert loop == serial == parallel, (loop, serial, parallel)

    n = args.trials
    print(f'{n} trials of DPM-Solver on ddpmpp-tiny 16x16, {args.images} images each ({nfe * args.images} network '
          f'evaluations in all), 1 thread per trial; torch {torch.__version__}, Ray {ray.__version__}, {args.cpus} CPUs\n')
    print('| run | wall s | s per trial | overhead vs loop, s per trial |')
    print('|---|---|---|---|')
    print(f'| plain loop | {t_loop:.1f} | {t_loop / n:.2f} | |')
    print(f'| Tune, 1 trial at a time | {t_serial:.1f} | {t_serial / n:.2f} | {(t_serial - t_loop) / n:+.2f} |')
    print(f'| Tune, {args.cpus} trials at a time | {t_parallel:.1f} | {t_parallel / n:.2f} | {(t_parallel - t_loop) / n:+.2f} |')
    print(f'\nRay start-up (embedded cluster, once per run): {t_init:.1f} s. Results identical in all three runs.')


if __name__ == '__main__':
    main()
