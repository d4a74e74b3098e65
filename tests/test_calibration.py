import math
import random

import pytest
import torch

from tasks import calibration, data, oracles, precond, samplers, schedules, train

SHAPE = (1, 4, 4)
SIGMAS = [0.02, 0.1, 0.5, 2.0, 10.0]


def _gaussian_images(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *SHAPE, generator=g) * 0.5 + torch.linspace(-0.5, 0.5, 16).reshape(SHAPE)


class Biased:
    """An exact denoiser plus a known offset b(sigma) (smooth in log sigma)."""

    def __init__(self, oracle):
        self.oracle = oracle
        self.sigma_min, self.sigma_max = 0.0, float('inf')
        self.img_channels, self.img_resolution = 1, 4
        self.pattern = torch.linspace(-1, 1, 16, dtype=torch.float64).reshape(SHAPE)

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    def fingerprint(self):
        return 'biased-' + self.oracle.fingerprint()

    def bias(self, sigma):
        s = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1, 1, 1)
        return 0.3 * torch.tanh(s.log()) * self.pattern

    def __call__(self, x, sigma, class_labels=None):
        return self.oracle(x, sigma) + self.bias(sigma).to(x.dtype)


@pytest.fixture(scope='module')
def gmm():
    w, m, v = data.toy_mixture('grid9', std=0.4)
    return oracles.GaussianMixtureDenoiser(w, m.repeat(1, 8) * 0.5, v, shape=SHAPE)


def test_ideal_denoiser_term_is_zero_on_its_data_and_not_on_held_out():
    """Calib Eq. 13: for the ideal denoiser of a dataset, E_q[D] - E[y] = 0 on that dataset
    (within the Monte Carlo error at every sigma) and != 0 on held-out data at small sigma."""
    train_images = _gaussian_images(64, 0)
    oracle = oracles.IdealDenoiser(train_images)
    own = calibration.estimate_table(oracle, train_images, SIGMAS, chunk_size=16, noise_draws=16, seed=1)
    c, se = own.offset()[0], own.standard_error()[0]
    assert torch.all(c.abs() <= 5 * se + 1e-12)
    # The standard error treats images as drawn from the data distribution; using every training
    # image once cancels the between-image variance here, so it is conservative (E z^2 < 1).
    ok = se > 1e-6
    assert float(((c[ok] / se[ok]) ** 2).mean()) < 1.5

    held_out = _gaussian_images(4000, 1)
    other = calibration.estimate_table(oracle, held_out, SIGMAS[:1], chunk_size=1000, seed=2)
    c, se = other.offset()[0, 0], other.standard_error()[0, 0]
    assert float((c ** 2).sum()) > 25 * float((se ** 2).sum())


def test_biased_denoiser_offset_recovered_and_dsm_gap_eq27(gmm):
    """Calibrating an oracle + b(sigma) recovers b within its standard error, and lowers the DSM
    objective by exactly what Eq. 27 predicts on fresh samples."""
    net = Biased(gmm)
    y = gmm.sample(8000, generator=torch.Generator().manual_seed(0)).to(torch.float32)
    table = calibration.estimate_table(net, y, SIGMAS, chunk_size=2000, seed=3)
    c, se = table.offset()[0], table.standard_error()[0]
    b = net.bias(table.sigmas)
    assert torch.all((c - b).abs() <= 5 * se)

    gap = calibration.dsm_gap(table)
    assert torch.allclose(gap['data'], (b.flatten(1) ** 2).sum(1), rtol=0.05)
    assert torch.allclose(gap['noise'], gap['data'] / table.sigmas ** 2)

    cal = calibration.CalibratedDenoiser(net, table)
    y_fresh = gmm.sample(20000, generator=torch.Generator().manual_seed(9))
    for k, sigma in enumerate(SIGMAS):
        x = y_fresh + sigma * torch.randn(y_fresh.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(k))
        r = net(x, sigma) - y_fresh
        delta = (r ** 2).flatten(1).sum(1) - ((cal(x, sigma) - y_fresh) ** 2).flatten(1).sum(1)
        predicted = 2 * float((c[k] * b[k]).sum()) - float((c[k] ** 2).sum())  # E||D-y||^2 - E||D-c-y||^2
        se_delta = float(delta.std()) / math.sqrt(len(delta))
        assert abs(float(delta.mean()) - predicted) < 4 * se_delta + 1e-9, (sigma, float(delta.mean()), predicted)
        assert float(delta.mean()) > 0


def test_merge_is_exact_for_any_partition_and_batch_size(gmm):
    net = Biased(gmm)
    y = gmm.sample(80, generator=torch.Generator().manual_seed(0)).to(torch.float32)
    kw = dict(sigmas=SIGMAS, chunk_size=10, seed=5, noise_draws=2, flips=True)
    whole = calibration.estimate_table(net, y, batch_size=64, **kw)
    for workers in (1, 3, 8):
        groups = data.assign_chunks(8, workers)
        parts = [calibration.estimate_table(net, y, chunk_indices=g, batch_size=7, **kw) for g in groups if g]
        random.Random(workers).shuffle(parts)
        merged = parts[0]
        for p in parts[1:]:
            merged = merged.merge(p)
        assert merged.chunks == set(range(8)) and merged.meta['image_count'] == 80
        assert torch.equal(merged.count, whole.count)
        for name in ('sum_D', 'sum_y', 'sum_r2'):
            a, b = getattr(merged, name), getattr(whole, name)
            assert float((a - b).abs().max()) <= 1e-12 * float(b.abs().max()), name
    with pytest.raises(calibration.CalibrationError, match='counted twice'):
        whole.merge(whole)


def test_standard_error_shrinks_as_one_over_sqrt_n(gmm):
    net = Biased(gmm)
    y = gmm.sample(6400, generator=torch.Generator().manual_seed(1)).to(torch.float32)
    small = calibration.estimate_table(net, y[:1600], [1.0], chunk_size=400, seed=0)
    large = calibration.estimate_table(net, y, [1.0], chunk_size=400, seed=0)
    ratio = float(small.standard_error().mean() / large.standard_error().mean())
    assert ratio == pytest.approx(2.0, rel=0.1)


def test_calibrated_denoiser_has_zero_mean_term(gmm):
    net = Biased(gmm)
    y = gmm.sample(4000, generator=torch.Generator().manual_seed(2)).to(torch.float32)
    table = calibration.estimate_table(net, y, SIGMAS, chunk_size=1000, seed=1)
    cal = calibration.CalibratedDenoiser(net, table)
    y2 = gmm.sample(4000, generator=torch.Generator().manual_seed(3)).to(torch.float32)
    after = calibration.estimate_table(cal, y2, SIGMAS, chunk_size=1000, seed=2)
    # Residual: the first table's own estimation error plus this one's, both ~ se.
    assert torch.all(after.offset().abs() <= 5 * (after.standard_error() + table.standard_error()))
    assert float(after.offset().square().sum()) < 0.05 * float(table.offset().square().sum())


SAMPLER_CONFIGS = [
    ('edm', dict(num_steps=8)),
    ('edm', dict(num_steps=8, S_churn=20, S_min=0.05, S_max=20, S_noise=1.003)),
    ('ablation', dict(num_steps=8, solver='euler', discretization='vp', schedule='vp', scaling='vp')),
    ('ablation', dict(num_steps=8, solver='heun', discretization='ve', schedule='ve')),
    ('ablation', dict(num_steps=8, solver='heun', discretization='iddpm')),
] + [('dpm_solver', dict(steps=10, order=o, method=m, algorithm_type=a))
     for o in (1, 2, 3) for m in samplers.DPM_METHODS for a in samplers.DPM_ALGORITHMS]


def test_one_table_serves_every_sampler(gmm):
    """The union of the sigmas each configuration queries is estimated once; every sampler of
    the core then samples with the calibrated denoiser, looking sigmas up exactly."""
    net = Biased(gmm)
    grids = [calibration.queried_sigmas(name, net, **kw) for name, kw in SAMPLER_CONFIGS]
    grid = calibration.union_sigmas(*grids)
    assert len(grid) < sum(len(g) for g in grids)  # shared sigmas are estimated once
    y = gmm.sample(64, generator=torch.Generator().manual_seed(4)).to(torch.float32)
    table = calibration.estimate_table(net, y, grid, chunk_size=64)
    latents = torch.randn(16, *SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for name, kw in SAMPLER_CONFIGS:
        cal = calibration.CalibratedDenoiser(net, table, context=f'{name} {kw}')
        x, nfe = samplers.get_sampler(name)(cal, latents, return_nfe=True, **kw)
        assert torch.isfinite(x).all() and nfe > 0


@pytest.mark.parametrize('name,kw', SAMPLER_CONFIGS)
def test_queried_sigmas_are_exactly_what_sampling_asks(gmm, name, kw):
    rec = samplers.CountedDenoiser(gmm, record_sigmas=True)
    samplers.get_sampler(name)(rec, torch.randn(3, *SHAPE, dtype=torch.float64), **kw)
    assert calibration.queried_sigmas(name, gmm, **kw).tolist() == sorted(set(rec.sigmas))


def test_queried_sigmas_match_sampler_rules(gmm):
    edm = calibration.queried_sigmas('edm', gmm, num_steps=18)
    assert torch.allclose(edm, samplers.schedules.edm_sigma_steps(18).flip(0))
    churn = calibration.queried_sigmas('edm', gmm, num_steps=18, S_churn=40, S_min=0.05, S_max=50)
    assert len(churn) > 18  # sigma-hats are added
    fast = calibration.queried_sigmas('dpm_solver', gmm, steps=10, order=3, method='singlestep')
    assert len(fast) == 10  # every evaluation at a distinct sigma


def test_grid_miss_names_sigma_and_sampler(gmm):
    net = Biased(gmm)
    y = gmm.sample(32, generator=torch.Generator().manual_seed(5)).to(torch.float32)
    table = calibration.estimate_table(net, y, calibration.queried_sigmas('edm', net, num_steps=8), chunk_size=32)
    cal = calibration.CalibratedDenoiser(net, table, context='dpm_solver order 2 NFE 10')
    with pytest.raises(calibration.CalibrationError, match=r'sigma .* \(asked by dpm_solver order 2 NFE 10\) is not on the calibration grid'):
        samplers.dpm_solver_sampler(cal, torch.zeros(2, *SHAPE, dtype=torch.float64), steps=10, order=2)


def test_log_sigma_interpolation_only_when_asked():
    table = calibration.CalibrationTable([0.1, 1.0, 10.0], (2,))
    for k, s in enumerate([0.1, 1.0, 10.0]):
        table.add(k, torch.full((1, 2), math.log(s), dtype=torch.float64), torch.zeros(1, 2, dtype=torch.float64))
    with pytest.raises(calibration.CalibrationError, match='not on the calibration grid'):
        table.lookup(0.5)
    assert torch.allclose(table.lookup(0.5, interpolate=True), torch.full((1, 2), math.log(0.5), dtype=torch.float64))
    assert torch.allclose(table.lookup(torch.tensor([1.0, 10.0])), torch.tensor([[0.0, 0.0], [math.log(10)] * 2], dtype=torch.float64))
    with pytest.raises(calibration.CalibrationError, match='does not extrapolate'):
        table.lookup(20.0, interpolate=True)


def test_per_class_terms():
    """A class-conditional table subtracts each class's own term; the pooled term is their
    count-weighted mean."""
    images = torch.cat([_gaussian_images(40, 0) + 1, _gaussian_images(60, 1) - 1])
    labels = torch.tensor([0] * 40 + [1] * 60)
    net = oracles.IdealDenoiser(images[::2], labels=labels[::2])  # trained on half: nonzero terms
    table = calibration.estimate_table(net, images, [0.05, 0.5], labels=labels, num_classes=2, chunk_size=25, seed=0)
    per_class = table.offset(per_class=True)
    pooled = table.offset()[0]
    assert torch.allclose(pooled, (40 * per_class[0] + 60 * per_class[1]) / 100)
    onehot = torch.eye(2)[[1, 0, 1]]
    got = table.lookup(0.5, onehot)
    assert torch.allclose(got, per_class[[1, 0, 1], 1])
    cal = calibration.CalibratedDenoiser(net, table)
    x = torch.randn(3, *SHAPE)
    assert torch.allclose(cal(x, 0.5, onehot), net(x, 0.5, onehot) - per_class[[1, 0, 1], 1].to(x.dtype))


def test_file_round_trip_and_refusals(tmp_path, gmm):
    net = Biased(gmm)
    y = gmm.sample(40, generator=torch.Generator().manual_seed(6)).to(torch.float32)
    meta = dict(model=calibration.fingerprint(net), dataset='gmm-grid9', source='data')
    table = calibration.estimate_table(net, y, SIGMAS, chunk_size=10, noise_draws=3, flips=True, seed=11, meta=meta)
    table.save(tmp_path / 't.pt')
    loaded = calibration.CalibrationTable.load(tmp_path / 't.pt')
    assert loaded.meta == table.meta and loaded.chunks == table.chunks
    assert {k: loaded.meta[k] for k in ('image_count', 'seed', 'noise_draws', 'flips', 'chunk_size', 'source')} == \
        dict(image_count=40, seed=11, noise_draws=3, flips=True, chunk_size=10, source='data')
    for name in ('sigmas', 'sum_D', 'sum_y', 'sum_r2', 'count'):
        assert torch.equal(getattr(loaded, name), getattr(table, name))

    with pytest.raises(calibration.CalibrationError, match="field 'model' differs"):
        loaded.check_compatible(dict(model=calibration.fingerprint(gmm)))
    with pytest.raises(calibration.CalibrationError, match="field 'shape' differs"):
        loaded.check_compatible(dict(shape=[3, 32, 32]))
    (tmp_path / 'bad.pt').write_bytes(b'not a table')
    with pytest.raises(calibration.CalibrationError, match='bad.pt: not a readable calibration table'):
        calibration.CalibrationTable.load(tmp_path / 'bad.pt')
    torch.save({'format': 'other'}, tmp_path / 'other.pt')
    with pytest.raises(calibration.CalibrationError, match="other.pt: not a calibration table"):
        calibration.CalibrationTable.load(tmp_path / 'other.pt')
    state = table.state()  # a table file whose sums hold NaN: refused, never subtracted
    state['sum_D'][0, 1] = float('nan')
    torch.save(state, tmp_path / 'nan.pt')
    with pytest.raises(calibration.CalibrationError, match='nan.pt: sum_D holds NaN or infinite values'):
        calibration.CalibrationTable.load(tmp_path / 'nan.pt')
    # A denoiser whose D is not finite at one sigma: no table, one line naming the sigma and images.
    broken = lambda x, sigma, labels=None: torch.where(torch.as_tensor(sigma).reshape(-1, *[1] * (x.ndim - 1)) > 1, torch.nan,
                                                       net(x, sigma, labels))
    with pytest.raises(calibration.CalibrationError, match=r'non-finite values at sigma 2 for images 0\.\.9 \(chunk 0\)'):
        calibration.estimate_table(broken, y, SIGMAS, chunk_size=10)


def test_eq26_terms_match_parametrizations():
    """Subtracting each parametrization's term gives the same calibrated model as D - c."""
    ns = schedules.VPLinearNoiseSchedule()
    t = torch.tensor(0.3, dtype=torch.float64)
    alpha, std = ns.alpha(t), ns.std(t)
    sigma = std / alpha
    g = torch.Generator().manual_seed(0)
    D, c, x = (torch.randn(4, 3, dtype=torch.float64, generator=g) for _ in range(3))
    x_t = alpha * x
    for kind in precond.PREDICTIONS:
        out = precond.data_to_prediction(D, x_t, alpha, std, kind)
        out_cal = precond.data_to_prediction(D - c, x_t, alpha, std, kind)
        assert torch.allclose(out - out_cal, calibration.calibration_term(c, sigma, kind, alpha), rtol=1e-10, atol=1e-12)


def test_figure1_terms_and_likelihood_gain():
    ns = schedules.VPLinearNoiseSchedule(0.1, 20.0)
    t = torch.linspace(0.05, 1.0, 400, dtype=torch.float64)  # smooth part: the integrand grows like 1/t^2 near 0
    table = calibration.CalibrationTable(ns.sigma(t), (2,))
    a = torch.tensor([[0.3, -0.4]], dtype=torch.float64)  # constant offset c
    for k in range(len(table.sigmas)):
        table.add(k, a, torch.zeros_like(a))
    terms = calibration.likelihood_terms(table, ns)
    e2 = 0.25 / table.sigmas ** 2
    beta = 0.1 + terms['t'] * 19.9
    assert torch.allclose(terms['half_sq'], 0.5 * e2)
    assert torch.allclose(terms['weighted'], beta / (2 * ns.std(terms['t']) ** 2) * e2, rtol=1e-6)
    # g^2 / (2 std^2) * 0.25 alpha^2 / std^2 integrated numerically on a finer grid.
    tt = torch.linspace(0.05, 1.0, 20001, dtype=torch.float64)
    fine = (0.1 + tt * 19.9) / (2 * ns.std(tt) ** 2) * 0.25 / ns.sigma(tt) ** 2
    # ... which Eq. 11's gain, taken as the integral over ln sigma whatever the schedule, must equal.
    gain = calibration.likelihood_gain(table)
    assert gain['nats'] == pytest.approx(float(torch.trapezoid(fine, tt)), rel=1e-3) and gain['grid_points'] == 400


def _gains(offset, repeats=400):
    """likelihood_gain of `repeats` independent tables: 20 images, 3 pixels, D - y = (offset +
    N(0, 0.5^2)) * sigma at five sigmas spanning ln 100."""
    sigmas = torch.tensor([0.1, 0.3, 1.0, 3.0, 10.0], dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(repeats):
        table = calibration.CalibrationTable(sigmas, (3,))
        for k in range(len(sigmas)):
            r = (offset + torch.randn(20, 3, generator=gen, dtype=torch.float64) * 0.5) * sigmas[k]
            table.add(k, r, torch.zeros_like(r))
        out.append(calibration.likelihood_gain(table))
    return torch.tensor([g['nats'] for g in out]), torch.tensor([g['se'] for g in out]), torch.tensor([g['noise_floor'] for g in out])


def test_likelihood_gain_noise_floor_and_standard_error():
    """With E eps = 0 the Monte Carlo estimate of ||E eps||^2 is biased upward by its variance:
    the gain averages to the reported noise floor (3 pixels x 0.25 / 20 images per sigma, over
    ln 100). With a real offset (||E eps||^2 = 3 at every sigma: gain 3 ln 100) the estimate is
    unbiased up to that floor and the delta-method SE is the spread of the gain over tables."""
    floor = 3 * 0.25 / 20 * math.log(100)
    gains, _, floors = _gains(0.0)
    assert float(gains.mean()) == pytest.approx(floor, rel=0.05) and float(floors.mean()) == pytest.approx(floor, rel=0.05)
    gains, ses, _ = _gains(1.0)
    assert float(gains.mean()) == pytest.approx(3 * math.log(100) + floor, rel=0.02)
    assert float(gains.std()) == pytest.approx(float(ses.mean()), rel=0.1)


def test_generated_data_calibration(gmm):
    net = Biased(gmm)
    ds = calibration.generated_dataset(net, 32, 'edm', num_steps=6)
    assert ds.images.dtype == torch.uint8 and ds.images.shape == (32, *SHAPE) and ds.name == 'generated:edm'
    table = calibration.estimate_table(net, ds.images, [0.5], chunk_size=16, meta=dict(source='generated'))
    assert table.meta['source'] == 'generated' and table.meta['image_count'] == 32


def test_dynamic_recording_post_hoc_converges_to_table(gmm, offset_net_fit):
    """h_phi trained post hoc on a frozen biased oracle approaches the table's c(sigma)."""
    net = Biased(gmm)
    y = gmm.sample(8000, generator=torch.Generator().manual_seed(7)).to(torch.float32)
    grid = torch.logspace(-1.5, 1, 8, dtype=torch.float64)
    table = calibration.estimate_table(net, y, grid, chunk_size=2000, seed=1)
    torch.manual_seed(0)
    h = offset_net_fit(net, y, steps=1500, batch_size=256, lr=3e-3, seed=0)
    mse, scale = calibration.offset_mse(h, table), float(table.offset().square().mean())
    assert mse < 0.05 * scale, (mse, scale)
    cal = calibration.CalibratedDenoiser(net, h)  # usable in place of a table
    assert torch.isfinite(samplers.edm_sampler(cal, torch.randn(4, *SHAPE, dtype=torch.float64), num_steps=6)).all()


def test_dynamic_recording_during_training(tmp_path):
    images = (torch.rand(64, 1, 8, 8) * 255).to(torch.uint8)
    ds = data.ImageDataset(images, torch.zeros(64, dtype=torch.long), 'noise')
    table = calibration.CalibrationTable([0.5, 2.0], (1, 8, 8))
    table.add(0, torch.zeros(1, 1, 8, 8, dtype=torch.float64), torch.zeros(1, 1, 8, 8, dtype=torch.float64))
    table.add(1, torch.zeros(1, 1, 8, 8, dtype=torch.float64), torch.zeros(1, 1, 8, 8, dtype=torch.float64))
    table.save(tmp_path / 'ref.pt')
    config = train.TrainConfig(preset='ddpmpp-tiny', batch_size=16, total_kimg=0.064, kimg_per_tick=0.032,
                               dynamic_recording=True, recording_table=str(tmp_path / 'ref.pt'))
    log = train.train(config, ds, str(tmp_path / 'run'), progress=False)
    assert all('offset_mse' in r and math.isfinite(r['offset_mse']) for r in log)
    blob = torch.load(tmp_path / 'run' / train.NETWORK, weights_only=True)
    assert blob['offset_net'] is not None


def test_mean_eps_figure(tmp_path, gmm):
    net = Biased(gmm)
    y = gmm.sample(64, generator=torch.Generator().manual_seed(8)).to(torch.float32)
    table = calibration.estimate_table(net, y, SIGMAS, chunk_size=64)
    calibration.save_mean_eps_figure(table, tmp_path / 'fig3.png', num_sigmas=5)
    assert (tmp_path / 'fig3.png').stat().st_size > 1000


# ---------------------------------------------------------------------------------------------
# Argument forms (field report "The Python API guesses at what it was given"): each accepted
# form gives the same result; every other form is refused with a message naming the argument.

import numpy as np


def _per_class_setup():
    images = torch.cat([_gaussian_images(40, 0) + 1, _gaussian_images(60, 1) - 1]) / 3  # within [-1, 1]
    labels = torch.tensor([0] * 40 + [1] * 60)
    return images, labels, oracles.IdealDenoiser(images[::2], labels=labels[::2])


def _same_table(a, b):
    return all(torch.equal(getattr(a, name), getattr(b, name)) for name in ('sigmas', 'sum_D', 'sum_y', 'sum_r2', 'count'))


def test_labels_as_indices_or_one_hot_give_the_same_table_and_lookup():
    images, labels, net = _per_class_setup()
    kw = dict(sigmas=[0.05, 0.5], num_classes=2, chunk_size=25, seed=0)
    reference = calibration.estimate_table(net, images, labels=labels, **kw)
    for form in (labels.to(torch.int32), labels.tolist(), labels.numpy(), torch.eye(2)[labels], torch.eye(2, dtype=torch.float64)[labels]):
        assert _same_table(calibration.estimate_table(net, images, labels=form, **kw), reference)
    one_hot = torch.eye(2)[[1, 0, 1]]
    expected = reference.lookup(0.5, one_hot)
    for form in (torch.tensor([1, 0, 1]), [1, 0, 1], torch.tensor([1, 0, 1], dtype=torch.int32)):
        assert torch.equal(reference.lookup(0.5, form), expected)  # indices were once read as class 0
    a, b = calibration.CalibrationTable([0.5], SHAPE, 2), calibration.CalibrationTable([0.5], SHAPE, 2)
    D, y = torch.randn(3, *SHAPE, dtype=torch.float64), torch.zeros(3, *SHAPE, dtype=torch.float64)
    a.add(0, D, y, torch.tensor([1, 0, 1]))
    b.add(0, D, y, one_hot)
    assert _same_table(a, b)


@pytest.mark.parametrize('labels,match', [
    (torch.zeros(100, 1), (r'labels: expected N = 100 integer class indices in \[0, 2\) or an \[100, 2\] one-hot float '
                           r'tensor, got float32 of shape \[100, 1\]')),
    (torch.zeros(99, dtype=torch.long), r'labels: expected N = 100 .*got int64 of shape \[99\]'),
    (torch.tensor([0] * 99 + [2]), r'labels: .*got class index 2'),
    (torch.eye(3)[[0] * 100], r'labels: .*got float32 of shape \[100, 3\]'),
    (torch.full((100, 2), 0.5), r'labels: .*rows that are not one-hot'),
])
def test_bad_labels_are_refused_naming_the_argument(labels, match):
    images, _, net = _per_class_setup()
    with pytest.raises(ValueError, match=match):
        calibration.estimate_table(net, images, [0.5], labels=labels, num_classes=2, chunk_size=25)


def test_bad_labels_of_table_methods_are_refused():
    images, labels, net = _per_class_setup()
    table = calibration.estimate_table(net, images, [0.05, 0.5], labels=labels, num_classes=2, chunk_size=50)
    with pytest.raises(ValueError, match=r'class_labels: .*\[N, 2\] one-hot float tensor, got float32 of shape \[3, 1\]'):
        table.lookup(0.5, torch.zeros(3, 1))
    with pytest.raises(ValueError, match=r'class_labels: expected N = 2 .*got int64 of shape \[3\]'):
        table.lookup(torch.tensor([0.05, 0.5]), torch.tensor([0, 1, 1]))  # one label per sigma
    with pytest.raises(ValueError, match=r'class_labels: .*got class index 2'):
        calibration.CalibratedDenoiser(net, table)(images[:2], 0.5, torch.tensor([0, 2]))
    D = torch.zeros(2, *SHAPE, dtype=torch.float64)
    with pytest.raises(ValueError, match=r'labels: a per-class table \(2 classes\) needs'):
        table.add(0, D, D)
    with pytest.raises(ValueError, match=r'labels: expected N = 2 .*got int64 of shape \[1\]'):
        table.add(0, D, D, torch.tensor([1]))
    net.label_dim = 3  # a conditional model with 3 classes: a 2-class table does not fit it
    with pytest.raises(ValueError, match=r"num_classes: expected the model's 3 classes"):
        calibration.estimate_table(net, images, [0.5], labels=labels, num_classes=2, chunk_size=50)


def test_images_as_uint8_or_model_range_give_the_same_table(gmm):
    net = Biased(gmm)
    u8 = data.to_uint8(gmm.sample(32, generator=torch.Generator().manual_seed(0)).float().clamp(-1, 1))
    kw = dict(sigmas=[0.1, 1.0], chunk_size=16, seed=3)
    reference = calibration.estimate_table(net, u8, **kw)
    assert _same_table(calibration.estimate_table(net, data.to_model_range(u8), **kw), reference)
    assert _same_table(calibration.estimate_table(net, data.to_model_range(u8).double(), **kw), reference)


@pytest.mark.parametrize('images,match', [
    ((torch.rand(8, *SHAPE) * 255), (r'images: expected uint8 images \[N, 1, 4, 4\] or float images in model range '
                                     r'\[-1, 1\] \(\|x\| <= 5\), got values up to \|x\| = 2.*; images in \[0, 255\] go in as uint8')),
    (torch.full((8, *SHAPE), float('nan')), r'images: .*got values up to \|x\| = nan'),
    (torch.full((8, *SHAPE), float('inf')), r'images: .*got values up to \|x\| = inf'),
    (torch.zeros(8, *SHAPE, dtype=torch.long), r'images: expected uint8 images \[N, 1, 4, 4\] .*got int64 of shape \[8, 1, 4, 4\]'),
    (torch.zeros(8, 3, 4, 4, dtype=torch.uint8), r'images: .*got uint8 of shape \[8, 3, 4, 4\]'),
    (torch.zeros(8, 4, 4, dtype=torch.uint8), r'images: .*got uint8 of shape \[8, 4, 4\]'),
    (torch.zeros(8, 16), r'images: .*got float32 of shape \[8, 16\]'),  # this net says its images are [1, 4, 4]
    (torch.zeros(0, *SHAPE), r'images: .*got 0 images'),
    (np.zeros((8, *SHAPE), np.uint8), r'images: .*got ndarray'),
])
def test_bad_images_are_refused_naming_the_argument(gmm, images, match):
    net = Biased(gmm)
    with pytest.raises(ValueError, match=match):
        calibration.estimate_table(net, images, [0.5], chunk_size=8)
    with pytest.raises(ValueError, match=match):
        calibration.fit_offset_net(net, images, steps=1)


def test_float_vector_data_is_accepted_where_the_net_says_no_image_shape():
    oracle = oracles.GaussianMixtureDenoiser([1.0], [[0.0, 0.5]], [0.2])  # vectors of 2: no img_channels
    y = oracle.sample(16, generator=torch.Generator().manual_seed(0))
    assert calibration.estimate_table(oracle, y, [0.5], chunk_size=8).sum_D.shape == (1, 1, 2)


def test_sigmas_accepted_forms_agree():
    grid = [0.1, 0.5, 2.0]
    reference = calibration.CalibrationTable(grid, (2,)).sigmas
    for form in (tuple(grid), np.array(grid), torch.tensor(grid, dtype=torch.float64)):
        assert torch.equal(calibration.CalibrationTable(form, (2,)).sigmas, reference)
    assert torch.equal(calibration.union_sigmas(grid, 0.5, torch.tensor([2.0, 3.0])), torch.tensor(grid + [3.0], dtype=torch.float64))
    table = calibration.CalibrationTable(grid, (2,))
    table.add(1, torch.ones(1, 2, dtype=torch.float64), torch.zeros(1, 2, dtype=torch.float64))
    for sigma in (0.5, torch.tensor(0.5), np.float64(0.5), [0.5], torch.tensor([0.5], dtype=torch.float64)):
        assert torch.equal(table.lookup(sigma), torch.ones(1, 2, dtype=torch.float64))


BAD_SIGMAS = [
    ([0.5, 0.0], r'sigma.*: expected .*positive finite numbers, got 0'),
    ([-1.0, 0.5], r'sigma.*: expected .*positive finite numbers, got -1'),
    ([0.5, float('nan')], r'sigma.*: expected .*positive finite numbers, got nan'),
    ([0.5, float('inf')], r'sigma.*: expected .*positive finite numbers, got inf'),
    ([[0.1, 0.5]], r'sigma.*: expected .*a non-empty 1-D sequence of positive finite numbers, got shape \[1, 2\]'),
    ([], r'sigma.*: expected .*got shape \[0\]'),
    ('0.5', r'sigma.*: expected .*got str'),
]


@pytest.mark.parametrize('sigmas,match', BAD_SIGMAS)
def test_bad_sigmas_are_refused_naming_the_argument(gmm, sigmas, match):
    net = Biased(gmm)
    y = gmm.sample(8, generator=torch.Generator().manual_seed(0)).float()
    with pytest.raises(ValueError, match='^' + match.replace('sigma.*', 'sigmas')):
        calibration.estimate_table(net, y, sigmas, chunk_size=8)
    with pytest.raises(ValueError, match='^' + match.replace('sigma.*', 'sigmas')):
        calibration.CalibrationTable(sigmas, SHAPE)
    with pytest.raises(ValueError, match=r'^sigmas \(grid 1\)' + match[len('sigma.*'):]):
        calibration.union_sigmas([0.5], sigmas)
    table = calibration.CalibrationTable([0.5, 1.0], SHAPE)
    for interpolate in (False, True):  # NaN was once looked up silently
        with pytest.raises(ValueError, match='^' + match.replace('sigma.*', 'sigma')):
            table.lookup(sigmas, interpolate=interpolate)
    with pytest.raises(ValueError, match='^' + match.replace('sigma.*', 'sigma')):
        table.index_of(sigmas)


def test_sigma_grid_must_increase_and_union_needs_a_grid():
    with pytest.raises(ValueError, match=r'sigmas: expected a strictly increasing grid'):
        calibration.CalibrationTable([1.0, 0.5], SHAPE)
    with pytest.raises(ValueError, match=r'sigmas: union_sigmas needs at least one sigma grid'):
        calibration.union_sigmas()


def test_generated_dataset_seeds(gmm):
    net = Biased(gmm)
    reference = calibration.generated_dataset(net, 4, 'edm', seeds=[5, 6, 7, 8], num_steps=3).images
    for seeds in (range(5, 9), torch.arange(5, 9), np.arange(5, 9)):
        assert torch.equal(calibration.generated_dataset(net, 4, 'edm', seeds=seeds, num_steps=3).images, reference)
    with pytest.raises(ValueError, match=r'seeds: expected num_images = 4 seeds, got 3'):
        calibration.generated_dataset(net, 4, 'edm', seeds=[5, 6, 7], num_steps=3)
    with pytest.raises(ValueError, match=r'seeds: .*got repeated seeds \[6\]'):
        calibration.generated_dataset(net, 4, 'edm', seeds=[5, 6, 6, 7], num_steps=3)


def test_per_class_calibration_with_an_empty_class_is_refused(gmm):
    """A per-class table in which a class has no image has no term for it (0/0): subtracting it
    would make NaN images. Refused when the calibrated denoiser is made; the pooled term is fine."""
    net = Biased(gmm)
    y = gmm.sample(20, generator=torch.Generator().manual_seed(3)).to(torch.float32)
    labels = torch.tensor([0, 1] * 10)  # class 2 of 3 never occurs
    table = calibration.estimate_table(net, y, SIGMAS, labels=labels, num_classes=3, chunk_size=10,
                                       meta=dict(source='data'))
    with pytest.raises(calibration.CalibrationError, match=r"trial x: per-class calibration: class\(es\) 2 have no image in "
                                                             r"the table's 20 images"):
        calibration.CalibratedDenoiser(net, table, context='trial x')
    pooled = calibration.CalibratedDenoiser(net, table, per_class=False)
    assert torch.isfinite(pooled(y[:4], 0.5, torch.tensor([0, 1, 2, 0]))).all()


# ---------------------------------------------------------------------------------------------
# Finiteness on the values as kept (field reports, second round).

class _Scaled:
    """D = scale * x below `below` (NaN with scale = nan), the zero denoiser above: finite inputs
    that make a non-finite or overflowing number downstream."""
    sigma_min, sigma_max, img_channels, img_resolution, label_dim = 0.002, 80.0, 1, 4, 0

    def __init__(self, scale, below=float('inf'), dtype=None):
        self.scale, self.below, self.dtype = scale, below, dtype

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    def __call__(self, x, sigma, class_labels=None):
        x = x.to(self.dtype or x.dtype)  # dtype: a user's denoiser that answers in float64 whatever it is given
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, *[1] * (x.ndim - 1))
        return torch.where(sigma < self.below, x * self.scale, torch.zeros_like(x))


def test_fit_offset_net_refuses_a_model_that_is_nan_below_a_sigma():
    """The report: an OffsetNet whose weights and c(sigma) were NaN, without an error."""
    images = (torch.rand(16, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    with pytest.raises(calibration.CalibrationError, match=r'fit_offset_net: D\(x; sigma\) - y is not finite for a batch'):
        calibration.fit_offset_net(_Scaled(float('nan'), below=0.01), images, steps=50, batch_size=64)
    h = calibration.fit_offset_net(_Scaled(0.5), images, steps=5, batch_size=8)  # a finite model: as before
    assert all(torch.isfinite(p).all() for p in h.parameters())


def test_a_float64_D_that_overflows_in_float32_is_refused_by_the_recorder():
    """D = 1e300 is finite in float64 and inf once cast to the recorder's float32: no step is taken."""
    h = calibration.OffsetNet((1, 4, 4))
    recorder = calibration.DynamicRecorder(h)
    before = [p.clone() for p in h.parameters()]
    loss = recorder.update(torch.tensor([0.5, 1.0]), torch.full((2, 1, 4, 4), 1e300, dtype=torch.float64),
                           torch.zeros(2, 1, 4, 4))
    assert not math.isfinite(loss) and all(torch.equal(a, b) for a, b in zip(before, h.parameters()))


def test_tables_whose_sums_overflow_are_refused():
    """float64 sums of squares of a D of 1e200 are inf: estimate_table and merge refuse the table;
    dsm_gap refuses offsets whose square overflows."""
    images = torch.zeros(4, 1, 4, 4)
    with pytest.raises(calibration.CalibrationError, match=r'estimate_table: the sums of the table overflow at sigma 0.5 '
                                                            r'\(sum_r2 is not finite\)'):
        calibration.estimate_table(_Scaled(1e200, dtype=torch.float64), images, [0.5], chunk_size=2)
    a, b = calibration.CalibrationTable([0.5], (1,)), calibration.CalibrationTable([0.5], (1,))
    for chunk, table in enumerate((a, b)):  # each finite (1e308), their sum is not
        table.add(0, torch.tensor([[1e154]], dtype=torch.float64), torch.zeros(1, 1, dtype=torch.float64))
        table.chunks = {chunk}
    with pytest.raises(calibration.CalibrationError, match='merge: the sums of the table overflow'):
        a.merge(b)
    table = calibration.CalibrationTable([1e-3, 0.5], (1,))
    table.add(0, torch.tensor([[1e160]], dtype=torch.float64), torch.zeros(1, 1, dtype=torch.float64))
    table.add(1, torch.tensor([[1.0]], dtype=torch.float64), torch.zeros(1, 1, dtype=torch.float64))
    with pytest.raises(calibration.CalibrationError, match=r'\|\|E eps\|\|\^2 or its standard error is not finite at sigma 0.001'):
        calibration.dsm_gap(table)


def test_an_empty_table_is_refused_not_nan():
    """A table of no images (estimate_table over no chunks) has c(sigma) = 0/0: using it, or its
    ||E eps||^2, is one CalibrationError saying so, never NaN images."""
    net = _Scaled(0.5)
    table = calibration.estimate_table(net, torch.zeros(4, 1, 4, 4), [0.5, 1.0], chunk_size=2, chunk_indices=[])
    for use in (lambda: calibration.CalibratedDenoiser(net, table)(torch.zeros(1, 1, 4, 4), 0.5),
                lambda: calibration.dsm_gap(table)):
        with pytest.raises(calibration.CalibrationError, match=r'the table holds no image at sigma 0.5 \(of 0 images in '
                                                               r'all\): its term would be 0/0'):
            use()


def test_a_likelihood_gain_whose_error_overflows_is_refused():
    """c^2 se^2 overflowing made se = inf while nats stayed finite: refused."""
    table = calibration.CalibrationTable([0.1, 1.0], (1,))
    for k in range(2):
        for value in (1e80, 3e80):
            table.add(k, torch.tensor([[value]], dtype=torch.float64), torch.zeros(1, 1, dtype=torch.float64))
    with pytest.raises(calibration.CalibrationError, match=r'\|\|E eps\|\|\^2 or its standard error is not finite'):
        calibration.likelihood_gain(table)


def test_estimate_table_refuses_sigmas_outside_the_model():
    net = _Scaled(0.5)  # sigma in [0.002, 80]
    with pytest.raises(ValueError, match=r"^sigmas: 0.001 lies outside the model's \[0.002, 80\], where it was never trained"):
        calibration.estimate_table(net, torch.zeros(2, 1, 4, 4), [0.001, 0.5])


def test_segments_cut_chunks_at_the_image_counts():
    from orchestrator.calibrate import segment_chunks
    assert segment_chunks([16, 48], 8) == [[0, 1], [2, 3, 4, 5]]
    assert segment_chunks([50], 8) == [list(range(7))]  # one count: the last chunk may be short
