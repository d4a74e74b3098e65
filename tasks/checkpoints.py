"""Every model a spec can name, loaded as a denoiser D(x, sigma, class_labels), without running
any code that a file carries.

A denoiser has sigma_min, sigma_max, round_sigma(sigma), img_channels, img_resolution and
label_dim (tasks.precond). Formats (`load_denoiser(path, format=None)` detects them):

  network.pt  this project's own network.pt / training-state.pt (tasks.train), read with
              torch.load(weights_only=True): the files hold only tensors and plain data.
  edm-pkl     NVlabs/edm snapshots (network-snapshot-*.pkl and the published ones). EDM's
              `persistence` module embeds the Python source of every network class in the pickle
              and a normal pickle.load executes it. Here an allow-list unpickler reads the pickle
              as data: each persistent object becomes a record (class name, state) whose source
              is never executed, tensors are rebuilt by torch's own tensor constructors, and any
              other global is refused by name. The `ema` record is then rebuilt into
              tasks.precond / tasks.networks classes from its class name, constructor arguments
              and tensors (strict state-dict load).
  diffusers   a diffusers `UNet2DModel` saved with save_pretrained (e.g. a local copy of
              google/ddpm-cifar10-32) and its DDPM scheduler config, through the optional
              `diffusers` package (weights from safetensors, or .bin read with weights_only), as
              a discrete-time VP model (precond.VPModelDenoiser) whose noise levels, time input
              (the training-step index, from num_train_timesteps) and prediction type are the
              saved scheduler config's; a key or value whose meaning the loader does not
              reproduce is refused by name (_diffusers_scheduler, _check_unet_config).
"""
import io
import json
import os
import pickle
import re
import zipfile

import torch

from tasks import precond, schedules
from tasks.files import NUMPY_GLOBALS, AllowListUnpickler, CheckpointError, load_torch_file, sha256_file  # noqa: F401 (CheckpointError: re-exported)
from tasks.train import TrainConfig, build_network

FORMATS = ('network.pt', 'edm-pkl', 'diffusers')


def detect_format(path):
    """The format of a model file or directory (see FORMATS), from its content."""
    if not os.path.exists(path):
        raise CheckpointError(f'{path}: no such model file or directory')
    if os.path.isdir(path):
        if any(os.path.isfile(os.path.join(path, sub, 'config.json')) for sub in ('', 'unet')):
            return 'diffusers'
        raise CheckpointError(f'{path}: a directory, but not a diffusers model (no config.json or unet/config.json)')
    if zipfile.is_zipfile(path):
        return 'network.pt'  # torch.save's zip format
    with open(path, 'rb') as f:
        head = f.read(1 << 16)
    if head[:4] == b'PK\x03\x04':  # a zip that lacks its central directory (at the end of the file)
        raise CheckpointError(f'{path}: a damaged or truncated zip (torch) file: its directory at the end is missing')
    if head[:1] == b'\x80' and b'torch_utils.persistence' in head:
        return 'edm-pkl'
    raise CheckpointError(f'{path}: not a model file this project reads: expected a network.pt written by tasks.train '
                          f'(a torch zip file), an EDM snapshot .pkl, or a diffusers model directory')


def snapshot_kimg(path, format=None):
    """At which kimg of training a model file was taken, or None when it does not say: a network.pt
    records it (cur_nimg), EDM names its snapshots network-snapshot-KIMG.pkl."""
    fmt = format or detect_format(path)
    if fmt == 'network.pt':
        blob, _ = read_network_pt(path, mmap=True)
        return blob['cur_nimg'] / 1000 if 'cur_nimg' in blob else None
    match = re.fullmatch(r'network-snapshot-(\d+)\.pkl', os.path.basename(path)) if fmt == 'edm-pkl' else None
    return float(match.group(1)) if match else None


def load_denoiser(path, format=None, map_location='cpu'):
    """The denoiser stored at `path` (file or directory), in eval mode with gradients off.
    `format` overrides detection (one of FORMATS). The result carries `.source` =
    dict(path, format, sha256) for provenance."""
    path = os.fspath(path)
    fmt = format or detect_format(path)
    if fmt not in FORMATS:
        raise CheckpointError(f'{path}: unknown model format {fmt!r}; valid: {", ".join(FORMATS)}')
    if not os.path.exists(path):
        raise CheckpointError(f'{path}: no such model file or directory')
    net = {'network.pt': _load_network_pt, 'edm-pkl': _load_edm_pkl, 'diffusers': _load_diffusers}[fmt](path)
    net = net.to(map_location).eval().requires_grad_(False)
    net.source = dict(path=os.path.abspath(path), format=fmt, sha256=sha256_file(path))
    return net


# ---------------------------------------------------------------------------------------------
# This project's network.pt

NETWORK_PT_KEYS = ('config', 'image_shape', 'label_dim', 'ema')


def read_network_pt(path, mmap=False):
    """(blob, TrainConfig) of a network.pt written by tasks.train, or one CheckpointError line
    for a truncated or foreign file (a bare state dict, a pickled module, ...). With mmap the
    tensors are not read (what `orchestrator validate` does)."""
    blob = load_torch_file(path, mmap=mmap)
    missing = [k for k in NETWORK_PT_KEYS if k not in blob] if isinstance(blob, dict) else NETWORK_PT_KEYS
    if missing:
        held = f'keys {", ".join(map(str, list(blob)[:6]))}{", ..." if len(blob) > 6 else ""}' if isinstance(blob, dict) \
            else type(blob).__name__
        raise CheckpointError(f'{path}: a torch file, but not a network saved by tasks.train (it holds {held}; '
                              f'missing {", ".join(missing)})')
    try:
        return blob, TrainConfig(**blob['config'])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f'{path}: not a network saved by tasks.train (config: {type(e).__name__}: {e})') from None


def _load_network_pt(path):
    blob, config = read_network_pt(path)
    try:
        net = build_network(config, blob['image_shape'], blob['label_dim'])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f'{path}: not a network saved by tasks.train ({type(e).__name__}: {e})') from None
    _load_state(net, blob['ema'], path)
    net.train_config = config
    return net


def _load_state(net, state, path):
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        detail = ' '.join(str(e).split())
        raise CheckpointError(f'{path}: the stored tensors do not fit {type(net).__name__} '
                              f'({detail[:400]}{"..." if len(detail) > 400 else ""})') from None


# ---------------------------------------------------------------------------------------------
# EDM snapshots (.pkl written by NVlabs/edm's persistence module)

class PersistentRecord:
    """What EDM's `_reconstruct_persistent_obj` would have built, kept as data: the class name
    and the object's state (its __dict__). The embedded module source is never executed."""

    def __init__(self, meta):
        if not isinstance(meta, dict) or meta.get('type') != 'class' or 'class_name' not in meta:
            raise pickle.UnpicklingError('malformed EDM persistent object')
        self.class_name, self.state = meta['class_name'], meta.get('state') or {}

    def __repr__(self):
        return f'PersistentRecord({self.class_name})'


class _ModuleRecord:
    """Stand-in for a torch.nn container (ModuleDict, ModuleList, Sequential): holds its state."""

    def __setstate__(self, state):
        self.state = state


def _storage_from_bytes(data):
    """torch.storage._load_from_bytes, which would torch.load the bytes with code execution."""
    return torch.load(io.BytesIO(data), weights_only=True)


def _latin1_bytes(text, encoding='latin1'):
    """How pickle protocols 0-2 spell bytes: _codecs.encode(text, 'latin1'); nothing else."""
    if encoding != 'latin1' or not isinstance(text, str):
        raise pickle.UnpicklingError(f'refused _codecs.encode with encoding {encoding!r}')
    return text.encode('latin1')


_EDM_GLOBALS = {
    '_codecs.encode': _latin1_bytes,
    'torch_utils.persistence._reconstruct_persistent_obj': PersistentRecord,
    'torch._utils._rebuild_tensor_v2': torch._utils._rebuild_tensor_v2,
    'torch._utils._rebuild_parameter': torch._utils._rebuild_parameter,
    'torch._utils._rebuild_parameter_with_state': torch._utils._rebuild_parameter_with_state,
    'torch.storage._load_from_bytes': _storage_from_bytes,
    'collections.OrderedDict': dict,
    **{f'{builtins}.{t.__name__}': t for builtins in ('builtins', '__builtin__') for t in (set, frozenset)},
    'torch.Size': torch.Size,
    'torch.device': torch.device,
    'dnnlib.util.EasyDict': dict,
    **{f'torch.nn.modules.container.{name}': _ModuleRecord for name in ('ModuleDict', 'ModuleList', 'Sequential')},
    **{f'torch.{name}': getattr(torch, name) for name in ('float16', 'bfloat16', 'float32', 'float64', 'int8', 'uint8',
                                                          'int16', 'int32', 'int64', 'bool')},
    **NUMPY_GLOBALS,
}


def read_edm_pickle(path):
    """The content of an EDM .pkl as data (PersistentRecord for every persistent object)."""
    try:
        with open(path, 'rb') as f:
            return AllowListUnpickler(f, _EDM_GLOBALS, 'EDM snapshots').load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, RuntimeError) as e:
        raise CheckpointError(f'{path}: cannot read as an EDM snapshot: {e}') from None


# Each EDM preconditioner class and its default network (EDM's constructor defaults).
_EDM_PRECONDS = {'VPPrecond': (precond.VPPrecond, 'SongUNet'), 'VEPrecond': (precond.VEPrecond, 'SongUNet'),
                 'iDDPMPrecond': (precond.iDDPMPrecond, 'DhariwalUNet'), 'EDMPrecond': (precond.EDMPrecond, 'DhariwalUNet')}
# The positional parameters of EDM's preconditioners, in order.
_EDM_PRECOND_ARGS = ('img_resolution', 'img_channels', 'label_dim', 'use_fp16')


def _state_dict(record, prefix=''):
    """Parameters and persistent buffers of a record tree, named as Module.state_dict names them."""
    state = record.state
    out = {prefix + k: v for k, v in state.get('_parameters', {}).items() if v is not None}
    skip = state.get('_non_persistent_buffers_set', set())
    out.update({prefix + k: v for k, v in state.get('_buffers', {}).items() if v is not None and k not in skip})
    for name, child in state.get('_modules', {}).items():
        if child is not None:
            out.update(_state_dict(child, f'{prefix}{name}.'))
    return out


def _load_edm_pkl(path):
    blob = read_edm_pickle(path)
    ema = blob.get('ema') if isinstance(blob, dict) else blob
    if not isinstance(ema, PersistentRecord) or ema.class_name not in _EDM_PRECONDS:
        found = ema.class_name if isinstance(ema, PersistentRecord) else type(ema).__name__
        raise CheckpointError(f'{path}: expected an EDM snapshot whose `ema` is one of {", ".join(_EDM_PRECONDS)}; '
                              f'found {found}')
    cls, default_network = _EDM_PRECONDS[ema.class_name]
    args, kwargs = ema.state.get('_init_args', ()), dict(ema.state.get('_init_kwargs', {}))
    kwargs.update(zip(_EDM_PRECOND_ARGS, args))
    model = ema.state.get('_modules', {}).get('model')
    model_type = kwargs.setdefault('model_type', default_network)
    if not isinstance(model, PersistentRecord) or model.class_name != model_type:
        raise CheckpointError(f'{path}: {ema.class_name}.model is {getattr(model, "class_name", model)!r}, '
                              f'expected {model_type}')
    try:
        net = cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f'{path}: cannot rebuild {ema.class_name}(**{kwargs}): {e}') from None
    _load_state(net, _state_dict(ema), path)
    net.edm_init_kwargs = kwargs
    return net


# ---------------------------------------------------------------------------------------------
# diffusers UNet2DModel directories

DIFFUSERS_PREDICTIONS = {'epsilon': 'noise', 'sample': 'data', 'v_prediction': 'v'}
# Scheduler classes that sample a model trained as DDPM: the network is trained at step
# n = 0..N-1 on x_n = sqrt(alphas_cumprod[n]) x_0 + sqrt(1 - alphas_cumprod[n]) eps with time input
# n. Each is rebuilt from the saved config by diffusers itself, so its alphas_cumprod is exact.
DIFFUSERS_SCHEDULERS = ('DDPMScheduler', 'DDIMScheduler', 'PNDMScheduler')
# The scheduler config keys that define the noise levels and the output (read through the scheduler).
_SCHEDULE_KEYS = {'num_train_timesteps', 'beta_start', 'beta_end', 'beta_schedule', 'trained_betas', 'prediction_type',
                  'variance_type'}
# Keys that only say how a sampler walks the training steps (which steps, with what offset,
# x_0 clipping, the last alpha, the variance of a stochastic step): D(x; sigma) is the network's
# own prediction at any sigma, and the training step of a level is n whatever they say.
_SAMPLER_KEYS = {'timestep_spacing', 'steps_offset', 'clip_sample', 'clip_sample_range', 'sample_max_value',
                 'dynamic_thresholding_ratio', 'set_alpha_to_one', 'skip_prk_steps', 'tensor_format',
                 '_class_name', '_diffusers_version'}
# Settings that change the model or its use in a way the wrapper does not reproduce: refused when on.
_REFUSED_WHEN_SET = {
    'thresholding': 'dynamic thresholding rewrites x_0 at every step, which a denoiser D(x; sigma) does not do',
    'rescale_betas_zero_snr': 'zero terminal SNR puts the last training step at infinite sigma, which the '
                              'VP wrapper drops (its clip) instead of sampling from it',
}


class DiffusersUNet(torch.nn.Module):
    """model(x_t, t_input, class_labels) around a diffusers UNet2DModel; one-hot labels become
    the class indices diffusers expects. A UNet that also predicts its variance (2 x channels,
    variance_type learned / learned_range) gives its first `out_channels` channels."""

    def __init__(self, unet, out_channels):
        super().__init__()
        self.unet, self.out_channels = unet, out_channels

    def forward(self, x_t, t_input, class_labels=None):
        labels = None if class_labels is None else class_labels.argmax(dim=1)
        return self.unet(x_t, t_input, class_labels=labels).sample[:, :self.out_channels]


def _first_line(e):
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _read_json(file):
    try:
        with open(file) as f:
            return json.load(f)
    except (OSError, ValueError) as e:  # json.JSONDecodeError is a ValueError
        raise CheckpointError(f'{file}: cannot read as JSON ({_first_line(e)})') from None


def _diffusers_scheduler(diffusers, scheduler_file):
    """The scheduler saved in `scheduler_file`, rebuilt by diffusers, after checking that every
    key is one whose meaning for D(x; sigma) is known (one CheckpointError line otherwise)."""
    config = _read_json(scheduler_file)
    class_name = config.get('_class_name', 'DDPMScheduler')
    if class_name not in DIFFUSERS_SCHEDULERS:
        raise CheckpointError(f'{scheduler_file}: _class_name {class_name!r}: its time conditioning is not the DDPM one '
                              f'this loader reproduces ({", ".join(DIFFUSERS_SCHEDULERS)})')
    for key, value in config.items():
        if key not in _SCHEDULE_KEYS | _SAMPLER_KEYS | set(_REFUSED_WHEN_SET):
            raise CheckpointError(f'{scheduler_file}: unknown key {key!r} (= {value!r}): refused rather than ignored')
        if key in _REFUSED_WHEN_SET and value:
            raise CheckpointError(f'{scheduler_file}: {key} = {value!r} is not supported: {_REFUSED_WHEN_SET[key]}')
    try:
        scheduler = getattr(diffusers, class_name).from_config(config)
    except NotImplementedError:  # diffusers' answer to a beta_schedule it does not build
        raise CheckpointError(f'{scheduler_file}: beta_schedule {config.get("beta_schedule")!r} is not one '
                              f'{class_name} builds') from None
    except (ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f'{scheduler_file}: cannot build {class_name} from it ({_first_line(e)})') from None
    N = scheduler.config.num_train_timesteps
    bad = ~((scheduler.betas >= 0) & (scheduler.betas <= 1))  # NaN too
    if bad.any():
        n = int(bad.nonzero()[0])
        raise CheckpointError(f'{scheduler_file}: betas: expected values in [0, 1], got {float(scheduler.betas[n])!r} at step {n}'
                              + (' (trained_betas)' if config.get('trained_betas') is not None else ''))
    if len(scheduler.alphas_cumprod) != N:
        raise CheckpointError(f'{scheduler_file}: trained_betas has {len(scheduler.alphas_cumprod)} values but '
                              f'num_train_timesteps = {N}')
    if scheduler.config.prediction_type not in DIFFUSERS_PREDICTIONS:
        raise CheckpointError(f'{scheduler_file}: prediction_type {scheduler.config.prediction_type!r} is not one of '
                              f'{", ".join(DIFFUSERS_PREDICTIONS)}')
    return scheduler


# UNet2DModel config keys that decide what conditioning the network takes: the one value
# DiffusersUNet handles, and why.
_UNET_CONDITIONING = {
    '_class_name': ('UNet2DModel', 'the wrapper gives the network x_t, a time input and class indices, no text'),
    'time_embedding_type': ('positional', 'the time input is a fractional training-step index'),
    'class_embed_type': (None, 'class labels are given as indices of num_class_embeds'),
}


def _check_unet_config(config_file, variance_type):
    """The UNet's own conditioning must be what DiffusersUNet feeds it: a positional embedding of the
    time input and, if any, class indices."""
    config = _read_json(config_file)
    for key, (handled, why) in _UNET_CONDITIONING.items():
        if config.get(key, handled) != handled:
            raise CheckpointError(f'{config_file}: {key} {config[key]!r} is not supported (only {handled!r}: {why})')
    size = config.get('sample_size')
    if isinstance(size, (list, tuple)) and len(set(size)) != 1:
        raise CheckpointError(f'{config_file}: sample_size {size!r}: only square images are supported')
    in_channels, out_channels = config.get('in_channels', 3), config.get('out_channels', 3)
    learned = variance_type in ('learned', 'learned_range')
    if out_channels != in_channels * (2 if learned else 1):
        raise CheckpointError(f'{config_file}: out_channels {out_channels} with in_channels {in_channels} and the '
                              f"scheduler's variance_type {variance_type!r}: expected {in_channels * (2 if learned else 1)}")


def _load_diffusers(path):
    try:
        import diffusers
    except ImportError:
        raise CheckpointError(f"{path}: a diffusers model needs the optional package: pip install '.[diffusers]'") from None
    sub = 'unet' if os.path.isfile(os.path.join(path, 'unet', 'config.json')) else ''
    scheduler_file = next((f for f in (os.path.join(path, 'scheduler', 'scheduler_config.json'),
                                       os.path.join(path, 'scheduler_config.json')) if os.path.isfile(f)), None)
    if scheduler_file is None:
        raise CheckpointError(f'{path}: no scheduler_config.json (or scheduler/scheduler_config.json): the noise schedule '
                              'of the model is needed to turn it into a denoiser')
    scheduler = _diffusers_scheduler(diffusers, scheduler_file)
    _check_unet_config(os.path.join(path, sub, 'config.json'), scheduler.config.get('variance_type'))
    try:
        unet = diffusers.UNet2DModel.from_pretrained(path, subfolder=sub or None, low_cpu_mem_usage=False)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f'{path}: cannot load the diffusers UNet2DModel ({_first_line(e)})') from None
    # The noise levels are the scheduler's own alphas_cumprod (float32 in diffusers), sigma in float64;
    # the time input follows its num_train_timesteps (precond.VPModelDenoiser).
    # A first level of alphas_cumprod = 1 (sigma 0) is dropped there (docs/science.md, decision on discrete-time models).
    try:
        noise_schedule = schedules.VPDiscreteNoiseSchedule(alphas_cumprod=scheduler.alphas_cumprod.to(torch.float64))
    except ValueError as e:
        raise CheckpointError(f'{scheduler_file}: not a noise schedule a denoiser can be made of ({e})') from None
    net = precond.VPModelDenoiser(DiffusersUNet(unet, unet.config.in_channels), noise_schedule,
                                  prediction=DIFFUSERS_PREDICTIONS[scheduler.config.prediction_type], discrete_time=True,
                                  num_train_timesteps=scheduler.config.num_train_timesteps)
    size = unet.config.sample_size
    net.img_resolution = size if isinstance(size, int) else size[0]
    net.img_channels = unet.config.in_channels
    net.label_dim = unet.config.num_class_embeds or 0
    return net
