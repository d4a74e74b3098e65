"""The dtype contract of every denoiser (docs/science.md: the dtype contract): x arrives in the sampler's
dtype (float64), the network gets its input in the dtype of its own parameters, D comes back in
x's dtype. Every model format x every sampler x every use (generate, estimate_table,
metrics.sample_statistics), on 8x8 images: field report ClownsharkBatwing/RES4LYF #22 ("Input
type (double) and bias type (float) should be the same") was a loaded diffusers model that no
sampler could sample."""
import dataclasses

import pytest
import torch

from edm_format import write_edm_snapshot  # tests/ helper
from tasks import calibration, checkpoints, metrics, precond, samplers, train

SONG = dict(model_type='SongUNet', model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[], dropout=0.0)
EDM_PRECONDS = {'vp': dict(beta_d=19.9, beta_min=0.1, M=1000, epsilon_t=1e-5), 've': dict(sigma_min=0.02, sigma_max=100),
                'iddpm': dict(C_1=0.001, C_2=0.008, M=1000), 'edm': dict(sigma_data=0.5)}
MODELS = (['network.pt'] + [f'edm-pkl-{p}' for p in EDM_PRECONDS]
          + [f'diffusers-{p}-{c}' for p in ('epsilon', 'sample', 'v_prediction') for c in ('uncond', 'cond')])
SAMPLERS = {'edm': dict(num_steps=3),
            'ablation': dict(num_steps=3, discretization='vp', schedule='vp', scaling='vp'),
            'dpm_solver': dict(steps=4, order=2, method='multistep')}


def _perturbed(net):
    torch.manual_seed(1)
    with torch.no_grad():  # off the zero-initialised output layers, so D depends on the network
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


def _write(kind, folder):
    """A model file or directory of `kind` (one of MODELS) with random weights; returns its path."""
    torch.manual_seed(0)
    if kind == 'network.pt':
        config = train.TrainConfig(preset='ddpmpp-tiny', network_overrides=dict(model_channels=8))
        net = _perturbed(train.build_network(config, (1, 8), 0))
        path = folder / 'network.pt'
        torch.save(dict(config=dataclasses.asdict(config), image_shape=(1, 8), label_dim=0, ema=net.state_dict(),
                        cur_nimg=16), path)
        return path
    if kind.startswith('edm-pkl-'):
        name = kind.removeprefix('edm-pkl-')
        init = dict(img_resolution=8, img_channels=1, label_dim=0, **EDM_PRECONDS[name], **SONG)
        net = _perturbed(precond.PRECONDS[name](**init))
        model_init = dict(img_resolution=8, in_channels=1, out_channels=net.out_channel_factor, label_dim=0,
                          **{k: v for k, v in SONG.items() if k != 'model_type'})
        path = folder / 'network-snapshot-000016.pkl'
        write_edm_snapshot(path, net, init, model_init)
        return path
    diffusers = pytest.importorskip('diffusers', reason="diffusers is an optional extra: pip install '.[diffusers]'")
    _, prediction, conditioning = kind.split('-')
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                                 block_out_channels=(8, 16), down_block_types=('DownBlock2D',) * 2,
                                 up_block_types=('UpBlock2D',) * 2, norm_num_groups=4,
                                 num_class_embeds=3 if conditioning == 'cond' else None)
    _perturbed(unet).save_pretrained(folder / 'unet')
    diffusers.DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction).save_pretrained(folder / 'scheduler')
    return folder


@pytest.fixture(scope='module')
def model_paths(tmp_path_factory):
    paths = {}
    for kind in MODELS:
        folder = tmp_path_factory.mktemp(kind)
        try:
            paths[kind] = _write(kind, folder)
        except pytest.skip.Exception as e:
            paths[kind] = e
    return paths


def _load(model_paths, kind):
    path = model_paths[kind]
    if isinstance(path, BaseException):
        pytest.skip(str(path))
    return checkpoints.load_denoiser(path)


@pytest.mark.parametrize('kind', MODELS)
def test_D_comes_back_in_xs_dtype_from_every_format(model_paths, kind):
    """float64 in, float64 out; float32 in, float32 out; the two agree to float32 precision. EDM's
    preconditioners compute in float32 and cast only at the end: there the two are the same
    numbers (the NVlabs/edm comparisons stay bit-exact)."""
    net = _load(model_paths, kind)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 1, 8, 8, generator=g, dtype=torch.float64) * 2
    sigma = torch.tensor([0.05, 1.0, 20.0], dtype=torch.float64)
    labels = torch.eye(3)[[0, 2, 1]] if net.label_dim else None
    with torch.no_grad():
        D64, D32 = net(x, sigma, labels), net(x.to(torch.float32), sigma, labels)
    assert D64.dtype == torch.float64 and D32.dtype == torch.float32 and torch.isfinite(D64).all()
    if isinstance(net, precond.Precond):
        assert torch.equal(D64, D32.to(torch.float64))
    else:
        assert torch.allclose(D64, D32.to(torch.float64), rtol=1e-4, atol=1e-5)
    # The wrappers around it keep the contract: FastDenoiser (every option off: the same D),
    # CalibratedDenoiser with a table and with an OffsetNet, the samplers' counting wrapper.
    table = calibration.CalibrationTable(sigma.sort().values, (1, 8, 8), meta={})
    for k in range(3):
        table.add(k, torch.full((1, 1, 8, 8), 0.1, dtype=torch.float64), torch.zeros(1, 1, 8, 8, dtype=torch.float64))
    wrappers = [precond.FastDenoiser(net), calibration.CalibratedDenoiser(net, table),
                calibration.CalibratedDenoiser(net, calibration.OffsetNet((1, 8, 8))), samplers.CountedDenoiser(net)]
    with torch.no_grad():
        for wrapper in wrappers:
            W64, W32 = wrapper(x, sigma, labels), wrapper(x.to(torch.float32), sigma, labels)
            assert W64.dtype == torch.float64 and W32.dtype == torch.float32, type(wrapper).__name__
        assert torch.equal(wrappers[0](x, sigma, labels), D64)
        assert torch.allclose(wrappers[1](x, sigma, labels), D64 - 0.1, rtol=0, atol=1e-12)


@pytest.fixture(scope='module')
def extractor(random_state_dict):
    return metrics.InceptionFeatures(random_state_dict, name='random-inception (plumbing)', batch_size=2)


@pytest.mark.filterwarnings('ignore::tasks.samplers.SigmaRangeClamped')  # the diffusers models' sigma_min is 0.01
@pytest.mark.parametrize('sampler', list(SAMPLERS))
@pytest.mark.parametrize('kind', MODELS)
def test_every_format_samples_with_every_sampler(model_paths, kind, sampler, extractor):
    """generate on a loaded model: float32 images of the model's shape and the sampler's NFE; and
    once per model (the Inception network on CPU is the cost), metrics.sample_statistics, the
    sweep's path, with features from a random Inception network."""
    net = _load(model_paths, kind)
    settings = SAMPLERS[sampler]
    images, nfe = samplers.generate(net, [0, 1], sampler, **settings)
    assert images.dtype == torch.float32 and images.shape == (2, 1, 8, 8) and torch.isfinite(images).all()
    assert nfe == {'edm': 5, 'ablation': 5, 'dpm_solver': 4}[sampler]
    if sampler == 'dpm_solver':
        stats, nfe_again = metrics.sample_statistics(net, [0, 1], extractor, sampler, batch_size=2, **settings)
        assert stats.n == 2 and nfe_again == nfe


@pytest.mark.parametrize('kind', MODELS)
def test_every_format_gives_a_calibration_table(model_paths, kind):
    """estimate_table on a loaded model at the sigmas EDM's 3-step sampler asks for: finite float64
    sums, whatever the network's own dtype."""
    net = _load(model_paths, kind)
    images = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    sigmas = calibration.queried_sigmas('edm', net, num_steps=3)
    table = calibration.estimate_table(net, images, sigmas, labels=[0, 1, 2, 0] if net.label_dim else None, chunk_size=2)
    assert table.sum_D.dtype == torch.float64 and torch.isfinite(table.offset()).all() and int(table.count.sum()) == 4 * len(sigmas)
