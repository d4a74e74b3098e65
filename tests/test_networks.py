import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from tasks import networks, precond

# A few parameter names and shapes of EDM's CIFAR-10 DDPM++ (the `ema` network of its pickles:
# a preconditioner holding SongUNet as `model`), read off EDM's networks.py. The
# preconditioners add no parameters of their own (iDDPM only the buffer `u`).
EDM_DDPMPP_KEYS = {
    'model.map_augment.weight': (128, 9),
    'model.map_layer0.weight': (512, 128),
    'model.map_layer1.bias': (512,),
    'model.enc.32x32_conv.weight': (128, 3, 3, 3),
    'model.enc.32x32_block0.conv0.weight': (256, 128, 3, 3),
    'model.enc.32x32_block0.skip.weight': (256, 128, 1, 1),
    'model.enc.32x32_block0.affine.weight': (256, 512),
    'model.enc.16x16_down.conv0.resample_filter': (1, 1, 2, 2),
    'model.enc.16x16_down.skip.weight': (256, 256, 1, 1),
    'model.enc.16x16_block0.qkv.weight': (768, 256, 1, 1),
    'model.enc.16x16_block0.norm2.weight': (256,),
    'model.dec.8x8_in0.proj.weight': (256, 256, 1, 1),
    'model.dec.16x16_up.conv0.resample_filter': (1, 1, 2, 2),
    'model.dec.16x16_block4.qkv.weight': (768, 256, 1, 1),
    'model.dec.32x32_block0.conv0.weight': (256, 512, 3, 3),
    'model.dec.32x32_aux_norm.weight': (256,),
    'model.dec.32x32_aux_conv.weight': (3, 256, 3, 3),
}


def _meta_net(preset, **kw):
    with torch.device('meta'):
        return precond.build_denoiser(preset, 'edm', img_resolution=32, img_channels=3, **kw)


def test_ddpmpp_cifar10_size_and_flops():
    """EDM's CIFAR-10 DDPM++: 55.73 M parameters, ~42.4 GFLOP per 32x32x3 forward (mul+add = 2)."""
    net = _meta_net('ddpmpp-cifar10')
    assert sum(p.numel() for p in net.parameters()) == 55_733_891
    with FlopCounterMode(display=False) as counter:
        net(torch.zeros(1, 3, 32, 32, device='meta'), torch.ones(1, device='meta'))
    assert counter.get_total_flops() / 1e9 == pytest.approx(42.4, abs=0.05)


def test_ddpmpp_cifar10_edm_parameter_names():
    sd = _meta_net('ddpmpp-cifar10').state_dict()
    for key, shape in EDM_DDPMPP_KEYS.items():
        assert key in sd, key
        assert tuple(sd[key].shape) == shape, key
    # 1x1 convs without up/down carry no resample_filter buffer (EDM registers None).
    assert 'model.enc.32x32_conv.resample_filter' not in sd


def test_ncsnpp_cifar10_structure():
    sd = _meta_net('ncsnpp-cifar10').state_dict()
    assert tuple(sd['model.map_noise.freqs'].shape) == (128,)  # fourier, channel_mult_noise 2
    assert tuple(sd['model.enc.16x16_aux_residual.weight'].shape) == (256, 3, 3, 3)
    assert tuple(sd['model.enc.16x16_down.conv0.resample_filter'].shape) == (1, 1, 4, 4)


def test_strict_state_dict_round_trip_between_preconds():
    """An EDM-layout state dict loads strictly (same names and shapes) into a fresh network."""
    torch.manual_seed(0)
    a = precond.build_denoiser('ddpmpp-tiny', 'vp', 16, 1)
    torch.manual_seed(1)
    b = precond.build_denoiser('ddpmpp-tiny', 'vp', 16, 1)
    b.load_state_dict(a.state_dict(), strict=True)
    x = torch.randn(2, 1, 16, 16)
    assert torch.equal(a.eval()(x, torch.tensor([0.3, 2.0])), b.eval()(x, torch.tensor([0.3, 2.0])))


def test_attention_equals_explicit_softmax():
    """SDPA attention computes EDM's softmax(q^T k / sqrt(c)) v with its qkv channel layout."""
    torch.manual_seed(0)
    block = networks.UNetBlock(32, 32, emb_channels=16, attention=True, num_heads=1, eps=1e-6, adaptive_scale=False,
                               init_attn=dict(init_mode='xavier_uniform'), init_zero=dict(init_mode='xavier_uniform'))
    x, emb = torch.randn(2, 32, 4, 4), torch.randn(2, 16)
    out = block(x, emb)

    # The same block with EDM's explicit attention.
    orig = x
    h = block.conv0(torch.nn.functional.silu(block.norm0(x)))
    h = torch.nn.functional.silu(block.norm1(h + block.affine(emb)[:, :, None, None]))
    h = block.conv1(h) + block.skip(orig) if block.skip is not None else block.conv1(h) + orig
    q, k, v = block.qkv(block.norm2(h)).reshape(2, 32, 3, -1).unbind(2)
    w = torch.einsum('ncq,nck->nqk', q, k / np.sqrt(k.shape[1])).softmax(dim=2)
    a = torch.einsum('nqk,nck->ncq', w, v)
    expected = block.proj(a.reshape(*h.shape)) + h
    assert torch.allclose(out, expected, atol=1e-5)


@pytest.mark.parametrize('preset,res', [('ddpmpp-tiny', 16), ('ddpmpp-small', 32)])
def test_small_presets_forward(preset, res):
    torch.manual_seed(0)
    net = precond.build_denoiser(preset, 'edm', res, 1, label_dim=10)
    x = torch.randn(3, 1, res, res)
    D = net(x, torch.tensor([0.1, 1.0, 10.0]), torch.eye(10)[:3])
    assert D.shape == x.shape and torch.isfinite(D).all()


def test_unknown_preset_lists_valid():
    with pytest.raises(ValueError, match='ddpmpp-cifar10.*ddpmpp-tiny'):
        networks.preset_kwargs('unet-huge')


def test_resolution_must_fit_levels():
    with pytest.raises(ValueError, match='not divisible'):
        precond.build_denoiser('ddpmpp-cifar10', 'edm', img_resolution=30, img_channels=3)


@pytest.mark.parametrize('kernel', [1, 3])
@pytest.mark.parametrize('direction', ['up', 'down'])
@pytest.mark.parametrize('resample_filter', [[1, 1], [1, 3, 3, 1]])
def test_fused_resampling_is_the_unfused_layer(direction, resample_filter, kernel):
    """NVlabs/edm #2: the fused up-sampling convolution gave 60x60 from 32x32. Fused and unfused
    layers with the same weights give the same shape in both directions. Up-sampling runs the same
    operations in the same order (resample, then convolve), so the values are equal for the [1, 1]
    filter and, for [1, 3, 3, 1], away from a 2-pixel border (the paddings differ there). Fused
    down-sampling convolves before it resamples (EDM's order), a different function: shape only."""
    torch.manual_seed(0)
    kw = dict(kernel=kernel, resample_filter=resample_filter, **{direction: True})
    fused, plain = networks.Conv2d(64, 64, fused_resample=True, **kw), networks.Conv2d(64, 64, **kw)
    plain.load_state_dict(fused.state_dict())
    x = torch.randn(2, 64, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        a, b = fused.double()(x), plain.double()(x)
    size = 64 if direction == 'up' else 16
    assert a.shape == b.shape == (2, 64, size, size)
    if direction == 'up':
        border = 0 if resample_filter == [1, 1] else 2
        inner = (slice(None), slice(None), slice(border, size - border), slice(border, size - border))
        assert torch.allclose(a[inner], b[inner], rtol=1e-10, atol=1e-12)
        assert border == 0 or kernel == 1 or not torch.allclose(a, b)  # the border is where they differ
