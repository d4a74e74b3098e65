import math

import pytest
import torch

from tasks import oracles, precond, schedules

TINY = dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[], dropout=0.0)


class RecordingModel(torch.nn.Module):
    """Stands in for SongUNet: F(x; c_noise) = 2 x + c_noise, recording its inputs."""

    def forward(self, x, noise_labels, class_labels=None):
        self.x_in, self.c_noise = x, noise_labels
        out = 2 * x + noise_labels.reshape(-1, 1, 1, 1)
        return torch.cat([out, out], 1) if getattr(self, 'double', False) else out


def _with_recorder(net):
    net.model = RecordingModel()
    net.model.double = isinstance(net, precond.iDDPMPrecond)
    return net


def _table1(name, sigma, sd=0.5, M=1000):
    """EDM Table 1 coefficients written from the paper."""
    if name == 'edm':
        return sd ** 2 / (sigma ** 2 + sd ** 2), sigma * sd / math.sqrt(sigma ** 2 + sd ** 2), 1 / math.sqrt(sigma ** 2 + sd ** 2), math.log(sigma) / 4
    if name == 've':
        return 1, sigma, 1, math.log(0.5 * sigma)
    if name == 'vp':
        t = float(schedules.VPSchedule(19.9, 0.1).sigma_inv(sigma))
        return 1, -sigma, 1 / math.sqrt(sigma ** 2 + 1), (M - 1) * t
    raise KeyError(name)


@pytest.mark.parametrize('name', ['edm', 've', 'vp'])
@pytest.mark.parametrize('sigma', [0.01, 0.5, 3.0, 40.0])
def test_precond_is_table1_combination(name, sigma):
    net = _with_recorder(precond.PRECONDS[name](img_resolution=8, img_channels=1, **TINY))
    x = torch.randn(3, 1, 8, 8)
    D = net(x, torch.full((3,), sigma))
    c_skip, c_out, c_in, c_noise = _table1(name, sigma)
    assert torch.allclose(net.model.x_in, c_in * x, rtol=1e-6)
    # VP's sigma^-1 runs in float32 as in EDM: log(1 + sigma^2) loses ~1e-4 relative at sigma = 0.01.
    assert torch.allclose(net.model.c_noise, torch.full((3,), c_noise, dtype=torch.float32), rtol=2e-4, atol=1e-5)
    F = 2 * (c_in * x) + net.model.c_noise.reshape(-1, 1, 1, 1)
    assert torch.allclose(D, c_skip * x + c_out * F, rtol=1e-5, atol=1e-5)


def test_iddpm_precond_rounds_to_trained_levels():
    net = _with_recorder(precond.iDDPMPrecond(img_resolution=8, img_channels=1, **TINY))
    u = net.u
    j = 700
    sigma = float(u[j]) * 1.001
    assert float(net.round_sigma(torch.tensor(sigma))) == pytest.approx(float(u[j]))
    x = torch.randn(2, 1, 8, 8)
    D = net(x, torch.full((2,), sigma))
    assert torch.allclose(net.model.c_noise, torch.full((2,), 1000 - 1 - j, dtype=torch.float32))
    F = 2 * net.model.x_in + (1000 - 1 - j)
    assert torch.allclose(D, x - sigma * F, rtol=1e-5, atol=1e-5)  # only the first img_channels are used
    assert net.sigma_max == float(u[0]) and net.sigma_min == float(u[999])


def test_edm_precond_unit_variance_at_sigma_data():
    """c_in normalizes the input: for data of std sigma_data, Var(c_in x) = 1."""
    c_skip, c_out, c_in, _ = _table1('edm', 0.5)
    assert c_skip == pytest.approx(0.5) and c_out == pytest.approx(0.5 / math.sqrt(2))
    assert c_in ** 2 * (0.5 ** 2 + 0.5 ** 2) == pytest.approx(1.0)


def test_scalar_sigma_broadcasts_like_a_batch():
    torch.manual_seed(0)
    net = precond.EDMPrecond(img_resolution=8, img_channels=1, **TINY).eval()
    x = torch.randn(4, 1, 8, 8)
    assert torch.allclose(net(x, torch.tensor(1.3, dtype=torch.float64)), net(x, torch.full((4,), 1.3)), atol=1e-6)


@pytest.mark.parametrize('prediction', precond.PREDICTIONS)
@pytest.mark.parametrize('ns', [schedules.VPLinearNoiseSchedule(), schedules.VPDiscreteNoiseSchedule.ddpm_linear()])
def test_adapters_round_trip(prediction, ns):
    """A model predicting noise/data/v/score, built from an exact denoiser, adapts back to it."""
    oracle = oracles.GaussianMixtureDenoiser([0.4, 0.6], [[-1.0, 0.5], [1.0, -0.5]], [0.1, 0.3])
    discrete = isinstance(ns, schedules.VPDiscreteNoiseSchedule)

    def model(x_t, t_input, class_labels=None):
        t = t_input.to(torch.float64) / 1000 + 1 / ns.total_N if discrete else t_input.to(torch.float64)
        alpha, std = ns.alpha(t)[:, None], ns.std(t)[:, None]
        x0 = oracle(x_t / alpha, std / alpha)
        return precond.data_to_prediction(x0, x_t, alpha, std, prediction)

    D = precond.VPModelDenoiser(model, ns, prediction)
    x = torch.randn(5, 2, dtype=torch.float64)
    for sigma in (0.05, 0.7, 5.0, 60.0):
        assert torch.allclose(D(x, sigma), oracle(x, sigma), rtol=1e-6, atol=1e-6)
    assert D.sigma_max == pytest.approx(float(ns.sigma(1.0)))


def test_prediction_conversions_invert_each_other():
    x0, x_t = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    alpha, std = 0.8, 0.6
    for kind in precond.PREDICTIONS:
        out = precond.data_to_prediction(x0, x_t, alpha, std, kind)
        assert torch.allclose(precond.prediction_to_data(out, x_t, alpha, std, kind), x0)
    with pytest.raises(ValueError, match='noise, data, v, score'):
        precond.prediction_to_data(x0, x_t, alpha, std, 'epsilon')


def test_unknown_precond_lists_valid():
    with pytest.raises(ValueError, match='vp, ve, iddpm, edm'):
        precond.build_denoiser('ddpmpp-tiny', 'karras', 16, 1)


def _untrained_with_signal(seed=0):
    """ddpmpp-tiny with its near-zero layers (EDM's init_zero: weights x 1e-5) scaled up to the
    size of the others, so that F carries signal like a trained network's."""
    torch.manual_seed(seed)
    net = precond.build_denoiser('ddpmpp-tiny', 'edm', img_resolution=16, img_channels=1)
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim > 1 and p.abs().max() < 1e-3:
                p.mul_(2e4)
    return net.eval()


def test_fast_denoiser_options_keep_D():
    """FastDenoiser with no option is D exactly; channels_last changes only memory layout (float32
    rounding); bf16 autocast moves D by bf16 rounding only (it never touches the preconditioning)."""
    net = _untrained_with_signal()
    x = torch.randn(6, 1, 16, 16, generator=torch.Generator().manual_seed(1)) * 2.0
    sigma = torch.tensor([0.01, 0.1, 0.5, 1.0, 5.0, 80.0])
    with torch.no_grad():
        D = net(x, sigma)
        assert torch.equal(precond.FastDenoiser(net)(x, sigma), D)
        F_scale = (D - net.coefficients(sigma.reshape(-1, 1, 1, 1))[0] * x).abs().max()
        assert F_scale > 1e-2  # the network part is not zero, so the checks below can fail
        cl = precond.FastDenoiser(_untrained_with_signal(), channels_last=True)(x, sigma)
        assert cl.is_contiguous() and float((cl - D).abs().max()) <= 1e-5 * float(D.abs().max())
        bf = precond.FastDenoiser(_untrained_with_signal(), bf16=True)(x, sigma)
        assert bf.dtype == torch.float32
        err = float((bf - D).abs().max())
        assert 0 < err <= 2e-2 * float(F_scale)
    fast = precond.FastDenoiser(net, bf16=True)
    assert (fast.sigma_min, fast.sigma_max, fast.img_resolution) == (net.sigma_min, net.sigma_max, 16)


@pytest.mark.parametrize('dtype', [torch.float64, torch.bfloat16])
def test_iddpm_levels_stay_float32_when_the_network_changes_dtype(dtype):
    """.to(dtype) converts the network, never the levels u_j (EDM's float32 values: bf16 would move
    them, and round_sigma's float32 comparison failed against float64 levels)."""
    net = precond.iDDPMPrecond(img_resolution=8, img_channels=1, model_channels=8, channel_mult=[1], num_blocks=1,
                               attn_resolutions=[], dropout=0.0)
    u = net.u.clone()
    net = net.to(dtype)
    assert net.u.dtype == torch.float32 and torch.equal(net.u, u)
    with torch.no_grad():
        D = net(torch.randn(2, 1, 8, 8, dtype=torch.float64), torch.tensor([1.0, 5.0], dtype=torch.float64))
    assert D.dtype == torch.float64 and torch.isfinite(D).all()
