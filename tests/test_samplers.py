import types

import numpy as np
import pytest
import torch

from tasks import calibration, data, oracles, precond, samplers

MU = torch.tensor([0.3, -0.2, 0.1, 0.0, 0.5, -0.4], dtype=torch.float64)
VAR = torch.tensor([0.25, 0.5, 1.0, 0.1, 0.3, 0.7], dtype=torch.float64)


@pytest.fixture(scope='module')
def gaussian():
    return oracles.GaussianMixtureDenoiser([1.0], MU[None], VAR[None])


def _latents(n=64, d=6, seed=0):
    return torch.randn(n, d, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _exact_edm_result(gaussian, latents, sigma_min=0.002, sigma_max=80.0):
    """Exact probability-flow ODE from sigma_max to sigma_min, then the (exact) final Euler step
    to sigma = 0, which returns D(x; sigma_min)."""
    x_min = gaussian.ode_solution(latents * sigma_max, sigma_max, sigma_min)
    return gaussian(x_min, sigma_min)


def _ablation_error(gaussian, latents, solver, N):
    x = samplers.ablation_sampler(gaussian, latents, num_steps=N, solver=solver, discretization='edm',
                                  schedule='linear', scaling='none', sigma_min=0.002, sigma_max=80)
    return float((x - _exact_edm_result(gaussian, latents)).abs().max())


@pytest.mark.parametrize('solver,rate', [('euler', 2.0), ('heun', 4.0)])
def test_convergence_order_against_closed_form(gaussian, solver, rate):
    """Halving the step shrinks Euler's error ~2x and Heun's ~4x (EDM Alg. 1 on Gaussian data)."""
    latents = _latents()
    errors = [_ablation_error(gaussian, latents, solver, N) for N in (64, 128, 256)]
    ratios = [errors[i] / errors[i + 1] for i in range(2)]
    assert ratios[-1] == pytest.approx(rate, rel=0.12), (errors, ratios)
    assert errors[-1] < (1e-3 if solver == 'heun' else 5e-2)


def test_edm_sampler_equals_ablation_defaults(gaussian):
    """edm_sampler is ablation_sampler(heun, edm, linear, none), stochastic noise included."""
    latents = _latents(8)
    for S_churn in (0, 40):
        kw = dict(num_steps=12, sigma_min=0.002, sigma_max=80, rho=7, S_churn=S_churn, S_min=0.05, S_max=50, S_noise=1.007)
        a = samplers.edm_sampler(gaussian, latents, randn_like=samplers.StackedRandomGenerator('cpu', range(8)).randn_like, **kw)
        b = samplers.ablation_sampler(gaussian, latents, randn_like=samplers.StackedRandomGenerator('cpu', range(8)).randn_like,
                                      solver='heun', discretization='edm', schedule='linear', scaling='none', **kw)
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)


def test_vp_ablation_converges_to_same_ode(gaussian):
    """VP sigma(t), s(t) and time steps integrate the same probability-flow ODE (EDM Sec. 3,
    Eq. 4): Heun converges at order 2 to the closed form at sigma_min, followed by the final
    Euler step that EDM takes in the scaled ODE from t = epsilon_s to t = 0."""
    latents = _latents(16)
    vp = samplers.schedules.VPSchedule(beta_d=19.9, beta_min=0.1)  # EDM generate.py's default range
    sigma_max, sigma_min = float(vp.sigma(1.0)), float(vp.sigma(1e-3))
    vp = samplers.schedules.VPSchedule.from_sigma_range(sigma_min, sigma_max, 1e-3)
    t = vp.sigma_inv(sigma_min)
    s, sigma, sigma_d, s_d = vp.s(t), vp.sigma(t), vp.sigma_deriv(t), vp.s_deriv(t)
    x_t = s * gaussian.ode_solution(latents * sigma_max, sigma_max, sigma_min)
    d = (sigma_d / sigma + s_d / s) * x_t - sigma_d * s / sigma * gaussian(x_t / s, sigma)
    expected = x_t - t * d
    errors = [float((samplers.ablation_sampler(gaussian, latents, num_steps=N, solver='heun', discretization='vp',
                                               schedule='vp', scaling='vp') - expected).abs().max()) for N in (128, 256, 512)]
    assert errors[1] / errors[2] == pytest.approx(4.0, rel=0.15), errors
    assert errors[2] < 2e-4
    for disc, sched in (('ve', 've'), ('iddpm', 'linear')):
        x = samplers.ablation_sampler(gaussian, latents, num_steps=256, discretization=disc, schedule=sched)
        assert torch.isfinite(x).all()


# NVlabs/edm generate.py's ablation_sampler on the network and latents of the test below
# (NVlabs/edm commit 008a4e5316c8e3bfe61a62f874bddba254295afb, torch 2.14.1 on an x86-64 CPU):
# with generate.py, dnnlib/, torch_utils/ and training/ of that commit on sys.path, net =
# _tiny_vp_net(), rnd = generate.StackedRandomGenerator('cpu', range(8)), latents =
# rnd.randn([8, 1, 8, 8]), x = generate.ablation_sampler(net, latents, None, randn_like=rnd.randn_like,
# num_steps=32, solver='euler', discretization='vp', schedule='vp', scaling='vp') under
# torch.no_grad(); recorded x[0].flatten()[:8].tolist() and float(x.sum()) (same with 1 or 2 threads).
EDM_VP_EULER_32_FIRST8 = [-123.3854255665035, -126.29291670789954, -27.46249351311162, -47.551273025100066,
                          93.01403695127645, 75.84038830137366, -34.63377084671898, -231.81679286811269]
EDM_VP_EULER_32_SUM = -1467.3586067382753


def _tiny_vp_net():
    """A VP-preconditioned SongUNet small enough for the CPU, with seeded weights."""
    torch.manual_seed(0)
    return precond.VPPrecond(img_resolution=8, img_channels=1, model_channels=8, channel_mult=[1], num_blocks=1,
                             attn_resolutions=[], dropout=0.0).eval()


def test_ablation_vp_euler_matches_edm_generate():
    """The VP ablation sampler gives EDM generate.py's floats exactly: sigma(t) is computed as
    e ** (...) there, not exp(...), which differ in the last bit (before: 2.0e-8 relative
    difference on this net, 4.6e-8 in the field report)."""
    net = _tiny_vp_net()
    rnd = samplers.StackedRandomGenerator('cpu', range(8))
    latents = rnd.randn([8, 1, 8, 8])
    with torch.no_grad():
        x = samplers.ablation_sampler(net, latents, randn_like=rnd.randn_like, num_steps=32, solver='euler',
                                      discretization='vp', schedule='vp', scaling='vp')
    assert x[0].flatten()[:8].tolist() == EDM_VP_EULER_32_FIRST8
    assert float(x.sum()) == EDM_VP_EULER_32_SUM


def test_nfe_counts(gaussian):
    latents = _latents(4)
    assert samplers.edm_sampler(gaussian, latents, num_steps=18, return_nfe=True)[1] == 35
    assert samplers.ablation_sampler(gaussian, latents, num_steps=10, solver='euler', return_nfe=True)[1] == 10
    assert samplers.ablation_sampler(gaussian, latents, num_steps=10, solver='heun', return_nfe=True)[1] == 19


def test_stochastic_sigma_hats(gaussian):
    """Algorithm 2: t_hat = t (1 + gamma), gamma = min(S_churn / N, sqrt 2 - 1) inside [S_min, S_max]."""
    rec = samplers.CountedDenoiser(gaussian, record_sigmas=True)
    samplers.edm_sampler(rec, _latents(2), num_steps=6, S_churn=3, S_min=0.1, S_max=10)
    t = samplers.schedules.edm_sigma_steps(6)
    expected = []
    for i in range(6):
        t_hat = float(t[i]) * (1 + min(3 / 6, np.sqrt(2) - 1) if 0.1 <= t[i] <= 10 else 1.0)
        expected.append(t_hat)
        if i < 5:
            expected.append(float(t[i + 1]))
    assert rec.sigmas == pytest.approx(expected, rel=1e-12)
    rec = samplers.CountedDenoiser(gaussian, record_sigmas=True)
    samplers.edm_sampler(rec, _latents(2), num_steps=6, S_churn=100)
    assert rec.sigmas[0] == pytest.approx(80 * np.sqrt(2), rel=1e-12)  # gamma capped at sqrt(2) - 1


def test_batch_size_invariance_with_per_image_seeds():
    """An image depends only on its seed: batches of 1, 7 and 64 give identical images."""
    w, m, v = data.toy_mixture('grid9', std=0.3)
    oracle = oracles.GaussianMixtureDenoiser(w, m.repeat(1, 8), v, shape=(1, 4, 4))
    outs = []
    for batch_size in (1, 7, 64):
        imgs, nfe = samplers.generate(oracle, range(20), 'edm', batch_size=batch_size, num_steps=8, S_churn=5)
        outs.append(imgs)
    assert nfe == 15
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    assert not torch.equal(outs[0][0], outs[0][1])


def test_gmm_samples_match_mixture():
    """Deterministic EDM sampling from the exact GMM denoiser reproduces weights, means, spread."""
    w, m, v = data.toy_mixture('two', std=0.05)
    oracle = oracles.GaussianMixtureDenoiser(w, m, v)
    n = 4000
    for sampler, kw in (('edm', dict(num_steps=32)), ('dpm_solver', dict(steps=30, order=3, algorithm_type='dpmsolver++'))):
        x = samplers.get_sampler(sampler)(oracle, _latents(n, 2, seed=1), **kw)
        k = torch.cdist(x, m).argmin(1)
        frac = float((k == 0).double().mean())
        assert abs(frac - 0.3) < 4 * np.sqrt(0.3 * 0.7 / n), frac
        for j in range(2):
            cluster = x[k == j]
            assert torch.allclose(cluster.mean(0), m[j], atol=0.01)
            assert float(cluster.std(0).mean()) == pytest.approx(0.05, rel=0.1)


def test_ideal_denoiser_reproduces_training_points():
    """The ideal denoiser of a finite dataset (EDM Eq. 57) only generates its training images."""
    y = torch.randn(10, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    oracle = oracles.IdealDenoiser(y)
    x = samplers.edm_sampler(oracle, _latents(32, 16, seed=4).reshape(32, 1, 4, 4), num_steps=18)
    d = torch.cdist(x.reshape(32, -1), y.reshape(10, -1)).min(1).values
    assert float(d.max()) < 1e-3


def test_bad_sampler_arguments():
    g = oracles.GaussianMixtureDenoiser([1.0], [[0.0]], [1.0])
    with pytest.raises(ValueError, match='euler, heun'):
        samplers.ablation_sampler(g, _latents(1, 1), solver='rk4')
    with pytest.raises(ValueError, match='vp, ve, iddpm, edm'):
        samplers.ablation_sampler(g, _latents(1, 1), discretization='cosine')
    with pytest.raises(ValueError, match='edm, ablation, dpm_solver'):
        samplers.get_sampler('ddim')


class _NaNBelow:
    """The ideal denoiser of N(0, I) data, D = x / (1 + sigma^2), that returns NaN below a sigma
    (a field report: such a network's samples were scored as black images)."""
    img_channels, img_resolution, label_dim, sigma_min, sigma_max = 1, 4, 0, 0.002, 80.0

    def __init__(self, below):
        self.below = below

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    def __call__(self, x, sigma, class_labels=None):
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, *[1] * (x.ndim - 1))
        out = x / (1 + sigma ** 2)
        return torch.where(sigma < self.below, torch.full_like(out, float('nan')), out)


@pytest.mark.parametrize('sampler,settings', [('edm', dict(num_steps=6)), ('ablation', dict(num_steps=6, solver='euler')),
                                              ('dpm_solver', dict(steps=6, order=2))])
def test_samples_that_are_not_finite_are_refused_naming_the_sigma(sampler, settings):
    """Every sampler, through samplers.generate (what metrics and calibration sample with): NaN
    samples are one NonFiniteSamples error saying how many, which seeds, which sampler and the
    first sigma at which the denoiser returned non-finite values; never images."""
    net = _NaNBelow(0.5)
    with pytest.raises(samplers.NonFiniteSamples) as error:
        samplers.generate(net, range(3), sampler, batch_size=2, **settings)
    text = str(error.value)
    assert text.startswith(f'2 of the 2 samples of seeds 0..1 are not finite ({sampler} ')
    queried = calibration.queried_sigmas(sampler, net, **settings)
    first_below = float(queried[queried < 0.5].max())  # samplers go from high to low sigma
    assert f'the denoiser first returned non-finite values at sigma {first_below:g}' in text, text
    images, _ = samplers.generate(_NaNBelow(0.0), range(3), sampler, batch_size=2, **settings)  # finite: as before
    assert torch.isfinite(images).all() and images.shape == (3, 1, 4, 4)


def test_nan_samples_are_never_scored():
    """metrics.evaluate on a network that returns NaN below sigma 0.5 (a field report: FID 671
    from black images) raises instead of returning a number."""
    from tasks import metrics
    extractor = lambda images: torch.zeros(len(images), 8)
    extractor.is_fid_network, extractor.provenance, extractor.name = False, {}, 'zeros'
    reference = dict(mu=np.zeros(8), sigma=np.eye(8), count=10)
    with pytest.raises(samplers.NonFiniteSamples, match='are not finite'):
        metrics.evaluate(_NaNBelow(0.5), reference, extractor, 4, 'edm', batch_size=4, num_steps=5)


# ---------------------------------------------------------------------------------------------
# Argument forms (field report "The Python API guesses at what it was given"): each accepted
# form gives the same result; every other form is refused with a message naming the argument.

def _tiny_cond_net(label_dim=10):
    """An EDM-preconditioned conditional SongUNet small enough for the CPU, with seeded weights
    (perturbed: EDM zero-initializes the output layers, which would hide the labels' effect)."""
    torch.manual_seed(0)
    net = precond.EDMPrecond(img_resolution=8, img_channels=1, label_dim=label_dim, model_channels=8, channel_mult=[1],
                             num_blocks=1, attn_resolutions=[], dropout=0.0).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return net


LABEL_INDICES = [3, 1, 4, 1, 5, 9]


def test_class_labels_indices_and_one_hot_give_the_same_samples():
    net = _tiny_cond_net()
    one_hot = torch.eye(10)[LABEL_INDICES]
    reference, _, used = samplers.generate(net, range(6), 'edm', class_labels=one_hot, num_steps=3, batch_size=4,
                                           return_labels=True)
    assert torch.equal(used, one_hot)
    for labels in (torch.tensor(LABEL_INDICES), torch.tensor(LABEL_INDICES, dtype=torch.int32), LABEL_INDICES,
                   np.array(LABEL_INDICES), one_hot.double()):
        images, _, used = samplers.generate(net, range(6), 'edm', class_labels=labels, num_steps=3, batch_size=4,
                                            return_labels=True)
        assert torch.equal(images, reference) and torch.equal(used.float(), one_hot)
    other, _ = samplers.generate(net, range(6), 'edm', class_labels=[0] * 6, num_steps=3)
    assert not torch.equal(other, reference)  # the labels do reach the net
    latents = samplers.StackedRandomGenerator('cpu', range(6)).randn([6, 1, 8, 8])
    for sampler, kw in (('edm', dict(num_steps=3)), ('ablation', dict(num_steps=3, solver='euler')),
                        ('dpm_solver', dict(steps=4, order=2))):
        fn = samplers.get_sampler(sampler)
        with torch.no_grad():
            assert torch.equal(fn(net, latents, torch.tensor(LABEL_INDICES), **kw), fn(net, latents, one_hot, **kw))


@pytest.mark.parametrize('labels,match', [
    (torch.zeros(6, 1), (r'class_labels: expected N = 6 integer class indices in \[0, 10\) or an \[6, 10\] one-hot float '
                         r'tensor, got float32 of shape \[6, 1\]')),
    (torch.tensor(LABEL_INDICES[:-1]), r'class_labels: expected N = 6 .*got int64 of shape \[5\]'),
    (torch.eye(10)[LABEL_INDICES[:-1]], r'class_labels: expected N = 6 .*got float32 of shape \[5, 10\]'),
    ([3, 1, 4, 1, 5, 10], r'class_labels: expected .* in \[0, 10\) .*got class index 10'),
    ([3, 1, 4, 1, 5, -1], r'class_labels: .*got class index -1'),
    (torch.eye(3)[[0, 1, 2, 0, 1, 2]], r'class_labels: .*\[6, 10\] one-hot float tensor, got float32 of shape \[6, 3\]'),
    (torch.full((6, 10), 0.1), r'class_labels: .*rows that are not one-hot .*soft labels are not accepted'),
    (torch.zeros(6, 10), r'class_labels: .*rows that are not one-hot'),
    (torch.tensor(LABEL_INDICES, dtype=torch.float32), r'class_labels: .*got float32 of shape \[6\]'),
    (torch.eye(10, dtype=torch.long)[LABEL_INDICES], r'class_labels: .*got int64 of shape \[6, 10\]'),
    (torch.eye(10)[LABEL_INDICES][:, None], r'class_labels: .*got float32 of shape \[6, 1, 10\]'),
    (torch.ones(6, dtype=torch.bool), r'class_labels: .*got bool of shape \[6\]'),
    ('cats', r'class_labels: expected .*, got str'),
])
def test_bad_class_labels_are_refused_naming_the_argument(labels, match):
    net = _tiny_cond_net()
    with pytest.raises(ValueError, match=match):
        samplers.generate(net, range(6), 'edm', class_labels=labels, num_steps=2)
    latents = torch.zeros(6, 1, 8, 8)
    for sampler in samplers.SAMPLERS:
        with pytest.raises(ValueError, match=match):
            samplers.get_sampler(sampler)(net, latents, labels)


def test_class_labels_the_net_cannot_take_are_refused():
    with pytest.raises(ValueError, match=r'class_labels: the net is unconditional \(label_dim = 0\)'):
        samplers.generate(_NaNBelow(0.0), range(2), 'edm', class_labels=[0, 1], num_steps=2)
    oracle = oracles.GaussianMixtureDenoiser([1.0], [[0.0] * 16], [1.0], shape=(1, 4, 4))  # says no label_dim
    with pytest.raises(ValueError, match=r'class_labels: integer class indices need the number of classes'):
        samplers.edm_sampler(oracle, torch.zeros(2, 1, 4, 4), [0, 1], num_steps=2)
    samplers.edm_sampler(oracle, torch.zeros(2, 1, 4, 4), torch.eye(3)[[0, 2]], num_steps=2)  # one-hot: any C
    net = _tiny_cond_net()
    with pytest.raises(ValueError, match='class_idx: give class_labels or class_idx, not both'):
        samplers.generate(net, range(2), 'edm', class_labels=[0, 1], class_idx=1, num_steps=2)
    with pytest.raises(ValueError, match=r'class_idx: expected an integer class index, got 1.5'):
        samplers.generate(net, range(2), 'edm', class_idx=1.5, num_steps=2)


def test_seeds_as_list_range_tensor_or_array_give_the_same_images():
    oracle = oracles.GaussianMixtureDenoiser([1.0], [[0.0] * 16], [1.0], shape=(1, 4, 4))
    reference, _ = samplers.generate(oracle, [3, 4, 5, 6], 'edm', num_steps=3, S_churn=5, batch_size=3)
    for seeds in (range(3, 7), (3, 4, 5, 6), torch.arange(3, 7), torch.arange(3, 7, dtype=torch.int32),
                  np.arange(3, 7), np.arange(3, 7, dtype=np.uint32), [np.int64(s) for s in range(3, 7)]):
        images, _ = samplers.generate(oracle, seeds, 'edm', num_steps=3, S_churn=5, batch_size=3)
        assert torch.equal(images, reference), seeds
    a = samplers.StackedRandomGenerator('cpu', torch.arange(3, 7)).randn([4, 2])
    assert torch.equal(a, samplers.StackedRandomGenerator('cpu', range(3, 7)).randn([4, 2]))


@pytest.mark.parametrize('seeds,match', [
    ([0, 1, 1], r'seeds: expected .*distinct integers in \[0, 2\^32\), got repeated seeds \[1\]'),
    (torch.tensor([0, 1, 1]), r'seeds: .*got repeated seeds \[1\]'),
    ([0, -1, 2], r'seeds: .*got -1'),
    ([0.0, 1.0], r'seeds: .*got 0.0 \(float\)'),
    (torch.tensor([0.0, 1.0]), r'seeds: .*got a float32 array of shape \[2\]'),
    (np.array([0.5, 1.0]), r'seeds: .*got a float64 array of shape \[2\]'),
    (torch.zeros(2, 2, dtype=torch.long), r'seeds: .*got a int64 array of shape \[2, 2\]'),
    ([], r'seeds: expected a non-empty .*got none'),
    ([0, 2 ** 32], r'seeds: .*\[0, 2\^32\), got 4294967296'),
    ([True, False], r'seeds: .*got True \(bool\)'),
    (5, r'seeds: .*got int'),
])
def test_bad_seeds_are_refused_naming_the_argument(seeds, match):
    oracle = oracles.GaussianMixtureDenoiser([1.0], [[0.0] * 16], [1.0], shape=(1, 4, 4))
    with pytest.raises(ValueError, match=match):
        samplers.generate(oracle, seeds, 'edm', num_steps=2)
    with pytest.raises(ValueError, match=match):
        samplers.StackedRandomGenerator('cpu', seeds)


# ---------------------------------------------------------------------------------------------
# Field reports, second round: the entry check, discrete levels, sigma grids inside the model.

class _OnLevels:
    """The Gaussian oracle seen through a model's noise levels: its sigma range and round_sigma
    (e.g. iDDPM's 1000 levels u_j), recording every sigma it is asked for."""

    def __init__(self, levels_of, gaussian):
        self.levels_of, self.gaussian, self.asked = levels_of, gaussian, []
        self.sigma_min, self.sigma_max = levels_of.sigma_min, levels_of.sigma_max

    def round_sigma(self, sigma):
        return self.levels_of.round_sigma(sigma)

    def __call__(self, x, sigma, class_labels=None):
        self.asked.append(torch.as_tensor(sigma, dtype=torch.float64).reshape(-1))
        return self.gaussian(x, sigma)


def _iddpm_levels():
    return precond.iDDPMPrecond(img_resolution=1, img_channels=1, model_type=None)


@pytest.mark.parametrize('sampler,settings,distinct', [
    ('edm', dict(num_steps=100), 94), ('edm', dict(num_steps=64), 63),
    ('ablation', dict(num_steps=50, discretization='iddpm', sigma_min=10, sigma_max=20), 31)])
def test_repeated_levels_are_stepped_once_with_the_same_deterministic_result(gaussian, monkeypatch, sampler, settings,
                                                                             distinct):
    """diffusers PRs 4231, 6477: rounding to iDDPM's 1000 levels makes zero-size steps (EDM's sampler
    at 100 steps: 94 distinct levels, 199 evaluations; the ablation sampler's iddpm discretization in
    [10, 20] at 50 steps: 19 zero-size steps). They are removed: fewer evaluations, and the
    deterministic result is bit for bit the one with them (a zero-size step is x + 0 * d)."""
    latents = _latents(8)
    net = _OnLevels(_iddpm_levels(), gaussian)
    x, nfe = samplers.get_sampler(sampler)(net, latents, return_nfe=True, **settings)
    assert nfe == 2 * distinct - 1 and samplers.step_summary(sampler, net, **settings)['distinct_steps'] == distinct
    monkeypatch.setattr(samplers, 'distinct_levels', lambda sigmas: sigmas)  # NVlabs/edm's way: every step
    x_all, nfe_all = samplers.get_sampler(sampler)(_OnLevels(_iddpm_levels(), gaussian), latents, return_nfe=True, **settings)
    assert nfe_all == 2 * settings['num_steps'] - 1 and torch.equal(x, x_all)


def test_stochastic_churn_counts_the_distinct_steps(gaussian):
    """gamma = min(S_churn / N', sqrt(2) - 1) with N' the distinct steps (31 of 50 for the iddpm
    discretization in [10, 20]), so the stochastic result changes from NVlabs/edm's (docs/science.md
    decision)."""
    net = _OnLevels(types_namespace(sigma_min=0.002, sigma_max=80), gaussian)
    settings = dict(num_steps=50, discretization='iddpm', sigma_min=10, sigma_max=20, S_churn=5)
    samplers.ablation_sampler(net, _latents(2), randn_like=torch.zeros_like, **settings)
    grid, _ = samplers.ablation_grid(net, **{k: v for k, v in settings.items() if k != 'S_churn'})
    assert len(grid) == 31
    assert float(net.asked[0][0]) == pytest.approx(float(grid[0]) * (1 + 5 / 31), rel=1e-12)


def test_every_sigma_asked_is_inside_the_models_range(gaussian):
    """DPM-Solver's default grid (t_end 1e-4 on the linear VP: sigma 0.00318) reached below a
    discrete model's first level (DDPM: 0.0100), where the UNet got a negative training step; EDM's
    churn lifted t_hat above sigma_max. Now every sigma lies in [sigma_min, sigma_max]: the grid
    ends at the first level (sigma_end) and t_hat stops at sigma_max."""
    from tasks import schedules
    ns = schedules.VPDiscreteNoiseSchedule.ddpm_linear()
    ddpm = precond.VPModelDenoiser(lambda x_t, t, labels: torch.zeros_like(x_t), ns)
    for settings in (dict(steps=20, order=3, t_end=1e-4), dict(steps=10, order=2, method='multistep', t_end=1e-4),
                     dict(steps=12, order=1, t_end=1e-4, denoise_to_zero=True)):
        net = _OnLevels(ddpm, gaussian)
        with pytest.warns(samplers.SigmaRangeClamped, match=r"dpm_solver sigma range \[0.00317\d*, 152.\d+\] reaches outside"):
            samplers.dpm_solver_sampler(net, _latents(2), **settings)
        asked = torch.cat(net.asked)
        assert float(asked.min()) >= ddpm.sigma_min and float(asked.max()) <= ddpm.sigma_max
        assert samplers.step_summary('dpm_solver', ddpm, **settings)['sigma_end'] == pytest.approx(ddpm.sigma_min, rel=1e-12)
        assert float(ddpm.model_time(ns.t_of_sigma(asked)).min()) > -1e-6  # no negative training step
    vp = precond.VPPrecond(img_resolution=1, img_channels=1, model_type=None)  # sigma_max 152.2
    net = _OnLevels(vp, gaussian)
    samplers.edm_sampler(net, _latents(2), num_steps=6, sigma_max=150, S_churn=10, randn_like=torch.zeros_like)
    assert float(torch.cat(net.asked).max()) == vp.sigma_max


BAD_SETTINGS = [
    ('edm', dict(rho=0), 'rho: expected a positive finite number, got 0'),
    ('edm', dict(num_steps=1), 'num_steps: expected an integer >= 2 (EDM Eq. 5 needs two grid points), got 1'),
    ('ablation', dict(num_steps=1), 'num_steps: expected an integer >= 2 (EDM Eq. 5 needs two grid points), got 1'),
    ('edm', dict(sigma_min=100), 'sigma_min: 100 is not below sigma_max = 80 (the default)'),
    ('edm', dict(sigma_min=50, sigma_max=10), 'sigma_min: 50 is not below sigma_max = 10'),
    ('ablation', dict(sigma_min=5.0, sigma_max=1.0), 'sigma_min: 5 is not below sigma_max = 1'),
    ('edm', dict(S_min=10, S_max=1), 'S_min: 10 is above S_max = 1'),
    ('dpm_solver', dict(t_start=0.1, t_end=0.5), 't_end: 0.5 is not below t_start = 0.1'),
    ('dpm_solver', dict(steps=2, order=3), 'steps: 2 is fewer than order = 3 (DPM-Solver needs steps >= order)'),
    ('edm', dict(sigma_min=200, sigma_max=300), "sigma range [200, 300] lies outside the model's [0.002, 80]: nothing is "
                                                'left to sample after clamping'),
    ('dpm_solver', dict(t_start=1e-5, t_end=1e-6), "lies outside the model's [0.002, 80]"),
]


@pytest.mark.parametrize('sampler,settings,message', BAD_SETTINGS)
def test_public_sampler_functions_refuse_what_validate_refuses(sampler, settings, message):
    """huggingface/diffusers #5077, #14586: the Python API sampled what `validate` refuses
    (sigma_min above sigma_max: the grid 80 -> 84.6 -> ... -> 100; integrating backwards; rho = 0 a
    bare ZeroDivisionError). generate and each sampler refuse with one ValueError line before any
    evaluation (test_spec checks that validate prints the same text)."""
    net = _OnLevels(types_namespace(sigma_min=0.002, sigma_max=80), _NaNBelow(0.0))
    net.img_channels, net.img_resolution = 1, 4
    exact = message if message.startswith(('sigma range', 'rho', 'num_steps', 'sigma_min', 'S_min', 't_end', 'steps')) else None
    for call in (lambda: samplers.generate(net, [0, 1], sampler, **settings),
                 lambda: samplers.get_sampler(sampler)(net, _latents(2), **settings)):
        with pytest.raises(ValueError) as error:
            call()
        if exact:
            assert str(error.value) == exact
        else:  # the dpm_solver sigmas print as the schedule computes them
            assert str(error.value).startswith('sigma range [0.000') and message in str(error.value)
    assert net.asked == []


def test_generate_refuses_a_setting_the_sampler_does_not_take():
    net = types_namespace(sigma_min=0.002, sigma_max=80, img_channels=1, img_resolution=4)
    with pytest.raises(ValueError, match=r"^num_step: not a parameter of edm \(did you mean 'num_steps'\?\); valid: S_churn, "
                                         r"S_max, S_min, S_noise, num_steps, rho, sigma_max, sigma_min$"):
        samplers.generate(net, [0], 'edm', num_step=4)


def types_namespace(**attributes):
    """A stand-in for a model's noise levels: sigma range, identity round_sigma."""
    return types.SimpleNamespace(round_sigma=torch.as_tensor, **attributes)


def test_a_range_partly_outside_is_clamped_with_one_warning(gaussian):
    """Clamped as EDM's generate.py clamps it, said once per generate call (not once per batch)."""
    net = _OnLevels(types_namespace(sigma_min=0.002, sigma_max=80), gaussian)
    net.img_channels, net.img_resolution = 6, 1
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        samplers.generate(net, range(5), 'edm', batch_size=2, num_steps=4, sigma_max=200)
    said = [w for w in caught if issubclass(w.category, samplers.SigmaRangeClamped)]
    assert [str(w.message) for w in said] == [
        "edm sigma range [0.002, 200] reaches outside the model's [0.002, 80]: sampled on [0.002, 80] (clamped, as EDM's "
        "generate.py does)"]
    assert float(torch.cat(net.asked).max()) == 80


def test_generate_checks_the_samples_as_kept():
    """S_noise = 1e40 lies in its domain; the float64 state stays finite but the float32 images it
    returns would be inf: refused as NonFiniteSamples, never returned."""
    net = _NaNBelow(0.0)
    with pytest.raises(samplers.NonFiniteSamples, match='are not finite'):
        samplers.generate(net, range(2), 'edm', num_steps=4, S_churn=10, S_noise=1e40)


def test_numpy_numbers_are_settings_like_python_ones(gaussian):
    """The Python API is often given numpy scalars (np.int64 step counts from a grid): accepted."""
    latents = _latents(4)
    a = samplers.edm_sampler(gaussian, latents, num_steps=np.int64(6), rho=np.float64(7))
    assert torch.equal(a, samplers.edm_sampler(gaussian, latents, num_steps=6, rho=7.0))
    with pytest.raises(ValueError, match=r'^num_steps: expected an integer >= 2 .*, got 6.0$'):
        samplers.edm_sampler(gaussian, latents, num_steps=6.0)


# Inputs of the same kinds, found by trying to break the first fixes: each is one line now.
MORE_BAD_SETTINGS = [
    ('edm', dict(rho=0.001), r'^rho: 0.001 puts EDM Eq. 5 out of floating-point range for sigma in \[0.002, 80\] '
                             r'\(sigma\^\(1/rho\) overflows\)$'),
    ('edm', dict(rho=1e15), r'^rho: 1e\+15 makes EDM Eq. 5 inexact in floating point: the grid for \[0.002, 80\] comes out '
                            r'as \[0.00199\d*, 84.8\d*\]$'),
    ('ablation', dict(discretization='iddpm', sigma_min=10, sigma_max=10.0001),
     r'^discretization: iddpm: no level u_j of M = 1000, C_1 = 0.001, C_2 = 0.008 lies in \[10, 10.0001\]; widen'),
    ('ablation', dict(discretization='vp', epsilon_s=1e-6, num_steps=6),
     r'^epsilon_s: 1e-06: the VP sigma\(t\) fitted to sigma in \[0.01, 80\] .* is not increasing on \[epsilon_s, 1\]'),
]


@pytest.mark.parametrize('sampler,settings,match', MORE_BAD_SETTINGS)
def test_settings_whose_grid_cannot_be_computed_are_refused(sampler, settings, match):
    """rho near 0 overflowed EDM Eq. 5 (a bare OverflowError), a huge rho moved its ends, an empty
    iddpm level set raised IndexError, and a VP schedule fitted to a clamped range with a tiny
    epsilon_s decreased (sigmas 6000x above sigma_max). A model with sigma in [0.01, 80]."""
    net = _OnLevels(types_namespace(sigma_min=0.01, sigma_max=80), _NaNBelow(0.0))
    net.img_channels, net.img_resolution = 1, 4
    for call in (lambda: samplers.generate(net, [0], sampler, **settings),
                 lambda: samplers.get_sampler(sampler)(net, _latents(1, 16).reshape(1, 1, 4, 4), **settings)):
        with pytest.raises(ValueError, match=match):
            call()
    assert net.asked == []


def test_dpm_solver_on_a_discrete_schedule_with_t_end_below_its_first_level(gaussian):
    """t_end below 1/N has no sigma on a discrete schedule (the reference extrapolates to NaN; the
    message said 'sigma range [nan, ...]'): the grid ends at the first level, said once."""
    from tasks import schedules
    ns = schedules.VPDiscreteNoiseSchedule.ddpm_linear()
    ddpm = precond.VPModelDenoiser(lambda x_t, t, labels: torch.zeros_like(x_t), ns)
    net = _OnLevels(ddpm, gaussian)
    with pytest.warns(samplers.SigmaRangeClamped, match=r"dpm_solver sigma range \[0, 157.\d+\] reaches outside the model's "
                                                        r"\[0.0100\d*, 157.\d+\]: sampled on \[0.0100\d*, 157.\d+\]"):
        x = samplers.dpm_solver_sampler(net, _latents(2), steps=10, noise_schedule=ns, t_end=1e-4)
    asked = torch.cat(net.asked)
    assert torch.isfinite(x).all() and float(asked.min()) >= ddpm.sigma_min and float(asked.max()) <= ddpm.sigma_max
    assert samplers.step_summary('dpm_solver', ddpm, steps=10, noise_schedule=ns, t_end=1e-4)['sigma_end'] == \
        pytest.approx(ddpm.sigma_min, rel=1e-12)


@pytest.mark.parametrize('sampler,settings', [
    ('edm', dict(num_steps=7)), ('edm', dict(num_steps=7, S_churn=40)),
    ('ablation', dict(num_steps=7, schedule='vp')), ('ablation', dict(num_steps=7, schedule='ve', scaling='vp')),
    ('ablation', dict(num_steps=7, discretization='vp', S_churn=40)), ('dpm_solver', dict(steps=7, order=3))])
def test_no_sigma_leaves_the_models_range_even_by_rounding(gaussian, sampler, settings):
    """EDM Eq. 5 lands an ulp below sigma_min and sigma(sigma^-1(s)) != s: every sampler evaluates
    through CountedDenoiser, which keeps the sigmas in [sigma_min, sigma_max] (a discrete model
    got a time input of +6.5e-16 steps below its first)."""
    from tasks import schedules
    ns = schedules.VPDiscreteNoiseSchedule.ddpm_linear()
    ddpm = precond.VPModelDenoiser(lambda x_t, t, labels: torch.zeros_like(x_t), ns)
    net = _OnLevels(ddpm, gaussian)
    wide = {} if sampler == 'dpm_solver' else dict(sigma_min=ddpm.sigma_min, sigma_max=ddpm.sigma_max)
    samplers.get_sampler(sampler)(net, _latents(2), **dict(wide, **settings))
    asked = torch.cat(net.asked)
    assert float(asked.min()) >= ddpm.sigma_min and float(asked.max()) <= ddpm.sigma_max
