"""tasks.checkpoints: every model format as a denoiser, and files that must never run code."""
import json
import os
import pickle
import types

import numpy as np
import pytest
import torch

from tasks import checkpoints, networks, precond, samplers, schedules
from edm_format import write_edm_snapshot  # tests/ helper

SNAPSHOTS = os.path.join(os.path.dirname(__file__), '..', '..', 'shared', 'data', 'edm-snapshots')
needs_snapshots = pytest.mark.skipif(not os.path.isdir(SNAPSHOTS),
                                     reason='../shared/data/edm-snapshots is not beside this checkout (a user clone has none)')


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@needs_snapshots
@pytest.mark.parametrize('name', ['ddpmpp-edm-uncond', 'adm-edm-cond'])
def test_edm_snapshots_give_edms_own_outputs(name):
    """Snapshots written by NVlabs/edm's code: D on fixed inputs equals what EDM's code returned."""
    net = checkpoints.load_denoiser(os.path.join(SNAPSHOTS, f'{name}.pkl'))
    expected = torch.load(os.path.join(SNAPSHOTS, f'{name}.expected.pt'), weights_only=True)
    D = net(expected['x'], expected['sigma'], expected['class_labels'])
    assert _rel(D, expected['D']) < 1e-5
    assert net.sigma_min == float(expected['sigma_min']) and net.sigma_max == float(expected['sigma_max'])
    assert torch.equal(net.round_sigma(expected['round_sigma_in']), expected['round_sigma_out'])
    assert net.label_dim == (10 if 'cond' in name and 'uncond' not in name else 0)
    assert net.source['format'] == 'edm-pkl' and len(net.source['sha256']) == 64
    assert isinstance(net.model, networks.DhariwalUNet if name.startswith('adm') else networks.SongUNet)


@needs_snapshots
def test_evil_snapshot_never_runs_its_source(tmp_path, monkeypatch):
    marker = tmp_path / 'pwned'
    monkeypatch.setenv('PWNED_MARKER', str(marker))
    with pytest.raises(checkpoints.CheckpointError, match='evil-module-source.pkl'):
        checkpoints.load_denoiser(os.path.join(SNAPSHOTS, 'evil-module-source.pkl'))
    assert not marker.exists()


class _Reduce:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


def test_os_system_reduce_is_refused_in_every_format(tmp_path):
    marker = tmp_path / 'pwned'
    evil_pkl = tmp_path / 'network-snapshot-000000.pkl'
    # An EDM-looking pickle (the persistence global in its header) with an os.system reduce.
    evil_pkl.write_bytes(b'\x80\x04' + pickle.dumps(dict(note='torch_utils.persistence', ema=_Reduce(marker)), protocol=4)[2:])
    with pytest.raises(checkpoints.CheckpointError, match=r'refused global (posix|os|nt)\.system'):
        checkpoints.load_denoiser(evil_pkl)
    evil_pt = tmp_path / 'network.pt'
    torch.save(dict(ema=_Reduce(marker)), evil_pt)
    with pytest.raises(checkpoints.CheckpointError, match=r'network\.pt: refused: it would import (posix|os|nt)\.system'):
        checkpoints.load_denoiser(evil_pt)
    evil_batch = tmp_path / 'cifar-10-batches-py'
    evil_batch.mkdir()
    for name in [f'data_batch_{i}' for i in range(1, 6)]:
        (evil_batch / name).write_bytes(pickle.dumps(_Reduce(marker)))
    from tasks import data
    with pytest.raises(data.DataError, match=r'refused global (posix|os|nt)\.system'):
        data.load_cifar10(str(evil_batch))
    assert not marker.exists()


# Every preconditioner with the networks EDM pairs it with (and the ones it can hold), written in
# EDM's format from our own modules: the loader must rebuild exactly the same function.
_SONG = dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8], dropout=0.0)
_CASES = {
    'vp-ddpmpp': (precond.VPPrecond, dict(beta_d=19.9, beta_min=0.1, M=1000, epsilon_t=1e-5),
                  'SongUNet', dict(_SONG, embedding_type='positional', encoder_type='standard', channel_mult_noise=1)),
    've-ncsnpp': (precond.VEPrecond, dict(sigma_min=0.02, sigma_max=100),
                  'SongUNet', dict(_SONG, embedding_type='fourier', encoder_type='residual', channel_mult_noise=2,
                                   resample_filter=[1, 3, 3, 1])),
    've-ncsnpp-skip': (precond.VEPrecond, {}, 'SongUNet', dict(_SONG, embedding_type='fourier', encoder_type='skip',
                                                                decoder_type='skip', channel_mult_noise=2)),
    'iddpm-adm': (precond.iDDPMPrecond, dict(C_1=0.001, C_2=0.008, M=1000),
                  'DhariwalUNet', dict(model_channels=32, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8], dropout=0.0)),
    'edm-ddpmpp-cond-augment': (precond.EDMPrecond, dict(sigma_data=np.float64(0.5)),
                                'SongUNet', dict(_SONG, augment_dim=9, label_dim=10)),
    'edm-adm-cond-augment': (precond.EDMPrecond, {}, 'DhariwalUNet',
                             dict(model_channels=32, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8], dropout=0.0,
                                  augment_dim=9, label_dim=10)),
}


def _random_net(case):
    cls, precond_kwargs, model_type, model_kwargs = _CASES[case]
    model_kwargs = dict(model_kwargs)
    label_dim = model_kwargs.pop('label_dim', 0)
    torch.manual_seed(0)
    net = cls(img_resolution=16, img_channels=3, label_dim=label_dim, model_type=model_type, **precond_kwargs, **model_kwargs)
    with torch.no_grad():  # move every parameter off its initial value (zero-initialised layers matter)
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    init = dict(img_resolution=16, img_channels=3, label_dim=label_dim, model_type=model_type, **precond_kwargs, **model_kwargs)
    model_init = dict(img_resolution=16, in_channels=3, out_channels=3 * cls.out_channel_factor, label_dim=label_dim,
                      **model_kwargs)
    return net.eval(), init, model_init


@pytest.mark.parametrize('case', list(_CASES))
@pytest.mark.parametrize('protocol,numpy_core', [(4, False), (2, True)])
def test_every_edm_configuration_round_trips(tmp_path, case, protocol, numpy_core):
    net, init, model_init = _random_net(case)
    path = tmp_path / 'network-snapshot-000100.pkl'
    write_edm_snapshot(path, net, init, model_init, protocol=protocol, numpy_core=numpy_core)
    if numpy_core and case == 'edm-ddpmpp-cond-augment':
        assert b'numpy.core.multiarray\nscalar' in path.read_bytes()  # the 2022 spelling is exercised
    loaded = checkpoints.load_denoiser(path)
    assert type(loaded) is type(net) and loaded.model_type == net.model_type
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 3, 16, 16, generator=g) * 3
    sigma = torch.tensor([0.003, 0.1, 1.0, 10.0, 70.0], dtype=torch.float64)
    labels = torch.eye(10)[torch.tensor([0, 3, 9, 3, 1])] if net.label_dim else None
    with torch.no_grad():
        assert torch.equal(loaded(x, sigma, labels), net(x, sigma, labels))
        if net.model.map_augment is not None:  # augment labels reach the network
            aug = torch.randn(5, 9, generator=g)
            assert torch.equal(loaded(x, sigma, labels, augment_labels=aug), net(x, sigma, labels, augment_labels=aug))
    assert (loaded.sigma_min, loaded.sigma_max) == (net.sigma_min, net.sigma_max)
    assert torch.equal(loaded.round_sigma(sigma), net.round_sigma(sigma))


def test_edm_precond_ranges_match_edm_constants():
    """EDM's published ranges: VP sigma(1e-5)..sigma(1) with beta_d 19.9 (sigma_max 152.2 in
    float32, as EDM computes it); iDDPM's range is u_{M-1}..u_0 of its float32 levels."""
    vp = precond.VPPrecond(16, 3, **networks.preset_kwargs('ddpmpp-tiny'))
    assert vp.sigma_max == pytest.approx(152.2, abs=0.05)
    assert vp.sigma_max == float(np.sqrt(np.expm1(np.float32(0.5 * 19.9 + 0.1)).astype(np.float32)))
    iddpm = precond.iDDPMPrecond(16, 3, model_type='DhariwalUNet', model_channels=32, channel_mult=[1], num_blocks=1,
                                 attn_resolutions=[])
    assert iddpm.u.dtype == torch.float32 and (iddpm.sigma_min, iddpm.sigma_max) == (float(iddpm.u[999]), float(iddpm.u[0]))


def test_shape_mismatch_and_wrong_files_name_the_file(tmp_path):
    net, init, model_init = _random_net('vp-ddpmpp')
    bad_init = dict(init, model_channels=32)  # the tensors are for 16 channels
    path = tmp_path / 'wrong.pkl'
    write_edm_snapshot(path, net, bad_init, dict(model_init, model_channels=32))
    with pytest.raises(checkpoints.CheckpointError, match=r'wrong\.pkl: the stored tensors do not fit VPPrecond'):
        checkpoints.load_denoiser(path)
    truncated = tmp_path / 'truncated.pkl'
    truncated.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(checkpoints.CheckpointError, match=r'truncated\.pkl: cannot read as an EDM snapshot'):
        checkpoints.load_denoiser(truncated)
    junk = tmp_path / 'junk.bin'
    junk.write_bytes(os.urandom(256))
    with pytest.raises(checkpoints.CheckpointError, match=r'junk\.bin: not a model file'):
        checkpoints.load_denoiser(junk)
    with pytest.raises(checkpoints.CheckpointError, match=r'missing\.pkl: no such model file'):
        checkpoints.load_denoiser(tmp_path / 'missing.pkl')
    with pytest.raises(checkpoints.CheckpointError, match='not a diffusers model'):
        checkpoints.load_denoiser(tmp_path)
    torch.save({'weights': 1}, tmp_path / 'other.pt')
    with pytest.raises(checkpoints.CheckpointError, match=r'other\.pt: a torch file, but not a network saved by '
                                                          r'tasks.train \(it holds keys weights; missing config'):
        checkpoints.load_denoiser(tmp_path / 'other.pt')
    with pytest.raises(checkpoints.CheckpointError, match='unknown model format'):
        checkpoints.load_denoiser(tmp_path / 'other.pt', format='onnx')


# ---------------------------------------------------------------------------------------------
# diffusers

@pytest.mark.parametrize('N', [100, 1000])
@pytest.mark.parametrize('prediction_type', ['epsilon', 'sample', 'v_prediction'])
def test_diffusers_unet_is_the_vp_wrapper_of_its_own_output(tmp_path, prediction_type, N):
    """At the noise level of DDPM step n, D(x; sigma_n) is the data prediction implied by the
    UNet's output at timestep n and x_n = sqrt(abar_n) x (Ho et al. 2020; Salimans & Ho 2022)."""
    diffusers = pytest.importorskip('diffusers', reason="diffusers is an optional extra: pip install '.[diffusers]'")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                                 block_out_channels=(32, 32), down_block_types=('DownBlock2D', 'DownBlock2D'),
                                 up_block_types=('UpBlock2D', 'UpBlock2D'), norm_num_groups=8)
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=N, beta_schedule='linear', prediction_type=prediction_type)
    unet.save_pretrained(tmp_path / 'model' / 'unet')
    scheduler.save_pretrained(tmp_path / 'model' / 'scheduler')
    net = checkpoints.load_denoiser(tmp_path / 'model')
    assert net.source['format'] == 'diffusers' and (net.img_channels, net.img_resolution, net.label_dim) == (3, 8, 0)

    abar = scheduler.alphas_cumprod.to(torch.float64)
    x = torch.randn(4, 3, 8, 8)
    for n in (0, 10, N // 2, N - 1):
        alpha, std = abar[n].sqrt(), (1 - abar[n]).sqrt()
        sigma = float(std / alpha)
        x_t = (alpha * x).float()
        with torch.no_grad():
            out = unet(x_t, torch.full((4,), n), return_dict=False)[0].double()
        expected = {'epsilon': (x_t - std * out) / alpha, 'sample': out,
                    'v_prediction': alpha * x_t - std * out}[prediction_type]
        with torch.no_grad():
            D = net(x, torch.full((4,), sigma, dtype=torch.float64))
        assert _rel(D.double(), expected) < 1e-5, n
    assert net.sigma_max == pytest.approx(float(((1 - abar[-1]) / abar[-1]).sqrt()), rel=1e-9)


def _tiny_unet(diffusers, **kwargs):
    torch.manual_seed(0)
    return diffusers.UNet2DModel(**dict(dict(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                                             block_out_channels=(16, 16), down_block_types=('DownBlock2D', 'DownBlock2D'),
                                             up_block_types=('UpBlock2D', 'UpBlock2D'), norm_num_groups=8), **kwargs))


def _diffusers_dir(tmp_path, scheduler, unet=None, **config_changes):
    """A diffusers model directory (unet/ and scheduler/, as a pipeline saves them); config_changes
    edit the saved scheduler_config.json (None deletes a key)."""
    diffusers = pytest.importorskip('diffusers', reason="diffusers is an optional extra: pip install '.[diffusers]'")
    path = tmp_path / 'model'
    (unet or _tiny_unet(diffusers)).save_pretrained(path / 'unet')
    scheduler.save_pretrained(path / 'scheduler')
    if config_changes:
        config_file = path / 'scheduler' / 'scheduler_config.json'
        config = dict(json.loads(config_file.read_text()), **config_changes)
        config_file.write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    return path


def _record_time_inputs(net, output=lambda x_t, t: torch.zeros_like(x_t)):
    """Replace the loaded UNet's forward by `output(x_t, t)` and record every time input it gets."""
    seen = []

    def forward(sample, timestep, class_labels=None, return_dict=True):
        seen.append(timestep.detach().clone())
        return types.SimpleNamespace(sample=output(sample, timestep))

    net.model.unet.forward = forward
    return seen


@pytest.mark.parametrize('beta_schedule', ['linear', 'squaredcos_cap_v2'])
def test_diffusers_1000_steps_keep_dpm_solvers_time_input_bit_for_bit(tmp_path, beta_schedule):
    """Pinned before the time input learned N: a 1000-step model receives DPM-Solver's
    model_wrapper input (t - 1/K) * 1000 bit for bit, K the levels kept by the reference's clip
    (1000 for linear, 996 for the cosine schedule: docs/science.md, decision on discrete-time models)."""
    diffusers = pytest.importorskip('diffusers', reason="diffusers is an optional extra: pip install '.[diffusers]'")
    net = checkpoints.load_denoiser(_diffusers_dir(tmp_path, diffusers.DDPMScheduler(beta_schedule=beta_schedule)))
    ns = net.noise_schedule
    assert ns.total_N == {'linear': 1000, 'squaredcos_cap_v2': 996}[beta_schedule]
    seen = _record_time_inputs(net)
    levels = ns.sigma(ns.t_array)
    sigma = torch.cat([levels[::7], levels[-1:], torch.tensor([0.01, 0.3, 2.0, 40.0], dtype=torch.float64)])
    net(torch.zeros(len(sigma), 3, 8, 8), sigma)
    expected = ((ns.t_of_sigma(sigma) - 1.0 / ns.total_N) * 1000).to(torch.float32)  # the formula of the reference
    assert torch.equal(seen[0], expected)
    assert float(seen[0][len(levels[::7])]) == pytest.approx((ns.total_N - 1) * 1000 / ns.total_N, abs=1e-3)


def _clip_kept(abar):
    """How many levels the reference's numerical_clip_alpha keeps: those with log-SNR >= -5.1."""
    return int((0.5 * (abar / (1 - abar)).log() >= -5.1).sum())


def _trained_betas(N):
    return np.linspace(1e-4, 0.05, N) ** 1.5  # any betas of the model's own


@pytest.mark.parametrize('N', [100, 1000, 4000])
@pytest.mark.parametrize('beta_schedule', ['linear', 'scaled_linear', 'squaredcos_cap_v2', 'trained_betas'])
def test_diffusers_sigma_grid_and_time_input_are_the_schedulers(tmp_path, beta_schedule, N):
    """The noise levels are the scheduler's own, sigma_n = sqrt((1 - abar_n) / abar_n) of its
    alphas_cumprod, and at sigma_n the UNet receives n, its training step, for any
    num_train_timesteps N (issue #60 of DPM-Solver: a fixed 1000 gave a 100-step model 10 n).
    Levels the reference's clip drops (log-SNR < -5.1) are not on the grid. The one exception is
    N = 1000 with dropped levels (cosine, K = 996 kept), which keeps the reference's n * 1000 / K
    (pinned by test_diffusers_1000_steps_keep_dpm_solvers_time_input_bit_for_bit)."""
    diffusers = pytest.importorskip('diffusers', reason="diffusers is an optional extra: pip install '.[diffusers]'")
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=N, trained_betas=_trained_betas(N)) \
        if beta_schedule == 'trained_betas' else diffusers.DDPMScheduler(num_train_timesteps=N, beta_schedule=beta_schedule)
    net = checkpoints.load_denoiser(_diffusers_dir(tmp_path, scheduler))
    abar = scheduler.alphas_cumprod.to(torch.float64)
    sigmas = ((1 - abar) / abar).sqrt()
    K = _clip_kept(abar)
    ns = net.noise_schedule
    assert ns.total_N == K and (K == N) == (beta_schedule in ('linear', 'scaled_linear', 'trained_betas') and N < 4000)
    assert torch.allclose(ns.sigma(ns.t_array), sigmas[:K], rtol=1e-12, atol=0)
    assert net.sigma_min == pytest.approx(float(sigmas[0]), rel=1e-12)
    assert net.sigma_max == pytest.approx(float(sigmas[K - 1]), rel=1e-12)

    seen = _record_time_inputs(net)
    n = torch.arange(K)
    net(torch.zeros(K, 3, 8, 8), sigmas[:K])
    if N == 1000 and K < N:
        assert torch.allclose(seen[0].double(), n.double() * 1000 / K, rtol=1e-6, atol=1e-4)
    else:
        assert torch.allclose(seen[0].double(), n.double(), rtol=1e-7, atol=1e-9)  # n up to float rounding
    # Between two training levels the input lies between their indices.
    mid = (sigmas[:K - 1] * sigmas[1:K]).sqrt()
    net(torch.zeros(K - 1, 3, 8, 8), mid)
    scale = 1000 / K if N == 1000 else 1
    assert bool(((seen[1] > n[:-1] * scale) & (seen[1] < n[1:] * scale)).all())


@pytest.mark.parametrize('prediction_type', ['epsilon', 'v_prediction', 'sample'])
def test_diffusers_prediction_types_give_D_in_closed_form(tmp_path, prediction_type):
    """D(x; sigma) in the non-scaled space (x = y + sigma n) from a UNet whose output F is known.
    With alpha = 1/sqrt(1 + sigma^2) and x_t = alpha x: epsilon D = x - sigma F; v_prediction
    (v = alpha eps - std x_0) D = alpha^2 x - sigma alpha F; sample D = F. The float32 UNet gets
    x_t cast to float32 (the dtype contract); the conversion stays in x's float64."""
    diffusers = pytest.importorskip('diffusers', reason="diffusers is an optional extra: pip install '.[diffusers]'")
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=100, prediction_type=prediction_type)
    net = checkpoints.load_denoiser(_diffusers_dir(tmp_path, scheduler))
    F = lambda x_t, t: 0.5 * x_t + 0.01 * t.to(x_t.dtype).reshape(-1, 1, 1, 1)
    seen = _record_time_inputs(net, F)
    abar = scheduler.alphas_cumprod.to(torch.float64)
    n = torch.tensor([0, 7, 50, 99])
    sigma = ((1 - abar[n]) / abar[n]).sqrt()
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    D = net(x, sigma)
    assert torch.allclose(seen[0].double(), n.double(), rtol=1e-7, atol=1e-9)
    s = sigma.reshape(-1, 1, 1, 1)
    alpha = 1 / (1 + s ** 2).sqrt()
    out = F((alpha * x).to(torch.float32), n).to(torch.float64)
    assert D.dtype == torch.float64  # in x's dtype
    expected = {'epsilon': x - s * out, 'v_prediction': alpha ** 2 * x - s * alpha * out, 'sample': out}[prediction_type]
    assert torch.allclose(D, expected, rtol=1e-10, atol=1e-12)


def test_diffusers_learned_variance_gives_the_mean_channels(tmp_path):
    """A UNet that also predicts its variance (variance_type learned_range, 2 x channels): D uses
    the first half, as iDDPMPrecond does."""
    diffusers = pytest.importorskip('diffusers', reason="diffusers is an optional extra: pip install '.[diffusers]'")
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=100, variance_type='learned_range')
    net = checkpoints.load_denoiser(_diffusers_dir(tmp_path, scheduler, _tiny_unet(diffusers, out_channels=6)))
    _record_time_inputs(net, lambda x_t, t: torch.cat([torch.ones_like(x_t), 7 * torch.ones_like(x_t)], dim=1))
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    assert torch.allclose(net(x, torch.tensor([0.5, 2.0], dtype=torch.float64)),
                          x - torch.tensor([0.5, 2.0], dtype=torch.float64).reshape(-1, 1, 1, 1), atol=1e-12)


@pytest.mark.parametrize('scheduler_class,changes', [
    ('DDIMScheduler', {}), ('PNDMScheduler', dict(skip_prk_steps=True)),
    ('DDPMScheduler', dict(steps_offset=1, timestep_spacing='trailing', clip_sample=False, variance_type='fixed_large')),
    ('DDPMScheduler', dict(_class_name=None, _diffusers_version=None, tensor_format='pt')),  # a hand-written or 0.1-era config
])
def test_diffusers_sampler_settings_do_not_change_the_denoiser(tmp_path, scheduler_class, changes):
    """Keys that only choose how a sampler walks the training steps (steps_offset, timestep_spacing,
    clipping, DDIM / PNDM instead of DDPM) leave the levels and the time inputs as they are."""
    diffusers = pytest.importorskip('diffusers', reason="diffusers is an optional extra: pip install '.[diffusers]'")
    nets = []
    for name, cls, kw in (('a', 'DDPMScheduler', {}), ('b', scheduler_class, changes)):
        scheduler = getattr(diffusers, cls)(num_train_timesteps=100, beta_schedule='scaled_linear')
        nets.append(checkpoints.load_denoiser(_diffusers_dir(tmp_path / name, scheduler, **kw)))
    seen = [_record_time_inputs(net) for net in nets]
    sigma = torch.tensor([0.02, 0.5, 3.0, 50.0], dtype=torch.float64)
    for net in nets:
        net(torch.zeros(4, 3, 8, 8), sigma)
    assert torch.equal(nets[0].noise_schedule.log_alpha_array, nets[1].noise_schedule.log_alpha_array)
    assert torch.equal(seen[0][0], seen[1][0])


@pytest.mark.parametrize('changes,unet_kwargs,match', [
    (dict(beta_schedule='cubic'), {}, r"scheduler_config\.json: beta_schedule 'cubic' is not one DDPMScheduler builds"),
    (dict(prediction_type='flow'), {}, r"scheduler_config\.json: prediction_type 'flow' is not one of epsilon"),
    (dict(_class_name='EulerDiscreteScheduler'), {}, r"scheduler_config\.json: _class_name 'EulerDiscreteScheduler'"),
    (dict(_class_name='ScoreSdeVeScheduler'), {}, r"scheduler_config\.json: _class_name 'ScoreSdeVeScheduler'"),
    (dict(timestep_type='continuous'), {}, r"scheduler_config\.json: unknown key 'timestep_type' \(= 'continuous'\)"),
    (dict(rescale_betas_zero_snr=True), {}, r"scheduler_config\.json: rescale_betas_zero_snr = True is not supported"),
    (dict(thresholding=True), {}, r"scheduler_config\.json: thresholding = True is not supported"),
    (dict(trained_betas=[1e-4] * 99), {}, r"scheduler_config\.json: trained_betas has 99 values but num_train_timesteps = 100"),
    ({}, dict(class_embed_type='timestep'), r"unet/config\.json: class_embed_type 'timestep' is not supported"),
    ({}, dict(time_embedding_type='fourier'), r"unet/config\.json: time_embedding_type 'fourier' is not supported"),
    ({}, dict(out_channels=6), r"unet/config\.json: out_channels 6 with in_channels 3 and the scheduler's variance_type"),
])
def test_diffusers_configs_the_wrapper_cannot_reproduce_are_refused_by_name(tmp_path, changes, unet_kwargs, match):
    diffusers = pytest.importorskip('diffusers', reason="diffusers is an optional extra: pip install '.[diffusers]'")
    unet = _tiny_unet(diffusers, **unet_kwargs) if 'out_channels' in unet_kwargs else None
    path = _diffusers_dir(tmp_path, diffusers.DDPMScheduler(num_train_timesteps=100), unet, **changes)
    if unet_kwargs and unet is None:  # conditioning the tiny UNet cannot be built with: edit its saved config
        config_file = path / 'unet' / 'config.json'
        config_file.write_text(json.dumps(dict(json.loads(config_file.read_text()), **unet_kwargs)))
    with pytest.raises(checkpoints.CheckpointError, match=match) as error:
        checkpoints.load_denoiser(path)
    assert '\n' not in str(error.value)


def test_diffusers_text_conditional_unet_is_refused(tmp_path):
    diffusers = pytest.importorskip('diffusers', reason="diffusers is an optional extra: pip install '.[diffusers]'")
    path = _diffusers_dir(tmp_path, diffusers.DDPMScheduler(num_train_timesteps=100))
    config_file = path / 'unet' / 'config.json'
    config_file.write_text(json.dumps(dict(json.loads(config_file.read_text()), _class_name='UNet2DConditionModel')))
    with pytest.raises(checkpoints.CheckpointError, match=r"unet/config\.json: _class_name 'UNet2DConditionModel' is not"):
        checkpoints.load_denoiser(path)


def test_diffusers_directory_without_scheduler_is_refused(tmp_path):
    pytest.importorskip('diffusers', reason="diffusers is an optional extra: pip install '.[diffusers]'")
    (tmp_path / 'config.json').write_text(json.dumps({'_class_name': 'UNet2DModel'}))
    with pytest.raises(checkpoints.CheckpointError, match='no scheduler_config.json'):
        checkpoints.load_denoiser(tmp_path)


# ---------------------------------------------------------------------------------------------
# Reference fidelity found in review.

def test_cosine_schedule_clip_shrinks_N_as_the_reference():
    """DPM-Solver's numerical_clip_alpha on the iDDPM cosine schedule: the levels with log-SNR
    below -5.1 are dropped and time is re-spaced over the N' kept levels, so t = 1 is the last
    kept level (not an extrapolation), the end time is 1/N' and the model time (t - 1/N') 1000."""
    N = 1000
    s = 0.008
    f = lambda t: np.cos((t / N + s) / (1 + s) * np.pi / 2) ** 2
    betas = np.array([min(1 - f(i + 1) / f(i), 0.999) for i in range(N)])  # Nichol & Dhariwal Eq. 17
    abar = np.cumprod(1 - betas)
    lam = 0.5 * np.log(abar / (1 - abar))
    kept = int((lam >= -5.1).sum())
    assert kept < N
    ns = schedules.VPDiscreteNoiseSchedule(betas=torch.tensor(betas))
    assert ns.total_N == kept
    assert float(ns.lambda_(1.0)) == pytest.approx(lam[kept - 1], abs=1e-9)
    assert ns.default_t_end(10) == 1 / kept
    wrapper = precond.VPModelDenoiser(lambda x, t, labels=None: x, ns, 'noise', num_train_timesteps=N)
    assert float(wrapper.model_time(torch.tensor(1.0, dtype=torch.float64))) == pytest.approx((1 - 1 / kept) * 1000)


def test_ablation_vp_default_range_is_generate_py_s():
    """generate.py's VP defaults use beta_d = 19.9: sigma_max = sqrt(e^10.05 - 1) = 152.2."""
    from tasks import calibration, oracles
    stand_in = oracles.GaussianMixtureDenoiser([1.0], [[0.0]], [1.0])
    stand_in.sigma_min, stand_in.sigma_max = 0.0, float('inf')
    sig = calibration.queried_sigmas('ablation', stand_in, num_steps=8, solver='euler', discretization='vp', schedule='vp',
                                     scaling='vp')
    assert float(sig.max()) == pytest.approx(np.sqrt(np.expm1(10.05)), rel=1e-9) and float(sig.max()) == pytest.approx(152.2, abs=0.05)
    assert float(sig.min()) == pytest.approx(np.sqrt(np.expm1(0.5 * 19.9 * 1e-6 + 0.1 * 1e-3)), rel=1e-9)


def test_generate_draws_labels_from_each_seed():
    """Conditional sampling as generate.py: the class of an image depends on its seed only
    (any batch size), and class_idx fixes it."""
    net, _, _ = _random_net('edm-adm-cond-augment')
    _, _, a = samplers.generate(net, range(6), 'edm', num_steps=2, batch_size=6, return_labels=True)
    images_b, _, b = samplers.generate(net, range(6), 'edm', num_steps=2, batch_size=4, return_labels=True)
    assert torch.equal(a, b) and a.sum(1).eq(1).all() and len(set(a.argmax(1).tolist())) > 1
    _, _, fixed = samplers.generate(net, range(6), 'edm', num_steps=2, batch_size=6, class_idx=7, return_labels=True)
    assert fixed.argmax(1).eq(7).all()
    with pytest.raises(ValueError, match='out of range'):
        samplers.generate(net, range(2), 'edm', num_steps=2, class_idx=10)


def test_diffusers_betas_outside_0_1_are_refused_naming_betas(tmp_path):
    """trained_betas with a beta above 1 (or below 0) was refused as 'alphas_cumprod ... at step 49'."""
    diffusers = pytest.importorskip('diffusers', reason="diffusers is an optional extra: pip install '.[diffusers]'")
    betas = np.linspace(1e-4, 0.02, 50)
    betas[-1] = 1.5
    path = _diffusers_dir(tmp_path, diffusers.DDPMScheduler(num_train_timesteps=50, trained_betas=betas))
    with pytest.raises(checkpoints.CheckpointError, match=r'scheduler_config.json: betas: expected values in \[0, 1\], got '
                                                          r'1.5 at step 49 \(trained_betas\)$'):
        checkpoints.load_denoiser(path)
