import math

import pytest
import torch

from tasks import oracles, samplers, schedules

MU = torch.tensor([0.3, -0.2, 0.1, 0.0], dtype=torch.float64)
VAR = torch.tensor([0.25, 0.5, 1.0, 0.1], dtype=torch.float64)
GAUSS = oracles.GaussianMixtureDenoiser([1.0], MU[None], VAR[None])
NS = schedules.VPLinearNoiseSchedule()


def _latents(n=32, seed=0):
    return torch.randn(n, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize('method', samplers.DPM_METHODS)
@pytest.mark.parametrize('order', [1, 2, 3])
@pytest.mark.parametrize('nfe', [10, 15, 20, 25, 30, 35, 40])
def test_nfe_rules(method, order, nfe):
    """Calib Table 1's NFE 10..40: singlestep (fast) and multistep use exactly NFE evaluations,
    singlestep_fixed order * floor(NFE / order)."""
    _, count = samplers.dpm_solver_sampler(GAUSS, _latents(2), steps=nfe, order=order, method=method, return_nfe=True)
    expected = order * (nfe // order) if method == 'singlestep_fixed' else nfe
    assert count == expected == samplers.dpm_solver_nfe(nfe, order, method)
    assert samplers.dpm_solver_nfe(nfe, order, method, denoise_to_zero=True) == expected + 1


def test_singlestep_orders_follow_reference():
    assert samplers.singlestep_orders(10, 3) == [3, 3, 3, 1]
    assert samplers.singlestep_orders(11, 3) == [3, 3, 3, 2]
    assert samplers.singlestep_orders(12, 3) == [3, 3, 3, 2, 1]
    assert samplers.singlestep_orders(11, 2) == [2, 2, 2, 2, 2, 1]
    assert samplers.singlestep_orders(5, 1) == [1] * 5
    for steps in range(3, 41):
        for order in (1, 2, 3):
            assert sum(samplers.singlestep_orders(steps, order)) == steps


def test_multistep_lower_order_warmup_and_final():
    _, orders, _ = samplers.dpm_solver_plan(NS, 8, 3, 'multistep')
    assert orders == [1, 2, 3, 3, 3, 3, 2, 1]  # steps < 10: lower orders at the end
    _, orders, _ = samplers.dpm_solver_plan(NS, 12, 3, 'multistep')
    assert orders == [1, 2] + [3] * 10


def test_end_time_rule():
    """t_end = 1e-3 when steps <= 15, else 1e-4 (continuous VP); 1/N for discrete schedules."""
    for steps, t_end in ((15, 1e-3), (16, 1e-4)):
        t, _, _ = samplers.dpm_solver_plan(NS, steps, 2, 'multistep')
        assert float(t[0]) == pytest.approx(1.0, rel=1e-12) and float(t[-1]) == pytest.approx(t_end, rel=1e-9)
    t, _, _ = samplers.dpm_solver_plan(schedules.VPDiscreteNoiseSchedule.ddpm_linear(), 20, 2, 'multistep')
    assert float(t[-1]) == pytest.approx(1e-3, rel=1e-9)


def _ddim(net, latents, times, ns):
    """DDIM (Song et al. 2021, eta = 0) in the VP space: x_t = alpha_t x0_hat + std_t eps_hat."""
    x = latents.clone()
    for s, t in zip(times[:-1], times[1:]):
        alpha_s, std_s = ns.alpha(s), ns.std(s)
        eps = (x - alpha_s * net(x / alpha_s, std_s / alpha_s)) / std_s
        x0 = (x - std_s * eps) / alpha_s
        x = ns.alpha(t) * x0 + ns.std(t) * eps
    return x


@pytest.mark.parametrize('algorithm_type', samplers.DPM_ALGORITHMS)
@pytest.mark.parametrize('skip_type', schedules.DPM_SKIP_TYPES)
def test_dpm_solver_1_is_ddim(algorithm_type, skip_type):
    latents = _latents()
    x = samplers.dpm_solver_sampler(GAUSS, latents, steps=12, order=1, method='multistep',
                                    algorithm_type=algorithm_type, skip_type=skip_type)
    times = schedules.dpm_time_steps(NS, skip_type, 1.0, 1e-3, 12)
    assert torch.allclose(x, _ddim(GAUSS, latents, times, NS), rtol=1e-10, atol=1e-10)


def _exact(latents, t_start, t_end):
    """Reference output of DPM-Solver on Gaussian data: alpha_end * x'(sigma_end), x' the exact
    probability-flow solution started from x' = latents / alpha_start."""
    s0, s1 = float(NS.sigma(t_start)), float(NS.sigma(t_end))
    return float(NS.alpha(t_end)) * GAUSS.ode_solution(latents / float(NS.alpha(t_start)), s0, s1)


@pytest.mark.parametrize('algorithm_type', samplers.DPM_ALGORITHMS)
@pytest.mark.parametrize('order', [1, 2, 3])
@pytest.mark.parametrize('method', ['singlestep_fixed', 'multistep'])
def test_order_k_convergence(algorithm_type, order, method):
    """Doubling the steps shrinks the error ~2^k for DPM-Solver-k. Multistep order 3 starts with a
    first-order step (as the reference does), whose O(h^2) local error makes it converge at
    order 2 asymptotically."""
    latents = _latents()
    t_start, t_end = float(NS.t_of_sigma(20.0)), float(NS.t_of_sigma(0.02))
    exact = _exact(latents, t_start, t_end)
    errors = []
    for K in (16, 32, 64):
        x = samplers.dpm_solver_sampler(GAUSS, latents, steps=K * order, order=order, method=method, algorithm_type=algorithm_type,
                                        skip_type='logSNR', t_start=t_start, t_end=t_end)
        errors.append(float((x - exact).abs().max()))
    ratio = errors[-2] / errors[-1]
    expected = 2.0 ** min(order, 2 if method == 'multistep' else 3)
    assert ratio == pytest.approx(expected, rel=0.2), errors


def test_singlestep_fast_converges():
    latents = _latents()
    exact = _exact(latents, 1.0, 1e-4)
    errors = [float((samplers.dpm_solver_sampler(GAUSS, latents, steps=n, order=3) - exact).abs().max()) for n in (20, 40)]
    assert errors[1] < errors[0] / 4


def test_denoise_to_zero_returns_data_prediction():
    latents = _latents(4)
    x, nfe = samplers.dpm_solver_sampler(GAUSS, latents, steps=10, order=2, method='multistep', denoise_to_zero=True, return_nfe=True)
    x_end = samplers.dpm_solver_sampler(GAUSS, latents, steps=10, order=2, method='multistep')
    assert nfe == 11
    assert torch.allclose(x, GAUSS(x_end / float(NS.alpha(1e-3)), float(NS.sigma(1e-3))))


def test_intermediate_sigmas_of_singlestep():
    """DPM-Solver-3 evaluates at lambda_s + r h with r from the inner grid (1/3, 2/3 in logSNR)."""
    rec = samplers.CountedDenoiser(GAUSS, record_sigmas=True)
    samplers.dpm_solver_sampler(rec, _latents(2), steps=6, order=3, method='singlestep_fixed', skip_type='logSNR')
    lam = [-math.log(s) for s in rec.sigmas]
    h = (lam[3] - lam[0])
    assert (lam[1] - lam[0]) / h == pytest.approx(1 / 3, rel=1e-9) and (lam[2] - lam[0]) / h == pytest.approx(2 / 3, rel=1e-9)


def test_bad_arguments_list_valid_choices():
    with pytest.raises(ValueError, match='1, 2 or 3'):
        samplers.dpm_solver_sampler(GAUSS, _latents(1), steps=10, order=4)
    with pytest.raises(ValueError, match='singlestep, singlestep_fixed, multistep'):
        samplers.dpm_solver_sampler(GAUSS, _latents(1), steps=10, method='adaptive')
    with pytest.raises(ValueError, match='dpmsolver, dpmsolver\\+\\+'):
        samplers.dpm_solver_sampler(GAUSS, _latents(1), steps=10, algorithm_type='dpm')
    with pytest.raises(ValueError, match=r'^steps: 2 is fewer than order = 3 \(DPM-Solver needs steps >= order\)$'):
        samplers.dpm_solver_sampler(GAUSS, _latents(1), steps=2, order=3, method='multistep')
