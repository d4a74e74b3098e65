"""Preconditioning (EDM Table 1) and adapters that turn any model into a denoiser D(x; sigma).

A denoiser here is a callable D(x, sigma, class_labels=None) in EDM's non-scaled space
(x = y + sigma * n, s = 1) with attributes sigma_min, sigma_max and round_sigma(sigma). Samplers
and the calibration code only ever see this interface.

EDM Table 1 (all four use D(x; sigma) = c_skip x + c_out F(c_in x; c_noise)):

    VP:     c_skip 1, c_out -sigma, c_in 1/sqrt(sigma^2+1), c_noise (M-1) sigma^-1(sigma)
    VE:     c_skip 1, c_out sigma,  c_in 1,                 c_noise log(sigma/2)
    iDDPM:  c_skip 1, c_out -sigma, c_in 1/sqrt(sigma^2+1), c_noise M-1-argmin_j |u_j - sigma|
    EDM:    c_skip sigma_data^2/(sigma^2+sigma_data^2), c_out sigma sigma_data/sqrt(sigma^2+sigma_data^2),
            c_in 1/sqrt(sigma^2+sigma_data^2), c_noise log(sigma)/4
"""
import torch

from tasks import schedules
from tasks.networks import NETWORKS


class Precond(torch.nn.Module):
    """Shared part of the four preconditioners: holds `model` (a SongUNet or DhariwalUNet with
    EDM's parameter names, so EDM state dicts load strictly) and evaluates
    D = c_skip x + c_out F(c_in x; c_noise)."""
    out_channel_factor = 1

    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, model_type='SongUNet', **model_kwargs):
        """model_type=None builds no network: the noise-level interface alone (sigma_min,
        sigma_max, round_sigma), which is all a sampler's sigma grid depends on."""
        super().__init__()
        if model_type is not None and model_type not in NETWORKS:
            raise ValueError(f'unknown model_type {model_type!r}; valid: {", ".join(NETWORKS)}')
        self.img_resolution, self.img_channels, self.label_dim = img_resolution, img_channels, label_dim
        self.use_fp16, self.model_type = use_fp16, model_type
        self.model = None if model_type is None else NETWORKS[model_type](
            img_resolution=img_resolution, in_channels=img_channels, out_channels=img_channels * self.out_channel_factor,
            label_dim=label_dim, **model_kwargs)

    def coefficients(self, sigma):
        """(c_skip, c_out, c_in, c_noise) for sigma of shape [N, 1, 1, 1] (float32)."""
        raise NotImplementedError

    def forward(self, x, sigma, class_labels=None, force_fp32=False, **model_kwargs):
        """D(x; sigma) in x's dtype. The arithmetic is EDM's, in float32 (the samplers' float64
        state is cast on the way in and D cast back at the end only), so that D is bit for bit
        NVlabs/edm's for any x (docs/science.md: the dtype contract)."""
        dtype_in = x.dtype
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, device=x.device).to(torch.float32).reshape(-1, 1, 1, 1)
        if self.label_dim == 0:
            class_labels = None
        elif class_labels is None:
            class_labels = torch.zeros([1, self.label_dim], device=x.device)
        else:
            class_labels = class_labels.to(torch.float32).reshape(-1, self.label_dim)
        dtype = torch.float16 if (self.use_fp16 and not force_fp32 and x.device.type == 'cuda') else torch.float32
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        F_x = self.model((c_in * x).to(dtype), c_noise.flatten().expand(x.shape[0]) if c_noise.numel() == 1 else c_noise.flatten(),
                         class_labels=class_labels, **model_kwargs)
        return (c_skip * x + c_out * F_x[:, :self.img_channels].to(torch.float32)).to(dtype_in)

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)


class VPPrecond(Precond):
    """EDM Table 1, VP (Song et al. 2021 DDPM++ training)."""

    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False,
                 beta_d=19.9, beta_min=0.1, M=1000, epsilon_t=1e-5, **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, **model_kwargs)
        self.beta_d, self.beta_min, self.M, self.epsilon_t = beta_d, beta_min, M, epsilon_t
        # sigma(t) at epsilon_t and 1 in float32, as EDM's VPPrecond evaluates it (a Python number
        # becomes a float32 tensor there), so the sampler's sigma range is the same float.
        sigma32 = lambda t: ((0.5 * beta_d * torch.as_tensor(t) ** 2 + beta_min * torch.as_tensor(t)).exp() - 1).sqrt()
        self.sigma_min, self.sigma_max = float(sigma32(epsilon_t)), float(sigma32(1))

    def coefficients(self, sigma):
        # sigma^-1(sigma) in float32, as EDM computes it.
        sigma_inv = ((self.beta_min ** 2 + 2 * self.beta_d * (sigma ** 2 + 1).log()).sqrt() - self.beta_min) / self.beta_d
        c_noise = (self.M - 1) * sigma_inv
        return 1, -sigma, 1 / (sigma ** 2 + 1).sqrt(), c_noise


class VEPrecond(Precond):
    """EDM Table 1, VE (Song et al. 2021 NCSN++ training)."""

    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False,
                 sigma_min=0.02, sigma_max=100, **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, **model_kwargs)
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def coefficients(self, sigma):
        return 1, sigma, 1, (0.5 * sigma).log()


class iDDPMPrecond(Precond):
    """EDM Table 1, iDDPM (Nichol & Dhariwal 2021): the net predicts noise and a variance term
    (2x channels; only the first half is used), at the discrete levels u_j."""
    out_channel_factor = 2

    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False,
                 C_1=0.001, C_2=0.008, M=1000, **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, **model_kwargs)
        self.C_1, self.C_2, self.M = C_1, C_2, M
        self.register_buffer('u', schedules.iddpm_u(M, C_1, C_2, dtype=torch.float32))
        self.sigma_min = float(self.u[M - 1])
        self.sigma_max = float(self.u[0])

    def _apply(self, fn, *args, **kwargs):
        """.to(dtype), .half(), .double() convert the network, never the levels u_j: they stay the
        float32 values EDM computes (bf16 would move them; round_sigma compares in float32)."""
        u = self.u
        super()._apply(fn, *args, **kwargs)
        self.u = u.to(self.u.device)  # the float32 levels, moved only
        return self

    def coefficients(self, sigma):
        c_noise = self.M - 1 - self.round_sigma(sigma, return_index=True).to(torch.float32)
        return 1, -sigma, 1 / (sigma ** 2 + 1).sqrt(), c_noise

    def round_sigma(self, sigma, return_index=False):
        """Nearest u_j to sigma (the only levels the model was trained on). Distances by
        torch.cdist in float32, as EDM computes them, so that a sigma between two levels rounds
        the same way EDM's model rounds it."""
        sigma = torch.as_tensor(sigma)
        index = torch.cdist(sigma.to(self.u.device).to(torch.float32).reshape(1, -1, 1), self.u.reshape(1, -1, 1)).argmin(2)
        result = index if return_index else self.u[index].to(sigma.dtype)
        return result.reshape(sigma.shape).to(sigma.device)


class EDMPrecond(Precond):
    """EDM Table 1, EDM column (the preconditioning the paper proposes)."""

    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False,
                 sigma_min=0, sigma_max=float('inf'), sigma_data=0.5, **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, **model_kwargs)
        self.sigma_min, self.sigma_max, self.sigma_data = sigma_min, sigma_max, sigma_data

    def coefficients(self, sigma):
        sd = self.sigma_data
        return (sd ** 2 / (sigma ** 2 + sd ** 2), sigma * sd / (sigma ** 2 + sd ** 2).sqrt(),
                1 / (sd ** 2 + sigma ** 2).sqrt(), sigma.log() / 4)


PRECONDS = {'vp': VPPrecond, 've': VEPrecond, 'iddpm': iDDPMPrecond, 'edm': EDMPrecond}


class FastDenoiser(torch.nn.Module):
    """The same D(x; sigma), evaluated the way a GPU likes it: the network under bf16 autocast
    (convolutions and matmuls in bf16, the preconditioning and the output in float32),
    channels_last activations, and/or torch.compile of the wrapped module. With every option off
    it is the wrapped denoiser exactly. bench/gpu_throughput.py measures what each option buys
    and how far it moves D; docs/benchmarks.md keeps the table."""

    def __init__(self, net, bf16=False, channels_last=False, compile=False):
        super().__init__()
        self.bf16, self.channels_last = bf16, channels_last
        self.net = net.to(memory_format=torch.channels_last) if channels_last else net
        self.forward_net = torch.compile(self.net) if compile else self.net
        self.sigma_min, self.sigma_max = net.sigma_min, net.sigma_max
        for attr in ('img_channels', 'img_resolution', 'label_dim'):
            setattr(self, attr, getattr(net, attr))

    def round_sigma(self, sigma):
        return self.net.round_sigma(sigma)

    def forward(self, x, sigma, class_labels=None):
        """D in x's dtype; x goes to the wrapped denoiser as given (it casts for its network)."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            D = self.forward_net(x, sigma, class_labels)
        return D.to(x.dtype).contiguous()


def build_denoiser(preset, precond='edm', img_resolution=32, img_channels=3, label_dim=0,
                   precond_kwargs=None, **network_overrides):
    """A preconditioned SongUNet from a named network preset (tasks.networks.PRESETS)."""
    from tasks.networks import preset_kwargs
    if precond not in PRECONDS:
        raise ValueError(f'unknown precond {precond!r}; valid: {", ".join(PRECONDS)}')
    return PRECONDS[precond](img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim,
                             **(precond_kwargs or {}), **preset_kwargs(preset, **network_overrides))


# ---------------------------------------------------------------------------------------------
# Parametrizations of a VP model and their conversion to and from the data prediction.
# x_t = alpha x_0 + std eps. Calib Eq. 26 uses the same relations for the calibration term.

PREDICTIONS = ('noise', 'data', 'v', 'score')


def prediction_to_data(output, x_t, alpha, std, prediction):
    """The data prediction x_0 implied by a model output of the given kind at x_t."""
    if prediction == 'noise':
        return (x_t - std * output) / alpha
    if prediction == 'data':
        return output
    if prediction == 'v':      # v = alpha eps - std x_0 (Salimans & Ho 2022)
        return alpha * x_t - std * output
    if prediction == 'score':  # score = -eps / std
        return (x_t + std ** 2 * output) / alpha
    raise ValueError(f'unknown prediction {prediction!r}; valid: {", ".join(PREDICTIONS)}')


def data_to_prediction(x0, x_t, alpha, std, prediction):
    """Inverse of prediction_to_data."""
    eps = (x_t - alpha * x0) / std
    if prediction == 'noise':
        return eps
    if prediction == 'data':
        return x0
    if prediction == 'v':
        return alpha * eps - std * x0
    if prediction == 'score':
        return -eps / std
    raise ValueError(f'unknown prediction {prediction!r}; valid: {", ".join(PREDICTIONS)}')


def parameter_dtype(model, default):
    """The floating dtype of a model's parameters (what its input must be cast to), or `default`
    for a model without floating parameters (a plain function: it takes what it is given)."""
    parameters = model.parameters() if isinstance(model, torch.nn.Module) else ()
    return next((p.dtype for p in parameters if p.is_floating_point()), default)


class VPModelDenoiser(torch.nn.Module):
    """D(x; sigma) from a VP model `model(x_t, t_input, class_labels)` that predicts noise, data,
    velocity or score, on one of DPM-Solver's noise schedules (tasks.schedules).

    sigma maps to time by t = lambda^-1(-log sigma); the model sees x_t = alpha_t x and its own
    time input: t for continuous-time models. A discrete-time model trained with
    N = num_train_timesteps steps receives the index of the training step, (t - 1/K) * K over the
    K levels its schedule keeps (t_n = (n + 1) / K; K = N unless the reference's clip dropped
    levels at the noisy end), so at the sigma of step n it gets exactly n; fractional labels
    between the trained integers are interpolated by the model itself. N = 1000 keeps
    DPM-Solver's model_wrapper input (t - 1/K) * 1000 bit for bit (docs/science.md decision on
    discrete-time models): the same unless the clip dropped levels, where it is n * 1000 / K
    (e.g. the cosine schedule, K = 996)."""

    def __init__(self, model, noise_schedule, prediction='noise', discrete_time=None, num_train_timesteps=1000):
        super().__init__()
        if prediction not in PREDICTIONS:
            raise ValueError(f'unknown prediction {prediction!r}; valid: {", ".join(PREDICTIONS)}')
        self.model, self.noise_schedule, self.prediction = model, noise_schedule, prediction
        if discrete_time is None:
            discrete_time = isinstance(noise_schedule, schedules.VPDiscreteNoiseSchedule)
        self.discrete_time = discrete_time
        if discrete_time:
            K, first = noise_schedule.total_N, noise_schedule.first_level
            if num_train_timesteps < first + K:
                raise ValueError(f'num_train_timesteps {num_train_timesteps} is fewer than the {first + K} levels of the schedule')
            # The model time per unit of t: K makes it the step index; the reference's fixed 1000
            # (its issue #60) is right for N = 1000 and kept there, unless levels of sigma 0 were
            # dropped at the clean end, where the reference gives NaN and there is nothing to keep.
            self.num_train_timesteps = num_train_timesteps
            self.time_scale = 1000 if num_train_timesteps == 1000 and first == 0 else K
        t_min = noise_schedule.default_t_end(0) if discrete_time else 1e-5
        self.sigma_min = float(noise_schedule.sigma(t_min))
        self.sigma_max = float(noise_schedule.sigma(noise_schedule.T))

    def model_time(self, t):
        """The discrete-time model's input at continuous time t (float64): (t - 1/K) * time_scale,
        plus the number of sigma-0 levels the schedule dropped at the clean end (first_level)."""
        return (t - 1.0 / self.noise_schedule.total_N) * self.time_scale + self.noise_schedule.first_level

    def forward(self, x, sigma, class_labels=None):
        """D(x; sigma) in x's dtype: x_t = alpha_t x and the conversion to the data prediction in
        x's dtype, the model's input x_t cast to the dtype of its own parameters (the samplers'
        float64 state into a float32 UNet), its output cast back (docs/science.md: the dtype contract)."""
        sigma64 = torch.as_tensor(sigma, dtype=torch.float64, device='cpu').reshape(-1)
        t = self.noise_schedule.t_of_sigma(sigma64)
        alpha = self.noise_schedule.alpha(t).to(x.device, x.dtype).reshape(-1, *[1] * (x.ndim - 1))
        std = self.noise_schedule.std(t).to(x.device, x.dtype).reshape(-1, *[1] * (x.ndim - 1))
        t_input = self.model_time(t) if self.discrete_time else t
        x_t = alpha * x
        t_input = t_input.to(x.device, torch.float32).expand(x.shape[0]) if t_input.numel() == 1 else t_input.to(x.device, torch.float32)
        output = self.model(x_t.to(parameter_dtype(self.model, x_t.dtype)), t_input, class_labels)
        return prediction_to_data(output.to(x.dtype), x_t, alpha, std, self.prediction)

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)
