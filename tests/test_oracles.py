import math

import pytest
import torch

from tasks import data, oracles


def _brute_force_ideal(y, x, sigma):
    """EDM Eq. 57 written directly: softmax over -||x - y_i||^2 / (2 sigma^2)."""
    d2 = torch.cdist(x.reshape(len(x), -1), y.reshape(len(y), -1)) ** 2
    w = torch.softmax(-d2 / (2 * sigma ** 2), dim=1)
    return (w @ y.reshape(len(y), -1)).reshape(x.shape)


def test_ideal_denoiser_matches_eq57_and_is_chunk_invariant():
    g = torch.Generator().manual_seed(0)
    y = torch.randn(50, 1, 4, 4, dtype=torch.float64, generator=g)
    x = torch.randn(6, 1, 4, 4, dtype=torch.float64, generator=g) * 2
    for sigma in (0.3, 1.0, 5.0):
        expected = _brute_force_ideal(y, x, sigma)
        for chunk in (7, 50, 4096):
            assert torch.allclose(oracles.IdealDenoiser(y, chunk_size=chunk)(x, sigma), expected, rtol=1e-10, atol=1e-12)


def test_ideal_denoiser_limits():
    y = torch.randn(20, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    oracle = oracles.IdealDenoiser(y, chunk_size=6)
    x = y[:4] + 1e-3
    assert torch.allclose(oracle(x, 1e-2), y[:4], atol=1e-8)            # small sigma: nearest image
    assert torch.allclose(oracle(x, 1e4), y.mean(0).expand(4, 3), atol=1e-6)  # large sigma: the mean
    # Tiny sigma makes every logit underflow to -inf but the nearest: still finite.
    assert torch.isfinite(oracle(x * 100, 1e-4)).all()


def test_ideal_denoiser_class_conditional():
    y = torch.tensor([[0.0], [0.1], [5.0], [5.2]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1])
    oracle = oracles.IdealDenoiser(y, labels=labels)
    x = torch.tensor([[4.9]], dtype=torch.float64)
    onehot = torch.eye(2)[[0]]
    assert float(oracle(x, 0.5, onehot)) == pytest.approx(float(_brute_force_ideal(y[:2], x, 0.5)), rel=1e-12)
    assert float(oracle(x, 0.5)) == pytest.approx(float(_brute_force_ideal(y, x, 0.5)), rel=1e-12)


def _gmm_log_density(oracle, x, sigma):
    var = oracle.variances + sigma ** 2
    lp = -0.5 * (((x[:, None] - oracle.means) ** 2) / var + (2 * math.pi * var).log()).sum(2)
    return torch.logsumexp(lp + oracle.weights.log(), 1)


@pytest.mark.parametrize('name', ['ring8', 'grid9', 'two'])
@pytest.mark.parametrize('sigma', [0.05, 0.4, 2.0])
def test_gmm_denoiser_is_tweedie(name, sigma):
    """D(x; sigma) = x + sigma^2 grad log p_sigma(x) (Tweedie / EDM Eq. 3) for the noisy mixture."""
    oracle = oracles.GaussianMixtureDenoiser(*data.toy_mixture(name, std=0.2))
    x = (torch.randn(16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 1.5).requires_grad_(True)
    (score,) = torch.autograd.grad(_gmm_log_density(oracle, x, sigma).sum(), x)
    assert torch.allclose(oracle(x.detach(), sigma), x.detach() + sigma ** 2 * score, rtol=1e-9, atol=1e-10)


def test_gmm_sampling_and_single_gaussian_flow():
    w, m, v = data.toy_mixture('two', std=0.1)
    oracle = oracles.GaussianMixtureDenoiser(w, m, v)
    s = oracle.sample(20000, generator=torch.Generator().manual_seed(0))
    k = torch.cdist(s, m).argmin(1)
    assert float((k == 1).double().mean()) == pytest.approx(0.7, abs=0.015)
    single = oracles.GaussianMixtureDenoiser([1.0], [[1.0, -1.0]], [[0.5, 2.0]])
    x = torch.randn(3, 2, dtype=torch.float64)
    assert torch.allclose(single.ode_solution(single.ode_solution(x, 10.0, 1.0), 1.0, 10.0), x)
    with pytest.raises(ValueError, match='single Gaussian'):
        oracle.ode_solution(x, 1.0, 0.5)
