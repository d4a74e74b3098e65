"""Sweeps that search (sweep.search): rungs, validation, trials that grow from kept feature sums,
resume, paired seeds, Optuna's search space and the calibration grid of a search. The trial
logic is tested on a Gaussian-mixture oracle with a stand-in feature extractor (the pixels):
what is tested is the bookkeeping, not Inception."""
import io
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import yaml

from orchestrator import plan, spec, sweep
from tasks import data, metrics, oracles

fashion_present = os.path.isfile(os.path.join(data.FASHION_MNIST_DIR, 'train-images-idx3-ubyte.gz'))
needs_fashion = pytest.mark.skipif(not fashion_present, reason=f'Fashion-MNIST not installed in {data.FASHION_MNIST_DIR}')

SPEC = dict(
    experiment='search', seed=0, data=dict(name='fashion-mnist', pad_to_32=True, resolution=16, limit=512),
    model=dict(preset='ddpmpp-tiny'),
    sweep=dict(samplers=[dict(sampler='edm', num_steps=[8, 18], S_churn=[0, 40])], calibrated=[False],
               search=dict(min_images=500, reduction_factor=3)),
    evaluate=dict(num_images=50000),
)


def _parse(**changes):
    """SPEC with `section__key` (or `section__key__key`) changed, parsed."""
    raw = yaml.safe_load(yaml.safe_dump(SPEC))
    for name, value in changes.items():
        *where, key = name.split('__')
        d = raw
        for w in where:
            d = d.setdefault(w, {})
        if value is None:
            d.pop(key, None)
        else:
            d[key] = value
    return spec.parse(raw, 's.yaml')


# ---------------------------------------------------------------------------------------------
# Rungs and validation.

@pytest.mark.parametrize('min_images, factor, num_images', [(500, 3, 50000), (3, 2, 12), (100, 2.5, 1000), (16, 4, 1024),
                                                            (200, 4, 200), (7, 3, 100)])
def test_rungs_are_ashas_milestones_then_num_images(min_images, factor, num_images):
    """A trial reports at every milestone Tune's ASHAScheduler compares at (min_t * rf^k below
    max_t, its own bracket arithmetic) and at num_images, whatever the factor."""
    from ray.tune.schedulers.async_hyperband import _Bracket
    milestones = sorted(m for m, _ in _Bracket(min_images, num_images, factor, 0)._rungs if m < num_images)
    rungs = spec.SearchSpec(min_images=min_images, reduction_factor=factor).rungs(num_images)
    assert rungs == [math.ceil(m) for m in milestones] + [num_images]
    assert rungs == sorted(set(rungs)) and all(isinstance(n, int) for n in rungs)


def test_rungs_of_the_issue_example():
    assert spec.SearchSpec(min_images=500, reduction_factor=3).rungs(50000) == [500, 1500, 4500, 13500, 40500, 50000]


@pytest.mark.parametrize('changes, message', [
    (dict(sweep__samplers=[dict(sampler='edm', S_churn=dict(low=0, high=80))]),
     r'sweep.samplers\[0\].S_churn: a range is searched by an algorithm: set sweep.search.algorithm: optuna'),
    (dict(sweep__search__algorithm='optuna', sweep__search__num_samples=8,
          sweep__samplers=[dict(sampler='edm', S_noise=dict(low=0, high=1.01))]),
     r'sweep.samplers\[0\].S_noise.low: expected a positive finite number, got 0'),
    (dict(sweep__search__algorithm='optuna', sweep__search__num_samples=8,
          sweep__samplers=[dict(sampler='edm', S_min=dict(low=0, high=10), S_max=dict(low=1, high=50))]),
     r'trial \d+ \(edm S_min=10 S_max=1\): S_min: 10 is above S_max = 1'),
    (dict(sweep__search__algorithm='optuna', sweep__search__num_samples=8,
          sweep__samplers=[dict(sampler='edm', num_steps=dict(low=8, high=40.5))]),
     r'num_steps.high: expected an integer \(num_steps is searched over integers\), got 40.5'),
    (dict(sweep__search__algorithm='optuna', sweep__search__num_samples=8,
          sweep__samplers=[dict(sampler='edm', num_steps=dict(low=8, high=40, step=5))]),
     r'num_steps.step: high - low = 32 is not a multiple of step 5'),
    (dict(sweep__search__algorithm='optuna', sweep__search__num_samples=8,
          sweep__samplers=[dict(sampler='edm', S_churn=dict(low=0, high=80, log=True))]),
     r'S_churn.log: a log-scaled range needs low > 0, got 0'),
    (dict(sweep__search__algorithm='optuna', sweep__search__num_samples=8,
          sweep__samplers=[dict(sampler='edm', rho=dict(low=9, high=3))]), r'rho: low \(9\) must be below high \(3\)'),
    (dict(sweep__search__algorithm='optuna', sweep__search__num_samples=8,
          sweep__samplers=[dict(sampler='edm', rho=dict(low=3, hihg=9))]), r"rho.hihg: unknown key \(did you mean 'high'\?\)"),
    (dict(sweep__search__algorithm='optuna', sweep__search__num_samples=8,
          sweep__samplers=[dict(sampler='dpm_solver', order=dict(low=1, high=3), steps=dict(low=2, high=10))]),
     r'steps: 2 is fewer than order = 3'),
    (dict(sweep__search__num_samples=8), r'sweep.search.num_samples: only with an algorithm'),
    (dict(sweep__search__algorithm='optuna'), r'sweep.search.num_samples: missing: how many trials optuna proposes'),
    (dict(sweep__search__algorithm='tpe', sweep__search__num_samples=4), r"sweep.search.algorithm: 'tpe' is not one of: optuna"),
    (dict(sweep__search__scheduler='asah'), r"sweep.search.scheduler: 'asah' is not one of: sha, asha, fifo \(did you mean 'asha'\?\)"),
    (dict(sweep__search__scheduler='sha', sweep__search__algorithm='optuna', sweep__search__num_samples=8),
     r'sweep.search.scheduler: sha halves a fixed set of trials, rung by rung; optuna proposes them one by one: use asha or fifo'),
    (dict(sweep__search__metric='kid'), r"sweep.search.metric: 'kid' is not one of: fid"),
    (dict(sweep__search__min_images=60000), r'sweep.search.min_images: 60000: the first rung is above evaluate.num_images = 50000'),
    (dict(sweep__search__min_images=1), r'sweep.search.min_images: a Frechet distance needs at least 2 images'),
    (dict(sweep__search__reduction_factor=1), r'sweep.search.reduction_factor: must be above 1'),
    (dict(sweep__search__grace=3), r"sweep.search.grace: unknown key; valid: scheduler, metric, min_images"),
    (dict(calibrate=dict(grid=dict(points=1))), r'calibrate.grid: expected \{points: N\} with an integer N >= 2'),
])
def test_search_and_range_validation(changes, message):
    with pytest.raises(spec.SpecError, match=message):
        _parse(**changes)


def test_a_valid_search_plans_rungs_and_its_space():
    s = _parse(sweep__search__algorithm='optuna', sweep__search__num_samples=16,
               sweep__samplers=[dict(sampler='edm', num_steps=dict(low=8, high=40, step=1), S_churn=dict(low=0, high=80),
                                     S_noise=dict(low=1.0, high=1.010), rho=dict(low=3, high=9, log=True))])
    stage = {st.name: st for st in plan.make_plan(s, 'results')}['sweep']
    assert stage.inputs['trials'] is None and stage.inputs['rungs'] == [500, 1500, 4500, 13500, 40500, 50000]
    assert stage.inputs['space']['samplers'] == s.sweep.samplers
    assert '16 trial(s) proposed by optuna, ASHA on rungs of 500/1500/4500/13500/40500/50000 images' in stage.resources
    # The grid's trials are the corners of the space: 2^4 settings.
    assert len(s.trials()) == 16 and {t['num_steps'] for t in s.trials()} == {8, 40}


def test_the_scheduler_defaults_to_sha_over_a_grid_and_asha_with_an_algorithm():
    assert _parse().sweep.search.scheduler == 'sha'
    assert _parse(sweep__search__algorithm='optuna', sweep__search__num_samples=8).sweep.search.scheduler == 'asha'
    assert _parse(sweep__search__scheduler='fifo').sweep.search.scheduler == 'fifo'
    stage = {st.name: st for st in plan.make_plan(_parse(), 'results')}['sweep']
    assert '4 Tune trial(s), SHA on rungs of 500/1500/4500/13500/40500/50000 images' in stage.resources


# ---------------------------------------------------------------------------------------------
# Feature sums and trials that grow.

def test_feature_sums_merge_to_the_single_pass_statistics():
    """Sums over parts, merged (and kept through torch.save / weights_only load), give the mean
    and covariance of all features at once, to 1e-12, as numpy computes them."""
    g = torch.Generator().manual_seed(0)
    f = torch.randn(300, 12, generator=g, dtype=torch.float64) * 3 + torch.linspace(-5, 5, 12, dtype=torch.float64)
    whole = metrics.FeatureStats(dim=12)
    whole.add(f)
    merged = metrics.FeatureStats(dim=12, keep_features=True)
    for part in (f[:7], f[7:100], f[100:]):
        more = metrics.FeatureStats(dim=12, keep_features=True)
        more.add(part)
        buffer = io.BytesIO()
        torch.save(more.state(), buffer)
        merged.merge(metrics.FeatureStats.from_state(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)))
    mu, sigma = merged.statistics()
    assert merged.n == 300 and torch.equal(merged.all_features(), f.float())
    np.testing.assert_allclose(mu, f.mean(0).numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(f.numpy(), rowvar=False), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(sigma, whole.statistics()[1], rtol=1e-12, atol=1e-12)
    with pytest.raises(metrics.MetricsError, match='feature sets that do not match'):
        merged.merge(whole)


class PixelFeatures:
    """A stand-in extractor: the 16 pixels of 1x4x4 images."""
    dim, batch_size, is_fid_network, name = 16, 64, False, 'pixels'
    provenance = dict(feature_extractor='pixels', weights_source='not the FID network', weights_sha256=None)

    def __call__(self, images):
        return images.flatten(1).to(torch.float64)


NET = oracles.GaussianMixtureDenoiser([0.5, 0.5], [[0.5] * 16, [-0.5] * 16], [0.05, 0.05], shape=(1, 4, 4))
CTX = dict(rungs=[4, 12, 36], num_images=36, seed_blocks=2, batch_size=5, kid=False, precision_recall=False, class_idx=None)
TRIAL = dict(sampler='edm', num_steps=6, calibrated=False, snapshot_kimg=None)


@pytest.fixture
def generated(monkeypatch):
    """The seeds of every image the sampler generates, in order."""
    seeds, generate = [], metrics.samplers_mod.generate

    def recording(net, batch_seeds, *args, **kwargs):
        seeds.extend(int(s) for s in batch_seeds)
        return generate(net, batch_seeds, *args, **kwargs)
    monkeypatch.setattr(metrics.samplers_mod, 'generate', recording)
    return seeds


def _reference():
    g = torch.Generator().manual_seed(1)
    f = torch.randn(200, 16, generator=g, dtype=torch.float64) * 0.4 + 0.1
    return dict(mu=f.mean(0).numpy(), sigma=np.cov(f.numpy(), rowvar=False), count=200, sha256='x')


def _grow(trial=TRIAL, records=(), stats=None, report=None, saved=None, samples=None):
    reports, saved = [], [] if saved is None else saved

    def save(records, stats, samples):  # as save_state keeps them: through torch.save and a weights_only load
        buffer = io.BytesIO()
        torch.save(dict(records=records, stats=stats.state(), samples=samples), buffer)
        saved.append(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    result, new, samples = sweep.grow(NET, _reference(), PixelFeatures(), trial, CTX, list(records), stats, samples=samples,
                                      report=report or (lambda record, new: reports.append((dict(record), new))), save=save)
    return (result, new), reports, saved, samples


def test_a_promoted_trial_generates_no_image_twice_and_matches_one_pass(generated):
    """Rungs 4, 12, 36 and a second seed block: seeds 0..71 each generated once; each rung's
    value is the Frechet distance of the first n images in one pass, and the final result is
    metrics.evaluate's on the same seeds."""
    (result, new), reports, saved, _ = _grow()
    assert sorted(generated) == list(range(72)) and len(generated) == 72
    assert [(r['images'], n) for r, n in reports] == [(4, 4), (12, 8)] and new == 24 + 36
    reference = _reference()
    for record, _ in reports:
        single = metrics.evaluate(NET, reference, PixelFeatures(), record['images'], 'edm', batch_size=7, num_steps=6)
        assert record['frechet_distance'] == pytest.approx(single['frechet_distance'], rel=1e-9)
    full = metrics.evaluate(NET, reference, PixelFeatures(), 36, 'edm', seed_blocks=2, batch_size=7, num_steps=6)
    assert result['frechet_distance_blocks'] == pytest.approx(full['frechet_distance_blocks'], rel=1e-9)
    assert result['frechet_distance'] == pytest.approx(full['frechet_distance'], rel=1e-9)
    assert [s['records'][-1]['images'] for s in saved] == [4, 12]  # kept before each report


def test_a_trial_halted_at_each_rung_and_resumed_generates_no_image_twice(generated):
    """Synchronous halving runs a trial to one rung at a time (ctx stop_at): halted at 4, then at
    12, then to the end, each time from the kept sums, it generates seeds 0..71 once each and ends
    bit for bit where the trial grown in one go ends."""
    (whole, _), _, _, _ = _grow()
    generated.clear()
    records, stats, samples = [], None, None
    for stop_at in (4, 12):
        saved = []  # (records, sums, samples) as kept at each rung
        grown = sweep.grow(NET, _reference(), PixelFeatures(), TRIAL, dict(CTX, stop_at=stop_at), list(records), stats,
                           samples=samples, report=lambda record, new: None,
                           save=lambda r, st, sm: saved.append((list(r), metrics.FeatureStats.from_state(st.state()), sm)))
        assert grown is None and saved[-1][0][-1]['images'] == stop_at
        records, stats, samples = saved[-1]
    (resumed, new), _, _, _ = _grow(records=records, stats=stats, samples=samples)
    assert generated == list(range(72)) and new == 24 + 36
    assert resumed['frechet_distance_blocks'] == whole['frechet_distance_blocks']


class _Killed(Exception):
    pass


def test_a_killed_trial_resumes_from_its_sums_reusing_every_finished_rung(generated):
    """Killed at its second rung's report: the re-run reports rungs 4 and 12 again from the kept
    records (sampling nothing for them), continues from seed 12 and ends bit for bit where the
    uninterrupted trial ends."""
    (uninterrupted, _), reports, _, grid = _grow()
    generated.clear()
    saved = []

    def report(record, new):
        if record['images'] == 12:
            raise _Killed
    with pytest.raises(_Killed):
        _grow(report=report, saved=saved)
    assert generated == list(range(12))
    generated.clear()
    kept = saved[-1]
    (resumed, new), replayed, _, resumed_grid = _grow(records=kept['records'], stats=metrics.FeatureStats.from_state(kept['stats']),
                                                      samples=kept['samples'])
    assert torch.equal(resumed_grid, grid)  # the sample grid continues too
    assert [n for _, n in replayed] == [0, 0]
    values = lambda rs: [(r['images'], r['frechet_distance'], r['nfe']) for r, _ in rs]
    assert values(replayed) == values(reports)
    assert generated == list(range(12, 72)) and new == 24 + 36
    assert resumed['frechet_distance_blocks'] == uninterrupted['frechet_distance_blocks']


def test_paired_seeds_across_trials(generated):
    """Two settings see the same seeds at every rung: their comparison is paired."""
    _grow()
    first = list(generated)
    generated.clear()
    _grow(dict(TRIAL, num_steps=12, S_churn=10))
    assert generated == first


# ---------------------------------------------------------------------------------------------
# Optuna's search space and the calibration grid of a search.

SEARCH = dict(sweep__search__algorithm='optuna', sweep__search__num_samples=16, sweep__calibrated=[False, True],
              calibrate=dict(images=[500, 1000], chunk_size=500),
              sweep__samplers=[dict(sampler='edm', num_steps=dict(low=8, high=40, step=1), S_churn=dict(low=0, high=80),
                                    S_noise=dict(low=1.0, high=1.010), S_max=[50, float('inf')]),
                               dict(sampler='dpm_solver', order=[2, 3], steps=dict(low=10, high=20, step=2))])


def test_optuna_proposes_trials_inside_the_space_and_replays_kept_proposals():
    """Every proposal is a valid trial of one entry: ranges within bounds (integers for integer
    settings, on the step), lists and calibrations as categories; the parameters the driver keeps
    (everything but `trial`), enqueued in a new study, give the same trials (a re-run's resume)."""
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    s = _parse(**SEARCH)
    space = {st.name: st for st in plan.make_plan(s, 'results')}['sweep'].inputs['space']
    define, study = sweep.OptunaSpace(space), optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    proposals = []
    for _ in range(40):
        ot = study.ask()
        trial = define(ot)['trial']
        proposals.append((dict(ot.params), trial))
        study.tell(ot, 1.0)
        if trial['sampler'] == 'edm':
            assert 8 <= trial['num_steps'] <= 40 and isinstance(trial['num_steps'], int)
            assert 0 <= trial['S_churn'] <= 80 and 1.0 <= trial['S_noise'] <= 1.01 and trial['S_max'] in (50, float('inf'))
        else:
            assert trial['order'] in (2, 3) and trial['steps'] in range(10, 21, 2)
        assert trial['snapshot_kimg'] == s.train.total_kimg
        assert trial in [dict(t, **{k: trial[k] for k in spec.sampler_kwargs(trial)}, snapshot_kimg=trial['snapshot_kimg'])
                         for t in s.trials() if t['sampler'] == trial['sampler']]  # its calibration is one of the grid's
    assert {t['sampler'] for _, t in proposals} == {'edm', 'dpm_solver'}
    assert {sweep.calibration_name(t) for _, t in proposals} == {'uncalibrated', 'data/500', 'data/1000'}
    again = optuna.create_study()
    for params, _ in proposals:
        again.enqueue_trial(params)
    assert [define(again.ask())['trial'] for _ in proposals] == [t for _, t in proposals]


def test_a_search_over_ranges_calibrates_on_a_log_grid_spanning_every_queried_sigma():
    """Calibrated trials over continuous ranges: DEFAULT_GRID_POINTS log-spaced sigmas from EDM's
    sigma_min = 0.002 to the largest t_hat any setting reaches: sigma_max (1 + gamma) with
    gamma = min(S_churn / N, sqrt(2) - 1) (EDM Algorithm 2) at most 80 sqrt(2); calibrate.grid
    sets the count; interpolation is implied."""
    s = _parse(**dict(SEARCH, sweep__samplers=SEARCH['sweep__samplers'][:1]))  # EDM's sampler alone
    stages = {st.name: st for st in plan.make_plan(s, 'results')}
    grid = torch.tensor(stages['calibrate'].inputs['sigmas'][spec.snapshot_key(s.train.total_kimg)], dtype=torch.float64)
    assert len(grid) == plan.DEFAULT_GRID_POINTS and stages['sweep'].inputs['interpolate']
    assert grid[0].item() == pytest.approx(0.002, rel=1e-12) and grid[-1].item() == pytest.approx(80 * math.sqrt(2), rel=1e-12)
    ratios = grid[1:].log() - grid[:-1].log()
    assert torch.allclose(ratios, ratios[0].expand_as(ratios), rtol=1e-9)
    s = _parse(**SEARCH, calibrate__grid=dict(points=33))
    sigmas = {st.name: st for st in plan.make_plan(s, 'results')}['calibrate'].inputs['sigmas']
    assert [len(g) for g in sigmas.values()] == [33]
    # A grid of lists keeps the exact sigmas its trials query; uncalibrated searches need no grid.
    exact = _parse(calibrate=dict(images=500, chunk_size=500), sweep__calibrated=[True])
    assert plan.grid_points(exact) is None and not {st.name: st for st in plan.make_plan(exact, 'results')}['sweep'].inputs['interpolate']


# ---------------------------------------------------------------------------------------------
# A search on the embedded cluster, killed and run again.

def _orchestrator(*args):
    return [sys.executable, '-m', 'orchestrator', *args]


@needs_fashion
@pytest.mark.ray
def test_a_killed_search_reuses_every_finished_rung(tmp_path, ray_subprocess):
    """The driver and its cluster SIGKILLed once a trial has kept a rung: the re-run samples only
    what no earlier run measured (each trial's images beyond its kept rungs), its kept rung records
    land unchanged in rungs.parquet (the same seconds: not measured again), and every row is
    either finished (images = num_images, EDM's protocol) or stopped at a rung with that rung's
    first-block value."""
    from orchestrator.storage import Storage
    from tasks import train as tasks_train
    ds = data.load_dataset('fashion-mnist', pad_to_32=True, resolution=16, limit=64)
    tasks_train.train(tasks_train.TrainConfig(batch_size=16, total_kimg=0.016, kimg_per_tick=0.016), ds, str(tmp_path), progress=False)
    raw = dict(experiment='killed', seed=0, data=dict(name='fashion-mnist', pad_to_32=True, resolution=16, limit=64),
               model=dict(checkpoint=str(tmp_path / tasks_train.NETWORK)),
               sweep=dict(samplers=[dict(sampler='dpm_solver', order=2, method='multistep', steps=[4, 6, 8])], calibrated=[False],
                          search=dict(min_images=4, reduction_factor=2)),
               evaluate=dict(num_images=16, reference_images=16, batch_size=4))
    path, root = tmp_path / 'killed.yaml', tmp_path / 'results'
    path.write_text(yaml.safe_dump(raw))
    cwd = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen(_orchestrator('run', str(path), '--results', str(root)), cwd=cwd, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    storage, deadline = Storage(str(root)), time.time() + 300
    try:
        while not any(n.endswith('.state.pt') for n in storage.list('.trials')) and time.time() < deadline:
            assert proc.poll() is None, 'the run ended before any rung was kept'
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
        subprocess.run(['pkill', '-9', '-f', rf'session_[0-9_-]+_{proc.pid}\b'])
    # A trial's worker outlives its raylet for a moment (its command line does not name the
    # session) and may still keep a rung: read what is kept once nothing changes any more.
    snapshot = lambda: {n: os.stat(root / '.trials' / n).st_mtime for n in os.listdir(root / '.trials')}
    last, stable = snapshot(), 0
    while stable < 3 and time.time() < deadline + 60:
        time.sleep(1)
        now = snapshot()
        stable, last = (stable + 1 if now == last else 0), now
    kept = {}
    for name in storage.list('.trials'):
        h = name.split('.')[0]
        if name.endswith('.state.pt'):
            kept[h] = sweep.load_state(storage, h)[0]
        elif name.endswith('.json') and not name.startswith('search-'):
            kept[h] = storage.read_json(f'.trials/{name}')['rungs']
    assert kept, 'no rung was kept before the kill'
    out = subprocess.run(_orchestrator('run', str(path), '--results', str(root)), cwd=cwd, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    import pandas as pd
    rows = pd.read_parquet(root / 'killed' / 'sweep.parquet').set_index('trial_hash')
    rungs = pd.read_parquet(root / 'killed' / 'rungs.parquet')
    assert len(rows) == 3
    for h, row in rows.iterrows():
        mine = rungs[rungs['trial_hash'] == h].sort_values('images')
        assert list(mine['images']) == [4, 8, 16][:len(mine)] and mine['images'].iloc[-1] == row['images']
        if row['stopped']:
            assert row['images'] < 16 and row['fid'] == mine['fid'].iloc[-1]
        else:
            assert row['images'] == 16 and row['num_samples'] == 16
        for record in kept.get(h, []):  # kept before the kill: reported again, not measured again
            again = mine[mine['images'] == record['images']].iloc[0]
            assert (again['fid'], again['seconds']) == (record['fid'], record['seconds'])
    expected = sum(row['images'] - (kept[h][-1]['images'] if kept.get(h) else 0) for h, row in rows.iterrows())
    assert f'sweep: {expected} image(s) sampled in this run' in out.stdout, out.stdout[-3000:]
    # Synchronous halving (the default over a grid): the promotions are those of the recorded
    # rung values, however the kill fell: 3 trials at 4 images, the best 2 at 8, the best at 16.
    reached = {h: dict(zip(g['images'], g['fid'])) for h, g in rungs.groupby('trial_hash')}
    inside = sweep.halving(reached, [4, 8, 16], 2)
    assert [len(i) for i in inside] == [3, 2, 1]
    for k, n in enumerate([4, 8, 16]):
        assert sorted(rungs[rungs['images'] == n]['trial_hash']) == inside[k]
    assert (rows['images_generated'] == [16 if h in inside[-1] else row['images'] for h, row in rows.iterrows()]).all()
    assert f'sweep: the 3 trial(s) generated {rows["images_generated"].sum()} image(s), ' \
           f'{100 * rows["images_generated"].sum() / 48:.1f}% of the grid\'s 48' in out.stdout, out.stdout[-3000:]


def test_the_search_specs_search_what_the_papers_gridded():
    """edm-stochastic-search: EDM Sec. 4's four stochastic parameters as ranges around EDM's
    CIFAR-10 choice (S_churn 30, S_tmin 0.01, S_tmax 1, S_noise 1.007), ASHA + Optuna, EDM's
    protocol at the last rung; calib-table1-search: calib-table1's grid, halved."""
    with open('specs/edm-stochastic-search.yaml') as f:
        edm = yaml.safe_load(f)
    entry, search = edm['sweep']['samplers'][0], edm['sweep']['search']
    for name, value in dict(S_churn=30, S_min=0.01, S_max=1, S_noise=1.007).items():
        assert entry[name]['low'] <= value <= entry[name]['high'], name
    assert (search['scheduler'], search['algorithm'], edm['evaluate']['num_images'], edm['evaluate']['seed_blocks']) == \
        ('asha', 'optuna', 50000, 3)
    with open('specs/edm-cifar10-pretrained.yaml') as f:
        assert edm['model'] == yaml.safe_load(f)['model']
    with open('specs/calib-table1.yaml') as f:
        table1 = yaml.safe_load(f)
    with open('specs/calib-table1-search.yaml') as f:
        searched = yaml.safe_load(f)
    assert searched['sweep'].pop('search')['scheduler'] == 'sha' and searched['sweep'] == table1['sweep']
    assert {k: v for k, v in searched.items() if k != 'experiment'} == {k: v for k, v in table1.items() if k != 'experiment'}


def _interpolation_error(points, c, lo=0.002, hi=80 * math.sqrt(2)):
    """Max relative error of the table's log-sigma interpolation of c (exact at the grid points)
    at every log-midpoint and at 200 log-uniform sigmas in between."""
    from tasks import calibration
    grid = torch.logspace(math.log10(lo), math.log10(hi), points, dtype=torch.float64)
    table = calibration.CalibrationTable(grid, (1,))
    for k, s in enumerate(grid):
        table.add(k, c(s).reshape(1, 1), torch.zeros(1, 1))
    g = torch.Generator().manual_seed(0)
    between = torch.cat([(grid[1:] * grid[:-1]).sqrt(),
                         torch.exp(math.log(lo) + torch.rand(200, generator=g, dtype=torch.float64) * math.log(hi / lo))])
    exact = torch.stack([c(s) for s in between])
    return float(((table.lookup(between, interpolate=True).reshape(-1) - exact).abs() / exact.abs()).max())


@pytest.mark.parametrize('shift, v_model', [(1.0, 0.5), (-2.0, 4.0), (1.0, 0.01)])
def test_the_default_calibration_grid_interpolates_within_one_percent(shift, v_model):
    """Data N(m, v), model the exact denoiser of N(m', v'): c(sigma) = E[D] - E[y]
    = (m' - m) sigma^2 / (sigma^2 + v') (the estimator agrees: the next test).
    Where c ~ sigma^2, interpolation in log sigma errs by cosh(h) - 1 for a step h: under 1% needs
    h <= arccosh(1.01), 79 points over EDM's 0.002 .. 80 sqrt(2). The default grid is within 1%,
    a coarser one (65 points) is not."""
    c = lambda s: torch.as_tensor(shift * s ** 2 / (s ** 2 + v_model), dtype=torch.float64)
    assert _interpolation_error(plan.DEFAULT_GRID_POINTS, c) < 0.01
    assert _interpolation_error(65, c) > 0.01
    needed = 1 + math.log(80 * math.sqrt(2) / 0.002) / math.acosh(1.01)
    assert plan.DEFAULT_GRID_POINTS >= math.ceil(needed) == 79


def test_the_gaussian_closed_form_is_what_the_estimator_estimates():
    """The closed form above against tasks.calibration.estimate_table on the oracle denoiser of
    N(m', v') with data from N(m, v): within 4 standard errors at several sigmas."""
    from tasks import calibration
    m, v, m_model, v_model = 0.0, 1.0, -1.0, 0.5
    net = oracles.GaussianMixtureDenoiser([1.0], [[m_model]], [v_model])
    y = m + math.sqrt(v) * torch.randn(20000, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sigmas = [0.05, 0.5, 1.0, 5.0]
    table = calibration.estimate_table(net, y, sigmas, chunk_size=5000)
    for k, s in enumerate(sigmas):
        expected = (m_model - m) * s ** 2 / (s ** 2 + v_model)
        assert abs(float(table.offset()[0, k, 0]) - expected) < 4 * float(table.standard_error()[0, k, 0]) + 1e-12


def test_the_sample_grid_is_the_images_the_trial_measured(generated, tmp_path):
    """The grid a trial keeps holds its first min(64, images) samples, seeds 0.. in order: the
    very pixels whose features it measured (the stand-in's features are the pixels), and the PNG
    written from them reads back as those pixels."""
    import PIL.Image
    from orchestrator.storage import Storage
    measured = []

    class Recording(PixelFeatures):
        def __call__(self, images):
            measured.append(images.clone())
            return super().__call__(images)
    features = Recording()
    result, new, samples = sweep.grow(NET, _reference(), features, TRIAL, dict(CTX, rungs=[4, 12, 72], num_images=72), [], None,
                                      report=lambda *a: None, save=lambda *a: None)
    assert samples.dtype == torch.uint8 and len(samples) == 64 and torch.equal(samples, torch.cat(measured)[:64])
    assert generated[:64] == list(range(64))
    storage = Storage(str(tmp_path))
    sweep.save_samples(storage, 'h', samples)
    png = torch.from_numpy(np.array(PIL.Image.open(storage.path(sweep.samples_key('h')))))
    upscale = 64 // 4
    for i in (0, 9, 63):  # 8 a row, each pixel repeated `upscale` times
        r, c = divmod(i, 8)
        tile = png[r * 4 * upscale:(r + 1) * 4 * upscale:upscale, c * 4 * upscale:(c + 1) * 4 * upscale:upscale]
        assert torch.equal(tile, samples[i, 0])
    _, _, small = sweep.grow(NET, _reference(), PixelFeatures(), TRIAL, dict(CTX, rungs=[4, 12], num_images=12, seed_blocks=1),
                             [], None, report=lambda *a: None, save=lambda *a: None)
    assert len(small) == 12  # min(64, images generated)


# ---------------------------------------------------------------------------------------------
# Synchronous successive halving (sweep.search.scheduler: sha): a pure function of the rung values.

def test_halving_promotes_the_best_of_every_rung_as_by_hand():
    """12 trials, rungs 25/50/100/200, factor 2: 12 run the first rung, the best 6 by its value go
    on, then 3, then 2 (ceil(3 / 2)); each cut reads only that rung's values."""
    rungs = [25, 50, 100, 200]
    first = dict(a=9.0, b=3.0, c=7.0, d=1.0, e=12.0, f=5.0, g=2.0, h=11.0, i=4.0, j=8.0, k=6.0, l=10.0)
    reached = {h: {25: v} for h, v in first.items()}
    assert sweep.halving(reached, rungs, 2) == [sorted(first), ['b', 'd', 'f', 'g', 'i', 'k']]  # not yet measured at 50
    for h, v in dict(b=6.0, d=2.0, f=1.0, g=5.0, i=3.0, k=4.0).items():  # the order changes at rung 50
        reached[h][50] = v
    for h, v in dict(d=3.0, f=1.0, i=2.0).items():
        reached[h][100] = v
    assert sweep.halving(reached, rungs, 2) == [sorted(first), ['b', 'd', 'f', 'g', 'i', 'k'], ['d', 'f', 'i'], ['f', 'i']]
    # One trial of a rung not measured yet: nothing is decided beyond it.
    del reached['i'][100]
    assert sweep.halving(reached, rungs, 2)[-1] == ['d', 'f', 'i']


def test_halving_with_a_non_integer_factor_a_failed_trial_and_ties():
    """Factor 2.5: 12 -> ceil(4.8) = 5 -> 2 -> 1. A failed trial (NaN) ranks last and a tie goes
    to the smaller trial hash; a NaN never enters a comparison."""
    rungs = [10, 25, 63, 100]
    reached = {f'{i:02x}': {10: float(i)} for i in range(12)}
    reached['00'][10] = math.nan  # the best value's slot, failed: ranks last
    reached['07'][10] = 1.0       # ties with '01': '01' first
    in_25 = ['01', '07', '02', '03', '04']
    for h, v in zip(in_25, (5.0, 5.0, 1.0, math.nan, 2.0)):
        reached[h][25] = v
    reached['02'][63], reached['04'][63] = 3.0, 3.0
    out = sweep.halving(reached, rungs, 2.5)
    assert out == [sorted(reached), sorted(in_25), ['02', '04'], ['02']]
    # Every trial failed at the first rung: the cut still keeps ceil(n / factor), by hash.
    failed = {h: {10: math.nan} for h in ('c', 'a', 'b')}
    assert sweep.halving(failed, [10, 20], 2)[1] == ['a', 'b']
