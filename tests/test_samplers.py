import numpy as np
import pytest
import torch

from tasks import data, oracles, samplers

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
