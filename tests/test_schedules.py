import math

import pytest
import torch

from tasks import schedules


def test_edm_grid_n18_matches_paper():
    """EDM Eq. 5 with N=18, sigma in [0.002, 80], rho=7 (the CIFAR-10 sampler)."""
    s = schedules.edm_sigma_steps(18)
    assert s.dtype == torch.float64 and len(s) == 18
    assert [round(float(v), 3) for v in s[:3]] == [80.0, 57.586, 40.786]
    assert round(float(s[-2]), 4) == 0.0075 and float(s[-1]) == pytest.approx(0.002, abs=1e-15)
    assert torch.all(s[1:] < s[:-1])


def test_edm_grid_rho_controls_spacing():
    """rho = 1 gives a uniform grid; a larger rho concentrates steps at low noise."""
    uniform = schedules.edm_sigma_steps(5, 1.0, 5.0, rho=1)
    assert torch.allclose(uniform, torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0], dtype=torch.float64))
    steep = schedules.edm_sigma_steps(5, 1.0, 5.0, rho=7)
    assert steep[-2] < uniform[-2]


@pytest.mark.parametrize('sched', [schedules.VPSchedule(), schedules.VESchedule(), schedules.LinearSchedule()])
def test_sigma_inverse_and_derivatives(sched):
    """sigma^-1(sigma(t)) = t; sigma'(t) and s'(t) equal autograd derivatives (EDM Table 1)."""
    t = torch.tensor([1e-3, 0.1, 0.5, 0.9, 1.0], dtype=torch.float64, requires_grad=True)
    sigma = sched.sigma(t)
    assert torch.allclose(sched.sigma_inv(sigma.detach()), t.detach(), rtol=1e-10, atol=1e-12)
    (grad,) = torch.autograd.grad(sigma.sum(), t)
    assert torch.allclose(sched.sigma_deriv(t.detach()), grad, rtol=1e-9)
    s = sched.s(t)
    if s.requires_grad:
        (sgrad,) = torch.autograd.grad(s.sum(), t)
        assert torch.allclose(sched.s_deriv(t.detach()), sgrad, rtol=1e-9)


def test_vp_schedule_closed_forms():
    vp = schedules.VPSchedule(beta_d=19.9, beta_min=0.1)
    t = torch.tensor(0.5, dtype=torch.float64)
    assert float(vp.sigma(t)) == pytest.approx(math.sqrt(math.exp(0.5 * 19.9 * 0.25 + 0.05) - 1), rel=1e-14)
    # s(t) = 1 / sqrt(1 + sigma^2) and the VP marginal has unit variance for unit data.
    assert float(vp.s(t) ** 2 * (1 + vp.sigma(t) ** 2)) == pytest.approx(1.0, rel=1e-14)
    scaling = schedules.VPScaling(vp)
    assert torch.allclose(scaling(t), vp.s(t)) and torch.allclose(scaling.deriv(t), vp.s_deriv(t))


def test_vp_from_sigma_range_hits_both_ends():
    vp = schedules.VPSchedule.from_sigma_range(0.002, 80.0, epsilon_s=1e-3)
    assert float(vp.sigma(1e-3)) == pytest.approx(0.002, rel=1e-10)
    assert float(vp.sigma(1.0)) == pytest.approx(80.0, rel=1e-10)


def test_vp_and_ve_time_steps():
    t = schedules.vp_time_steps(10, epsilon_s=1e-3)
    assert float(t[0]) == 1.0 and float(t[-1]) == pytest.approx(1e-3)
    assert torch.allclose(t[1:] - t[:-1], torch.full((9,), (1e-3 - 1) / 9, dtype=torch.float64))
    t = schedules.ve_time_steps(10, 0.02, 100)
    sig = schedules.VESchedule().sigma(t)
    assert float(sig[0]) == pytest.approx(100) and float(sig[-1]) == pytest.approx(0.02)
    ratios = sig[1:] / sig[:-1]  # geometric in sigma
    assert torch.allclose(ratios, ratios[0].expand(9))


@pytest.mark.parametrize('N', [2, 10, 18, 64, 256])
def test_iddpm_steps_match_table1_j0_formula(N):
    """generate.py's filtered-u indexing equals Table 1's u_floor(j0 + (M-1-j0)/(N-1) i + 1/2), j0=8."""
    u = schedules.iddpm_u()
    i = torch.arange(N, dtype=torch.float64)
    expected = u[torch.floor(8 + (1000 - 1 - 8) / (N - 1) * i + 0.5).long()]
    assert torch.equal(schedules.iddpm_sigma_steps(N), expected)


def test_iddpm_u_recursion():
    u = schedules.iddpm_u(M=1000, C_1=0.001, C_2=0.008)
    abar = lambda j: math.sin(0.5 * math.pi * j / 1000 / 1.008) ** 2
    assert float(u[1000]) == 0.0
    for j in (1000, 500, 2):
        # EDM evaluates abar in float32 (see iddpm_u): near j = M the ratio is 1 - 4e-5, so its
        # float32 rounding moves the smallest u by up to 1e-3 relative.
        assert float(u[j - 1]) == pytest.approx(math.sqrt((float(u[j]) ** 2 + 1) / max(abar(j - 1) / abar(j), 0.001) - 1), rel=1e-3)
    assert torch.all(u[:-1] > u[1:])


def test_num_steps_validation():
    with pytest.raises(ValueError, match='num_steps'):
        schedules.edm_sigma_steps(1)


@pytest.mark.parametrize('ns', [schedules.VPLinearNoiseSchedule(), schedules.VPDiscreteNoiseSchedule.ddpm_linear()])
def test_dpm_noise_schedule_identities(ns):
    t = torch.tensor([2e-3, 0.01, 0.3, 0.7, 1.0], dtype=torch.float64)
    assert torch.allclose(ns.alpha(t) ** 2 + ns.std(t) ** 2, torch.ones_like(t), atol=1e-14)
    assert torch.allclose(ns.lambda_(t), (ns.alpha(t) / ns.std(t)).log(), rtol=1e-12)
    assert torch.allclose(ns.inverse_lambda(ns.lambda_(t)), t, rtol=1e-9, atol=1e-12)
    assert torch.allclose(ns.sigma(t), ns.std(t) / ns.alpha(t), rtol=1e-12)
    assert torch.allclose(ns.t_of_sigma(ns.sigma(t)), t, rtol=1e-9, atol=1e-12)


def test_vp_linear_closed_form():
    ns = schedules.VPLinearNoiseSchedule(0.1, 20.0)
    t = 0.4
    assert float(ns.log_alpha(t)) == pytest.approx(-0.25 * t ** 2 * 19.9 - 0.5 * t * 0.1, rel=1e-15)
    assert ns.default_t_end(15) == 1e-3 and ns.default_t_end(16) == 1e-4


def test_vp_discrete_matches_alphas_cumprod_at_grid_times():
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    ns = schedules.VPDiscreteNoiseSchedule(betas=betas)
    abar = torch.cumprod(1 - betas, 0)
    n = torch.tensor([0, 1, 499, 999])
    assert torch.allclose(ns.alpha((n + 1) / 1000.0) ** 2, abar[n], rtol=1e-10)
    assert ns.default_t_end(10) == 1e-3


def test_dpm_time_grids():
    ns = schedules.VPLinearNoiseSchedule()
    t = schedules.dpm_time_steps(ns, 'logSNR', 1.0, 1e-3, 10)
    lam = ns.lambda_(t)
    assert len(t) == 11 and torch.allclose(lam[1:] - lam[:-1], (lam[1] - lam[0]).expand(10), rtol=1e-9)
    t = schedules.dpm_time_steps(ns, 'time_uniform', 1.0, 1e-3, 4)
    assert torch.allclose(t, torch.linspace(1.0, 1e-3, 5, dtype=torch.float64))
    t = schedules.dpm_time_steps(ns, 'time_quadratic', 1.0, 1e-2, 2)
    assert torch.allclose(t, torch.tensor([1.0, 0.55 ** 2, 0.01], dtype=torch.float64))
    with pytest.raises(ValueError, match='logSNR, time_uniform, time_quadratic'):
        schedules.dpm_time_steps(ns, 'cosine', 1.0, 1e-3, 4)


def _monai_cosine(T=1000, s=0.008):
    """MONAI's cosine schedule (Project-MONAI/MONAI, before PR 8427): alphas_cumprod of steps 0..T-1
    normalised by f(0), so its first level is exactly 1 (sigma 0)."""
    t = torch.arange(T + 1, dtype=torch.float64)
    f = torch.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
    return (f / f[0])[:T]


@pytest.mark.parametrize('form', ['monai_cosine', 'betas_from_zero'])
def test_a_first_level_of_sigma_0_is_dropped_and_steps_keep_their_index(form):
    """alphas_cumprod[0] = 1 (MONAI's cosine form; betas starting at 0) has lambda = inf: that level
    is dropped, as MONAI PR 8427 clips it away. The schedule's smallest sigma is then step 1's, and
    the model time of kept level j is its training step j + 1."""
    from tasks import precond
    if form == 'monai_cosine':
        abar = _monai_cosine()
        ns = schedules.VPDiscreteNoiseSchedule(alphas_cumprod=abar)
    else:
        betas = torch.linspace(0, 0.02, 1000, dtype=torch.float64)
        abar = torch.cumprod(1 - betas, 0)
        ns = schedules.VPDiscreteNoiseSchedule(betas=betas)
    assert float(abar[0]) == 1.0 and ns.first_level == 1
    levels = ns.sigma(ns.t_array)
    assert torch.isfinite(levels).all() and float(levels[0]) > 0
    assert float(levels[0]) == pytest.approx(float(((1 - abar[1]) / abar[1]).sqrt()), rel=1e-9)
    net = precond.VPModelDenoiser(lambda x_t, t, labels: torch.zeros_like(x_t), ns, num_train_timesteps=1000)
    assert net.sigma_min == pytest.approx(float(levels[0]), rel=1e-12) and net.sigma_min > 0
    steps = net.model_time(ns.t_array[[0, 1, 100, -1]])
    assert torch.allclose(steps, torch.tensor([1.0, 2.0, 101.0, ns.total_N], dtype=torch.float64), atol=1e-9)


@pytest.mark.parametrize('kwargs,match', [
    (dict(betas=[0.1, 1.5, 0.2]), r'betas: expected a non-empty 1-D sequence in \[0, 1\], got 1.5 at step 1'),
    (dict(betas=[0.1, float('nan')]), r'got nan at step 1'),
    (dict(alphas_cumprod=[0.9, 0.95, 0.5]), r'alphas_cumprod rises at step 1 \(0.9 -> 0.95\): not a noise schedule'),
    (dict(alphas_cumprod=[1.0, 0.9, 0.9, 0.5]), r'training steps 1 and 2 have the same noise level \(beta_2 is 0, or rounds'),
    (dict(alphas_cumprod=[1.0, 1.0]), r'every level is 1 \(sigma 0\)'),
    (dict(alphas_cumprod=[1e-6, 1e-7]), r'every level has log-SNR below -5.1'),
    (dict(alphas_cumprod=[[0.9, 0.5]]), r'alphas_cumprod: expected a non-empty 1-D sequence in \[0, 1\], got shape \[1, 2\]'),
])
def test_schedules_that_are_not_noise_schedules_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        schedules.VPDiscreteNoiseSchedule(**kwargs)


def test_dpm_solver_on_a_schedule_with_a_sigma_0_level_gives_finite_samples():
    """The report: DPM-Solver on MONAI's cosine schedule returned only NaN."""
    from tasks import precond, samplers
    ns = schedules.VPDiscreteNoiseSchedule(alphas_cumprod=_monai_cosine())
    net = precond.VPModelDenoiser(lambda x_t, t, labels: 0.1 * x_t, ns, num_train_timesteps=1000)  # any finite network
    latents = torch.randn(16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x = samplers.dpm_solver_sampler(net, latents, steps=10, order=2, method='multistep', noise_schedule=ns,
                                    skip_type='time_uniform')
    assert torch.isfinite(x).all()
