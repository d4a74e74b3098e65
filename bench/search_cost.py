"""What a search saves: a grid of 12 sampler settings at full cost vs synchronous successive
halving (SHA) and asynchronous (ASHA) on the same grid vs Optuna + ASHA over continuous ranges, on
one model trained like the quickstart's; then replays over the grid's recorded rung metrics (SHA:
one outcome; ASHA: the mean and spread over 200 shuffled orders) for 12, 24 and 48 settings, and
projections for specs/edm-stochastic-search.yaml (ASHA, grid-order replay) and
specs/calib-table1-search.yaml (SHA).

    .venv/bin/python bench/search_cost.py [--num-images 256] [--min-images 32] [--factor 3] [--kimg 10]
                                          [--runs grid,sha,asha,optuna] [--out /tmp/search-bench]

Images are counted with every seed block (a finished trial's images_generated).

The grid run trains the model and computes the reference statistics; the other two runs read
that network (model.checkpoint) and statistics file (evaluate.reference_stats), each under a
results root of its own, so that no run reuses another's trials. The full grid runs with
`scheduler: fifo`: every trial reports every rung and none is stopped, which costs exactly what
the plain grid costs and records the metric at every rung for the replay. Images are counted
by the trials themselves (the sweep's log line) and checked against the tables (each row's
images, plus the other seed blocks of a finished trial); Optuna may propose a setting twice, and
two copies running at once both sample (reported). Wall times are the sweep stage's
(timings.parquet).
"""
import argparse
import heapq
import json
import os
import random
import re
import subprocess
import sys
import time
import types

import numpy as np
import pandas as pd
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

GRID = [dict(sampler='dpm_solver', algorithm_type='dpmsolver', method='multistep', order=[1, 2, 3], steps=[4, 6, 10, 16])]
# Continuous ranges around the grid (t_end continuous: repeated proposals are rare).
RANGES = [dict(sampler='dpm_solver', algorithm_type='dpmsolver', method='multistep', order=[1, 2, 3],
               steps=dict(low=4, high=16), t_end=dict(low=1e-4, high=1e-2, log=True))]


def spec(args, samplers, search, trained=None):
    """The quickstart's data, model and training (args.kimg, no snapshots), or `trained`
    (network, reference statistics) from the grid run."""
    with open(os.path.join(ROOT, 'specs', 'quickstart.yaml')) as f:
        base = yaml.safe_load(f)
    base['train'].update(total_kimg=args.kimg)
    base['train'].pop('snapshots_kimg')
    evaluate = dict(num_images=args.num_images, seed_blocks=2, reference_images=1000, batch_size=64)
    out = dict(experiment='search-bench', seed=0, data=base['data'], model=base['model'], train=base['train'],
               sweep=dict(samplers=samplers, calibrated=[False], resources=dict(cpu=1), search=search), evaluate=evaluate)
    if trained:
        out.update(model=dict(checkpoint=trained[0]), evaluate=dict(evaluate, reference_stats=trained[1]))
        del out['train']
    return out


def run(args, name, samplers, search, trained=None):
    """One orchestrator run under <out>/<name>/; its sweep and rungs tables, sweep wall time, the
    images its trials sampled, and its network and reference statistics files."""
    path, root = os.path.join(args.out, f'{name}.yaml'), os.path.join(args.out, name)
    with open(path, 'w') as f:
        yaml.safe_dump(spec(args, samplers, search, trained), f)
    start, log = time.time(), os.path.join(args.out, f'{name}.log')
    if not args.tables_only:
        proc = subprocess.run([sys.executable, '-m', 'orchestrator', 'run', path, '--results', root], cwd=ROOT,
                              capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f'{name}: exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}')
        with open(log, 'w') as f:
            f.write(proc.stdout)
    with open(log) as f:
        stdout = f.read()
    folder = os.path.join(root, 'search-bench')
    sweep, rungs = (pd.read_parquet(os.path.join(folder, f'{t}.parquet')) for t in ('sweep', 'rungs'))
    timings = pd.read_parquet(os.path.join(folder, 'timings.parquet')).set_index('stage')
    sampled = sum(map(int, re.findall(r'sweep: (\d+) image\(s\) sampled in this run', stdout)))  # (SHA: one line per rung)
    counted = int(sweep['images_generated'].sum())
    if sampled < counted or sampled > counted and not search.get('algorithm'):
        sys.exit(f'{name}: the trials say they sampled {sampled} images, the tables hold {counted}')
    print(f'{name}: {len(sweep)} trials, {sampled} images sampled ({sampled - counted} by repeated proposals), sweep stage '
          f'{timings.loc["sweep", "seconds"]:.0f} s (run {time.time() - start:.0f} s)', flush=True)
    stages = os.path.join(folder, 'stages')
    done = {d.split('-')[0]: json.load(open(os.path.join(stages, d, 'DONE.json'))) for d in os.listdir(stages)}
    trained = (done.get('train') or {}).get('network'), done['reference']['stats']
    return sweep, rungs, float(timings.loc['sweep', 'seconds']), sampled, trained


def spearman(a, b):
    ra, rb = pd.Series(a).rank().to_numpy(), pd.Series(b).rank().to_numpy()
    return float(np.corrcoef(ra, rb)[0, 1])


def replay(trajectories, rungs, factor, workers, extra, seed):
    """Asynchronous successive halving (Ray Tune's own ASHA bracket) over recorded metrics:
    trajectories[i][k] is setting i's metric at rungs[k]; trials start in a shuffled order on
    `workers` workers, time is proportional to images, each finished trial pays `extra` images
    (its other seed blocks). Returns the images it samples."""
    from ray.tune.schedulers.async_hyperband import _Bracket
    bracket = _Bracket(rungs[0], rungs[-1], factor, 0)
    order = list(range(len(trajectories)))
    random.Random(seed).shuffle(order)
    clock, images, events, queue = 0.0, 0, [], list(order)

    def start(now):
        if queue:
            i = queue.pop(0)
            heapq.heappush(events, (now + rungs[0], i, 0))
    for _ in range(workers):
        start(0.0)
    while events:
        clock, i, k = heapq.heappop(events)
        images += rungs[k] - (rungs[k - 1] if k else 0)
        if k == len(rungs) - 1:  # num_images: ASHA stops it there, and it finishes the protocol
            images += extra
            start(clock + extra)
            continue
        trial = types.SimpleNamespace(trial_id=str(i))
        if bracket.on_result(trial, rungs[k], -trajectories[i][k]) == 'STOP':
            start(clock)
        else:
            heapq.heappush(events, (clock + rungs[k + 1] - rungs[k], i, k + 1))
    return images


def replay_share(trajectories, rungs, factor, workers, extra, repeats=200):
    """Mean and standard deviation of ASHA's share of the full grid's images over `repeats` shuffles."""
    full = len(trajectories) * (rungs[-1] + extra)
    shares = [replay(trajectories, rungs, factor, workers, extra, s) / full for s in range(repeats)]
    return float(np.mean(shares)), float(np.std(shares))


def sha_share(trajectories, rungs, factor, extra):
    """Synchronous halving (orchestrator.sweep.halving, the scheduler's own decision) over recorded
    metrics: its share of the full grid's images (order-free: one outcome)."""
    from orchestrator.sweep import halving
    reached = {f'{i:04d}': dict(zip(rungs, t)) for i, t in enumerate(trajectories)}
    inside = halving(reached, rungs, factor)
    last = {h: rungs[k] for k, ins in enumerate(inside) for h in ins}
    images = sum(last.values()) + extra * len(inside[-1])
    return images / (len(trajectories) * (rungs[-1] + extra))


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--num-images', type=int, default=256)
    p.add_argument('--min-images', type=int, default=32)
    p.add_argument('--factor', type=float, default=3)
    p.add_argument('--kimg', type=float, default=10)
    p.add_argument('--runs', default='grid,sha,asha,optuna', help='which runs (grid is always run: the others read its model)')
    p.add_argument('--out', default='/tmp/search-bench')
    p.add_argument('--tables-only', action='store_true', help='print the tables of the runs already under --out')
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    print(f'command: {" ".join(sys.argv)}; device: CPU ({os.cpu_count()} cores)', flush=True)
    halving = dict(min_images=args.min_images, reduction_factor=args.factor)
    grid, grid_rungs, grid_wall, grid_images, trained = run(args, 'grid', GRID, dict(halving, scheduler='fifo'))
    searches = {}
    for name, samplers, search in (('SHA on the grid', GRID, dict(halving, scheduler='sha')),
                                   ('ASHA on the grid (order shuffled by the spec\'s seed)', GRID, dict(halving, scheduler='asha')),
                                   ('Optuna + ASHA on ranges, 12 trials', RANGES,
                                    dict(halving, scheduler='asha', algorithm='optuna', num_samples=12))):
        key = name.split()[0].lower()
        if key in args.runs.split(','):
            table, table_rungs, wall, images, _ = run(args, key, samplers, search, trained)
            searches[name] = table, table_rungs, wall, images
    rungs = sorted(grid_rungs['images'].unique())
    # The grid: every setting's final metric (EDM's protocol: min over blocks) and its block spread.
    blocks = grid['fid_blocks'].map(lambda b: json.loads(b) if isinstance(b, str) else list(b))
    grid = grid.assign(spread=blocks.map(lambda b: max(b) - min(b)))
    best = grid.loc[grid['fid'].idxmin()]
    setting = lambda label: label.split(' @ ')[0]  # the snapshot's kimg: nominal for the grid's training, actual in the file
    by_setting = dict(zip(grid['label'].map(setting), grid['fid']))

    def found(table):
        done = table[~table['stopped']]
        pick = done.loc[done['fid'].idxmin()]
        value = by_setting.get(setting(pick['label']), pick['fid'])
        return setting(pick['label']), value, setting(pick['label']) == setting(best['label']) or value - best['fid'] <= best['spread']

    second = grid_rungs[grid_rungs['images'] == rungs[1]].set_index('label')['fid']
    rho_grid = spearman(second.reindex(grid['label']).to_numpy(), grid['fid'].to_numpy())
    print('\n| run | trials | images sampled (every seed block) | share of the grid | sweep wall time | best setting found | '
          'its FID (grid) |')
    print('|---|---|---|---|---|---|---|')
    print(f'| grid (every trial to {args.num_images} x 2 blocks) | {len(grid)} | {grid_images} | 100% | {grid_wall:.0f} s | '
          f'{setting(best["label"])} | {best["fid"]:.2f} (block spread {best["spread"]:.2f}) |')
    for name, (table, _, wall, images) in searches.items():
        label, value, ok = found(table)
        print(f'| {name} | {len(table)} | {images} | {images / grid_images:.1%} | {wall:.0f} s | {label} | {value:.2f} '
              f'({"the best, or within its spread" if ok else "NOT within the best spread"}) |')
    print(f'\nSpearman rank correlation, rung {rungs[1]} images vs the grid\'s final metric (all {len(grid)} settings): '
          f'{rho_grid:.2f}')
    # Replay: ASHA over the grid's recorded rungs, 2 workers as here. Beyond 12 settings, resampled
    # copies, each shifted by its own constant drawn from N(0, s^2), s = the grid's median seed-block
    # spread: a copy stands for another setting of about the same quality (exact copies would tie,
    # and every copy of a top setting would run to the end).
    table = grid_rungs.pivot_table(index='label', columns='images', values='fid')[rungs]
    trajectories = table.to_numpy()
    extra = args.num_images  # the second seed block of a finished trial
    rng, s = np.random.default_rng(0), float(grid['spread'].median())

    def resample(n):
        return trajectories if n == len(trajectories) else \
            trajectories[rng.integers(0, len(trajectories), n)] + rng.normal(0, s, (n, 1))
    print(f'\n| settings | SHA share of the grid\'s images (replay) | ASHA share (replay: mean +- std over 200 shuffles, '
          f'2 workers) |\n|---|---|---|')
    for n in (12, 24, 48):  # (beyond 12: copies shifted by N(0, s^2), s the median seed-block spread)
        t = resample(n)
        mean, std = replay_share(t, rungs, args.factor, 2, extra)
        print(f'| {n} | {sha_share(t, rungs, args.factor, extra):.1%} | {mean:.1%} +- {std:.1%} |')
    # Projection: edm-stochastic-search (64 settings, rungs 500 x 3^k to 50,000, 3 seed blocks, one
    # GPU: one trial at a time), each setting's metric at the target rungs interpolated along its
    # recorded trajectory by rung position (what the replay needs is the ordering at each rung).
    from orchestrator import spec as spec_mod
    target = spec_mod.SearchSpec(min_images=500, reduction_factor=3).rungs(50000)
    where = np.linspace(0, len(rungs) - 1, len(target))
    projected = np.array([np.interp(where, np.arange(len(rungs)), t) for t in resample(64)])
    for workers in (1, 4):
        share, _ = replay_share(projected, target, 3, workers, 2 * 50000)
        print(f'projected share for specs/edm-stochastic-search.yaml (ASHA, grid-order replay: 64 settings, rungs '
              f'{"/".join(map(str, target))}, 3 seed blocks, {workers} trial(s) at a time): {share:.0%}')
    # calib-table1-search: its own trials, rungs and seed blocks, read from the spec.
    table1 = spec_mod.load(os.path.join(ROOT, 'specs', 'calib-table1-search.yaml'))
    e, n = table1.evaluate, len(table1.trials())
    target = table1.sweep.search.rungs(e.num_images)
    where = np.linspace(0, len(rungs) - 1, len(target))
    projected = np.array([np.interp(where, np.arange(len(rungs)), t) for t in resample(n)])
    print(f'projected share for specs/calib-table1-search.yaml (SHA replay: {n} settings, rungs {"/".join(map(str, target))}, '
          f'{e.seed_blocks} seed block(s)): '
          f'{sha_share(projected, target, table1.sweep.search.reduction_factor, (e.seed_blocks - 1) * e.num_images):.0%}')


if __name__ == '__main__':
    main()
