"""Samplers over a denoiser D(x; sigma) (tasks.precond): EDM's deterministic and stochastic
samplers and DPM-Solver / DPM-Solver++.

All samplers keep their state in float64, take standard-normal `latents` of shape
[N, C, H, W] (or [N, d]) and return the images; with return_nfe=True they return
(images, nfe), nfe being the number of denoiser evaluations made (one evaluation = one call on
the whole batch). Per-image seeds: draw latents and noise with StackedRandomGenerator so an
image depends only on its own seed, never on the batch it was computed in.
"""
import collections
import contextlib
import difflib
import inspect
import math
import numbers
import warnings

import numpy as np
import torch

from tasks import schedules


# ---------------------------------------------------------------------------------------------
# Arguments that tasks.samplers, tasks.calibration and tasks.metrics take in the same forms:
# checked once at the entry of each public function, refused with an error naming the argument
# and the expected form (never a guess, never a bare error from deep inside torch).

SEED_LIMIT = 1 << 32  # StackedRandomGenerator seeds with seed mod 2^32 (EDM generate.py): larger ones repeat smaller ones
IMAGE_RANGE_LIMIT = 5.0  # float images: |x| <= 5 (model range [-1, 1] with room for toy Gaussian data)


def check_seeds(seeds, name='seeds'):
    """Per-image seeds as a list of Python ints. Accepted: a list, tuple or range of ints, or a 1-D
    integer tensor / numpy array; at least one, each in [0, 2^32), all distinct (one image per
    seed: a repeated seed would count the same sample twice). Else ValueError naming `seeds`."""
    expected = f'{name}: expected a non-empty list, range or 1-D integer tensor/array of distinct integers in [0, 2^32)'
    if isinstance(seeds, (torch.Tensor, np.ndarray)):
        array = seeds.detach().cpu().numpy() if isinstance(seeds, torch.Tensor) else seeds
        if array.ndim != 1 or array.dtype.kind not in 'iu':
            raise ValueError(f'{expected}, got a {array.dtype} array of shape {list(array.shape)}')
        values = array.tolist()
    elif isinstance(seeds, (list, tuple, range)):
        values = list(seeds)
        for seed in values:
            if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
                raise ValueError(f'{expected}, got {seed!r} ({type(seed).__name__})')
        values = [int(seed) for seed in values]
    else:
        raise ValueError(f'{expected}, got {type(seeds).__name__}')
    if not values:
        raise ValueError(f'{expected}, got none')
    if min(values) < 0 or max(values) >= SEED_LIMIT:
        raise ValueError(f'{expected}, got {min(values) if min(values) < 0 else max(values)}')
    if len(set(values)) != len(values):
        repeated = sorted(s for s, n in collections.Counter(values).items() if n > 1)
        raise ValueError(f'{expected}, got repeated seeds {repeated[:5]}')
    return values


def check_class_labels(class_labels, N, C, one_hot=True, name='class_labels'):
    """Class labels of N images (N None: any number) for C classes (C None: the net does not say).
    Accepted: N integer class indices in [0, C) (int tensor/array or list of ints), or an [N, C]
    float one-hot tensor, each row exactly one 1 and zeros (soft labels are refused). Returns None
    for None, else the one-hot [N, C] (a one-hot argument unchanged; indices as float32 rows of
    torch.eye(C), which needs C) when one_hot, else int64 indices [N]. Else ValueError naming it."""
    if class_labels is None:
        return None
    if C == 0:
        raise ValueError(f'{name}: the net is unconditional (label_dim = 0): give no class labels')
    n, c = ('N' if N is None else N), ('C' if C is None else C)
    expected = (f'{name}: expected {"N" if N is None else f"N = {N}"} integer class indices'
                f'{"" if C is None else f" in [0, {C})"} or an [{n}, {c}] one-hot float tensor')
    try:
        labels = torch.as_tensor(class_labels)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f'{expected}, got {type(class_labels).__name__}') from None
    got = f'{str(labels.dtype).replace("torch.", "")} of shape {list(labels.shape)}'
    indices = labels.ndim == 1 and not labels.is_floating_point() and not labels.is_complex() and labels.dtype != torch.bool
    if not (indices or labels.ndim == 2 and labels.is_floating_point()) or (N is not None and len(labels) != N):
        raise ValueError(f'{expected}, got {got}')
    if indices:
        out_of_range = (labels < 0) | (labels >= C if C is not None else False)
        if out_of_range.any():
            raise ValueError(f'{expected}, got class index {int(labels[out_of_range][0])}')
        if not one_hot:
            return labels.long()
        if C is None:
            raise ValueError(f'{name}: integer class indices need the number of classes, which the net does not say '
                             f'(no label_dim); give an [N, C] one-hot float tensor')
        return torch.eye(C, device=labels.device)[labels.long()]
    if C is not None and labels.shape[1] != C:
        raise ValueError(f'{expected}, got {got}')
    if not (((labels == 0) | (labels == 1)).all() and (labels.sum(1) == 1).all()):
        raise ValueError(f'{expected}, got rows that are not one-hot (exactly one 1, the rest 0; soft labels are not accepted)')
    return labels if one_hot else labels.argmax(1)


def label_dim_of(net):
    """The net's number of classes (label_dim), None when it does not say."""
    return getattr(net, 'label_dim', None)


def check_images(images, name='images', shape=None, channels=None, float_ok=True, min_count=1, error=ValueError):
    """Images [N, C, H, W]: uint8 (0..255) or, when float_ok, floating point in model range [-1, 1]
    (float [N, d] too: vector data), finite and within |x| <= IMAGE_RANGE_LIMIT = 5 (room for toy
    Gaussian data; images in [0, 255] reach far past it). `shape` the expected (C, H, W),
    `channels` the allowed C; at least min_count images. Else `error` naming the argument."""
    C = 'C' if channels is None else ' or '.join(map(str, channels))
    want_shape = ', '.join(map(str, ('N', *(shape or (C, 'H', 'W')))))
    expected = f'{name}: expected uint8 images [{want_shape}]' + (' or float images in model range [-1, 1]' if float_ok else '')
    if not isinstance(images, torch.Tensor):
        raise error(f'{expected}, got {type(images).__name__}')
    got = f'{str(images.dtype).replace("torch.", "")} of shape {list(images.shape)}'
    is_float = images.is_floating_point()
    if not (images.dtype == torch.uint8 and images.ndim == 4 or float_ok and is_float and images.ndim in (2, 4)):
        raise error(f'{expected}, got {got}' + ('; convert float images with tasks.data.to_uint8' if is_float else ''))
    if shape is not None and tuple(images.shape[1:]) != tuple(shape) or channels is not None and images.shape[1] not in channels:
        raise error(f'{expected}, got {got}')
    if len(images) < min_count:
        raise error(f'{expected}, got {len(images)} images')
    if is_float and images.numel():
        lo, hi = torch.aminmax(images)  # no copy of the images
        largest = float(torch.maximum(-lo, hi))
        if not largest <= IMAGE_RANGE_LIMIT:  # NaN and inf fail too
            raise error(f'{expected} (|x| <= {IMAGE_RANGE_LIMIT:g}), got values up to |x| = {largest:g}'
                        + ('; images in [0, 255] go in as uint8' if math.isfinite(largest) else ''))
    return images


class StackedRandomGenerator:
    """One torch.Generator per image (EDM generate.py): image i's latents and noise depend only on
    seeds[i] (check_seeds: distinct integers in [0, 2^32))."""

    def __init__(self, device, seeds):
        seeds = check_seeds(seeds)
        self.generators = [torch.Generator(device).manual_seed(int(seed) % (1 << 32)) for seed in seeds]

    def randn(self, size, **kwargs):
        assert size[0] == len(self.generators)
        return torch.stack([torch.randn(size[1:], generator=gen, **kwargs) for gen in self.generators])

    def randn_like(self, input):
        return self.randn(input.shape, dtype=input.dtype, layout=input.layout, device=input.device)

    def randint(self, *args, size, **kwargs):
        assert size[0] == len(self.generators)
        return torch.stack([torch.randint(*args, size=size[1:], generator=gen, **kwargs) for gen in self.generators])


class CountedDenoiser:
    """Wraps a denoiser and counts its evaluations (and optionally records the sigmas asked). Every
    sampler evaluates through it, and it keeps every sigma in the model's [sigma_min, sigma_max]:
    after the entry checks and the grid functions a sigma can leave it only by rounding (EDM
    Eq. 5's end lands an ulp below sigma_min; sigma(sigma^-1(s)) != s), which would give a
    discrete model a time input an ulp below its first step. The clamp is a no-op inside."""

    def __init__(self, net, record_sigmas=False):
        self.net, self.nfe, self.sigmas = net, 0, [] if record_sigmas else None
        self.sigma_min, self.sigma_max = net.sigma_min, net.sigma_max

    def round_sigma(self, sigma):
        return self.net.round_sigma(sigma)

    def __call__(self, x, sigma, class_labels=None):
        self.nfe += 1
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).clamp(self.sigma_min, self.sigma_max)
        if self.sigmas is not None:
            s = torch.as_tensor(sigma, dtype=torch.float64)
            self.sigmas.append(float(s) if s.numel() == 1 else s.tolist())
        return self.net(x, sigma, class_labels)


def _result(x, net, return_nfe):
    return (x, net.nfe) if return_nfe else x


# ---------------------------------------------------------------------------------------------
# EDM.

def distinct_levels(sigmas):
    """A decreasing sigma grid with repeated levels removed. Rounding to a discrete model's levels
    maps several grid points to one level (EDM's sampler on iDDPM's 1000 levels at 100 steps keeps
    94); a step between equal levels has size zero (x + 0 * d) and costs evaluations for nothing
    (diffusers PRs 4231, 6477). NVlabs/edm keeps them; the deterministic result is the same bit for
    bit, the stochastic one is not (gamma counts the distinct steps: docs/science.md decision)."""
    keep = torch.ones(len(sigmas), dtype=torch.bool, device=sigmas.device)
    keep[1:] = sigmas[1:] != sigmas[:-1]
    return sigmas[keep]


def edm_grid(net, num_steps=18, sigma_min=0.002, sigma_max=80, rho=7):
    """The noise levels edm_sampler steps through, float64 [N'] without t_N = 0: EDM Eq. 5 on
    [sigma_min, sigma_max] clamped to the model's range (EDM's generate.py), rounded to the
    model's levels, repeats removed (distinct_levels)."""
    sigma_min, sigma_max = max(sigma_min, net.sigma_min), min(sigma_max, net.sigma_max)
    return distinct_levels(net.round_sigma(schedules.edm_sigma_steps(num_steps, sigma_min, sigma_max, rho)))


def edm_sampler(net, latents, class_labels=None, randn_like=torch.randn_like,
                num_steps=18, sigma_min=0.002, sigma_max=80, rho=7,
                S_churn=0, S_min=0, S_max=float('inf'), S_noise=1, return_nfe=False):
    """EDM Algorithm 2 (stochastic Heun; deterministic Algorithm 1 when S_churn = 0) on the
    Eq. 5 grid (edm_grid: N' <= num_steps distinct levels), with sigma(t) = t and s(t) = 1; the
    last step is Euler, so NFE = 2 N' - 1, and gamma = min(S_churn / N', sqrt(2) - 1). Same
    signature and arithmetic as EDM's generate.py, except that t_hat never exceeds the model's
    sigma_max (EDM's own models have none). class_labels: None, N class indices or an
    [N, label_dim] one-hot tensor (check_class_labels; indices become one-hot)."""
    check_entry('edm', net, num_steps=num_steps, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho, S_churn=S_churn,
                S_min=S_min, S_max=S_max, S_noise=S_noise)
    class_labels = check_class_labels(class_labels, len(latents), label_dim_of(net))
    net = CountedDenoiser(net)
    t_steps = edm_grid(net, num_steps, sigma_min, sigma_max, rho).to(latents.device)
    t_steps = torch.cat([t_steps, torch.zeros_like(t_steps[:1])])  # t_N = 0
    num_steps = len(t_steps) - 1

    x_next = latents.to(torch.float64) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next

        # Increase noise temporarily.
        gamma = min(S_churn / num_steps, np.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0
        t_hat = net.round_sigma((t_cur + gamma * t_cur).clamp(max=net.sigma_max))
        x_hat = x_cur + (t_hat ** 2 - t_cur ** 2).sqrt() * S_noise * randn_like(x_cur)

        # Euler step.
        denoised = net(x_hat, t_hat, class_labels).to(torch.float64)
        d_cur = (x_hat - denoised) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur

        # Second-order correction, except on the last step (t_next = 0).
        if i < num_steps - 1:
            denoised = net(x_next, t_next, class_labels).to(torch.float64)
            d_prime = (x_next - denoised) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return _result(x_next, net, return_nfe)


class GenerateVPSchedule(schedules.VPSchedule):
    """The VP sigma(t) of EDM Table 1 with the operations of EDM's generate.py, so that the
    ablation sampler's noise levels and times are the same floats as there:
    sigma(t) = (e ** (0.5 beta_d t^2 + beta_min t) - 1) ** 0.5 on t as given (a Python float stays
    one), and beta_d, beta_min from the sigma range with np.log. torch's exp(x) and e ** x, and
    np.log and math.log, differ in the last bit for many arguments; sigma'(t), sigma^-1(sigma),
    s(t) and s'(t) are VPSchedule's, which already compute as generate.py does."""

    def sigma(self, t):
        return (np.e ** (0.5 * self.beta_d * (t ** 2) + self.beta_min * t) - 1) ** 0.5

    @classmethod
    def from_sigma_range(cls, sigma_min, sigma_max, epsilon_s=1e-3):
        beta_d = 2 * (np.log(sigma_min ** 2 + 1) / epsilon_s - np.log(sigma_max ** 2 + 1)) / (epsilon_s - 1)
        beta_min = np.log(sigma_max ** 2 + 1) - 0.5 * beta_d
        return cls(beta_d=beta_d, beta_min=beta_min)


def ablation_sigma_range(discretization, epsilon_s=1e-3):
    """generate.py's default (sigma_min, sigma_max) of each discretization (VP: beta_d = 19.9)."""
    vp_default = GenerateVPSchedule(beta_d=19.9, beta_min=0.1)
    return {'vp': (vp_default.sigma(epsilon_s), vp_default.sigma(1)), 've': (0.02, 100), 'iddpm': (0.002, 81),
            'edm': (0.002, 80)}[discretization]


SOLVERS = ('euler', 'heun')
DISCRETIZATIONS = ('vp', 've', 'iddpm', 'edm')
SCHEDULES = ('vp', 've', 'linear')
SCALINGS = ('vp', 'none')


def ablation_grid(net, num_steps=18, sigma_min=None, sigma_max=None, rho=7, discretization='edm', epsilon_s=1e-3,
                  C_1=0.001, C_2=0.008, M=1000):
    """(sigma_steps, vp) of ablation_sampler: the discretization's noise levels, float64 [N']
    without t_N = 0, on [sigma_min, sigma_max] (the discretization's defaults for None) clamped to
    the model's range, rounded to its levels, repeats removed (distinct_levels); and the VP
    sigma(t) fitted to that range (schedule='vp'), as generate.py builds it."""
    default_min, default_max = ablation_sigma_range(discretization, epsilon_s)
    sigma_min = max(default_min if sigma_min is None else sigma_min, net.sigma_min)
    sigma_max = min(default_max if sigma_max is None else sigma_max, net.sigma_max)
    vp = GenerateVPSchedule.from_sigma_range(sigma_min, sigma_max, epsilon_s)
    if discretization == 'vp':
        sigma_steps = vp.sigma(schedules.vp_time_steps(num_steps, epsilon_s))
    elif discretization == 've':
        sigma_steps = schedules.VESchedule().sigma(schedules.ve_time_steps(num_steps, sigma_min, sigma_max))
    elif discretization == 'iddpm':
        sigma_steps = schedules.iddpm_sigma_steps(num_steps, sigma_min, sigma_max, M, C_1, C_2)
    else:
        sigma_steps = schedules.edm_sigma_steps(num_steps, sigma_min, sigma_max, rho)
    return distinct_levels(net.round_sigma(sigma_steps)), vp


def ablation_sampler(net, latents, class_labels=None, randn_like=torch.randn_like,
                     num_steps=18, sigma_min=None, sigma_max=None, rho=7,
                     solver='heun', discretization='edm', schedule='linear', scaling='none',
                     epsilon_s=1e-3, C_1=0.001, C_2=0.008, M=1000, alpha=1,
                     S_churn=0, S_min=0, S_max=float('inf'), S_noise=1, return_nfe=False):
    """EDM's generalized sampler (generate.py): Algorithms 1 and 2 with any sigma(t), s(t) and
    discretization of Table 1, Euler or Heun (alpha = 1) / general 2nd-order RK (alpha), on the
    N' distinct levels of ablation_grid (gamma = min(S_churn / N', sqrt(2) - 1); sigma(t_hat)
    never above the model's sigma_max). class_labels: as edm_sampler's."""
    check_entry('ablation', net, num_steps=num_steps, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho, solver=solver,
                discretization=discretization, schedule=schedule, scaling=scaling, epsilon_s=epsilon_s, C_1=C_1, C_2=C_2,
                M=M, alpha=alpha, S_churn=S_churn, S_min=S_min, S_max=S_max, S_noise=S_noise)
    class_labels = check_class_labels(class_labels, len(latents), label_dim_of(net))
    net = CountedDenoiser(net)
    sigma_steps, vp = ablation_grid(net, num_steps, sigma_min, sigma_max, rho, discretization, epsilon_s, C_1, C_2, M)
    sigma_steps = sigma_steps.to(latents.device)
    num_steps = len(sigma_steps)

    # Noise level schedule sigma(t) and scaling s(t).
    sched = vp if schedule == 'vp' else schedules.VESchedule() if schedule == 've' else schedules.LinearSchedule()
    sigma, sigma_deriv, sigma_inv = sched.sigma, sched.sigma_deriv, sched.sigma_inv
    if scaling == 'vp':
        s_fn = schedules.VPScaling(sched)
        s, s_deriv = s_fn, s_fn.deriv
    else:
        s, s_deriv = (lambda t: 1), (lambda t: 0)

    t_steps = sigma_inv(sigma_steps)
    t_steps = torch.cat([t_steps, torch.zeros_like(t_steps[:1])])  # t_N = 0

    t_next = t_steps[0]
    x_next = latents.to(torch.float64) * (sigma(t_next) * s(t_next))
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next

        # Increase noise temporarily.
        gamma = min(S_churn / num_steps, np.sqrt(2) - 1) if S_min <= sigma(t_cur) <= S_max else 0
        t_hat = sigma_inv(net.round_sigma((sigma(t_cur) + gamma * sigma(t_cur)).clamp(max=net.sigma_max)))
        x_hat = (s(t_hat) / s(t_cur) * x_cur
                 + (sigma(t_hat) ** 2 - sigma(t_cur) ** 2).clip(min=0).sqrt() * s(t_hat) * S_noise * randn_like(x_cur))

        # Euler step.
        h = t_next - t_hat
        denoised = net(x_hat / s(t_hat), sigma(t_hat), class_labels).to(torch.float64)
        d_cur = (sigma_deriv(t_hat) / sigma(t_hat) + s_deriv(t_hat) / s(t_hat)) * x_hat - sigma_deriv(t_hat) * s(t_hat) / sigma(t_hat) * denoised
        x_prime = x_hat + alpha * h * d_cur
        t_prime = t_hat + alpha * h

        # Second-order correction.
        if solver == 'euler' or i == num_steps - 1:
            x_next = x_hat + h * d_cur
        else:
            denoised = net(x_prime / s(t_prime), sigma(t_prime), class_labels).to(torch.float64)
            d_prime = (sigma_deriv(t_prime) / sigma(t_prime) + s_deriv(t_prime) / s(t_prime)) * x_prime - sigma_deriv(t_prime) * s(t_prime) / sigma(t_prime) * denoised
            x_next = x_hat + h * ((1 - 1 / (2 * alpha)) * d_cur + 1 / (2 * alpha) * d_prime)
    return _result(x_next, net, return_nfe)


# ---------------------------------------------------------------------------------------------
# DPM-Solver (Lu et al. 2022) and DPM-Solver++ (Lu et al. 2022b).
#
# Written in EDM's space x' = x_t / alpha_t with sigma = std_t / alpha_t and lambda = -log sigma:
# dividing the reference updates by alpha_t gives exactly these, so for the same time grid the
# iterates are the reference's divided by alpha_t. The time grids, orders, intermediate points and
# NFE rules follow the reference implementation (dpm_solver_pytorch.py).

DPM_METHODS = ('singlestep', 'singlestep_fixed', 'multistep')
DPM_ALGORITHMS = ('dpmsolver', 'dpmsolver++')

# The reference switches multistep solvers to lower orders on the final steps when steps < 10
# (versions before 2023 used 15).
LOWER_ORDER_FINAL_BELOW = 10


def singlestep_orders(steps, order):
    """Orders of the singlestep DPM-Solver-fast steps using exactly `steps` evaluations
    (reference get_orders_and_timesteps_for_singlestep_solver)."""
    if order == 3:
        K = steps // 3 + 1
        if steps % 3 == 0:
            return [3] * (K - 2) + [2, 1]
        if steps % 3 == 1:
            return [3] * (K - 1) + [1]
        return [3] * (K - 1) + [2]
    if order == 2:
        return [2] * (steps // 2) + [1] * (steps % 2)
    if order == 1:
        return [1] * steps
    raise ValueError(f'DPM-Solver order must be 1, 2 or 3, got {order!r}')


def dpm_solver_nfe(steps, order, method, denoise_to_zero=False):
    """Number of denoiser evaluations DPM-Solver makes: `steps` for singlestep (fast) and
    multistep, order * floor(steps / order) for singlestep_fixed, +1 with denoise_to_zero."""
    if method == 'singlestep_fixed':
        nfe = order * (steps // order)
    elif method in ('singlestep', 'multistep'):
        nfe = steps
    else:
        raise ValueError(f'unknown DPM-Solver method {method!r}; valid: {", ".join(DPM_METHODS)}')
    return nfe + int(denoise_to_zero)


def dpm_solver_plan(noise_schedule, steps, order, method, skip_type='logSNR', t_start=None, t_end=None):
    """The time grid of a DPM-Solver run: (t_outer, orders, r), t_outer float64 of length
    len(orders) + 1, r[i] the (r1, r2) of singlestep step i (None for multistep)."""
    if method not in DPM_METHODS:
        raise ValueError(f'unknown DPM-Solver method {method!r}; valid: {", ".join(DPM_METHODS)}')
    if order not in (1, 2, 3):
        raise ValueError(f'DPM-Solver order must be 1, 2 or 3, got {order!r}')
    if int(steps) != steps or steps < order:
        raise ValueError(f'DPM-Solver steps must be an integer >= order ({order}), got {steps!r}')
    t_T = noise_schedule.T if t_start is None else t_start
    t_0 = noise_schedule.default_t_end(steps) if t_end is None else t_end
    grid = lambda a, b, n: schedules.dpm_time_steps(noise_schedule, skip_type, a, b, n)

    if method == 'multistep':
        t_outer = grid(t_T, t_0, steps)
        orders = []
        for step in range(1, steps + 1):
            if step < order:  # warm-up with lower orders
                orders.append(step)
            elif steps < LOWER_ORDER_FINAL_BELOW:
                orders.append(min(order, steps + 1 - step))
            else:
                orders.append(order)
        return t_outer, orders, [None] * steps

    if method == 'singlestep':
        orders = singlestep_orders(steps, order)
        if skip_type == 'logSNR':
            t_outer = grid(t_T, t_0, len(orders))
        else:
            t_outer = grid(t_T, t_0, steps)[torch.cumsum(torch.tensor([0] + orders), 0)]
    else:
        orders = [order] * (steps // order)
        t_outer = grid(t_T, t_0, len(orders))
    r = []
    for s, t, k in zip(t_outer[:-1], t_outer[1:], orders):
        lambda_inner = noise_schedule.lambda_(grid(s, t, k))
        h = lambda_inner[-1] - lambda_inner[0]
        r.append(tuple(float((lambda_inner[j] - lambda_inner[0]) / h) for j in range(1, k)))
    return t_outer, orders, r


def dpm_solver_grid(net, steps=20, order=3, method='singlestep', skip_type='logSNR', noise_schedule=None, t_start=None,
                    t_end=None):
    """(noise_schedule, t_outer, orders, r) of a dpm_solver_sampler run on `net` (dpm_solver_plan), with
    [sigma(t_end), sigma(t_start)] clamped to the model's [sigma_min, sigma_max] as EDM's samplers
    clamp theirs: a discrete model's grid ends at its first level (the reference's own default
    t_end = 1/N for discrete schedules) instead of asking the network for a level it was never
    trained on."""
    noise_schedule = noise_schedule or schedules.VPLinearNoiseSchedule()
    clamped = clamped_sigma_range('dpm_solver', net, steps=steps, noise_schedule=noise_schedule, t_start=t_start, t_end=t_end)
    if clamped:
        (lo, hi), (lo_used, hi_used) = clamped
        t_end = float(noise_schedule.t_of_sigma(lo_used)) if lo_used != lo else t_end
        t_start = float(noise_schedule.t_of_sigma(hi_used)) if hi_used != hi else t_start
    return (noise_schedule, *dpm_solver_plan(noise_schedule, steps, order, method, skip_type, t_start, t_end))


def dpm_solver_sampler(net, latents, class_labels=None, steps=20, order=3, method='singlestep',
                       algorithm_type='dpmsolver', skip_type='logSNR', noise_schedule=None,
                       t_start=None, t_end=None, denoise_to_zero=False, return_nfe=False):
    """DPM-Solver-{1,2,3} ('dpmsolver', noise prediction) and DPM-Solver++ ('dpmsolver++', data
    prediction); method 'singlestep' (DPM-Solver-fast: exactly `steps` evaluations),
    'singlestep_fixed' (order * floor(steps / order)) or 'multistep' (lower-order warm-up and,
    for steps < 10, lower-order final steps).

    noise_schedule (default: continuous linear VP, beta 0.1..20) defines time: the grid is
    uniform in logSNR / t / sqrt(t) between t_start (default T = 1) and t_end (default: the
    recommendation of the reference's docstring, 1e-3 when steps <= 15 else 1e-4; 1/N for discrete
    schedules). The start is
    x_T = latents / alpha_T (the VP prior N(0, I) in x' space) and, as in the reference, the
    returned sample is x_{t_end} = alpha_{t_end} x' (or D(x'; sigma(t_end)) with denoise_to_zero).
    class_labels: as edm_sampler's.
    """
    check_entry('dpm_solver', net, steps=steps, order=order, method=method, algorithm_type=algorithm_type,
                skip_type=skip_type, noise_schedule=noise_schedule, t_start=t_start, t_end=t_end,
                denoise_to_zero=denoise_to_zero)
    class_labels = check_class_labels(class_labels, len(latents), label_dim_of(net))
    noise_schedule, t_outer, orders, r = dpm_solver_grid(net, steps, order, method, skip_type, noise_schedule, t_start, t_end)
    sigma_outer = noise_schedule.sigma(t_outer)  # an ulp outside the model's range at most: CountedDenoiser clamps
    net = CountedDenoiser(net)
    data_pred = algorithm_type == 'dpmsolver++'

    def model_fn(x, sigma):
        """D(x; sigma) for DPM-Solver++, eps = (x - D) / sigma for DPM-Solver."""
        denoised = net(x, sigma, class_labels).to(torch.float64)
        return denoised if data_pred else (x - denoised) / sigma

    x = latents.to(torch.float64) / float(noise_schedule.alpha(t_outer[0]))
    if method == 'multistep':
        x = _multistep(x, sigma_outer, orders, model_fn, data_pred)
    else:
        for i, k in enumerate(orders):
            x = _singlestep(x, sigma_outer[i], sigma_outer[i + 1], k, r[i], model_fn, data_pred)
    if denoise_to_zero:
        x = net(x, sigma_outer[-1], class_labels).to(torch.float64)
    else:
        x = x * float(noise_schedule.alpha(t_outer[-1]))
    return _result(x, net, return_nfe)


def _singlestep(x, sigma_s, sigma_t, order, r, model_fn, data_pred):
    """One singlestep DPM-Solver-k step from sigma_s to sigma_t (k evaluations), with
    intermediate points at lambda_s + r_j h (reference singlestep_dpm_solver_*_update,
    solver_type 'dpmsolver')."""
    h = math.log(sigma_s / sigma_t)  # lambda_t - lambda_s
    sigma_at = lambda rj: sigma_s * math.exp(-rj * h)
    m_s = model_fn(x, sigma_s)
    if data_pred:
        phi = lambda rj: math.expm1(-rj * h)
        if order == 1:
            return (sigma_t / sigma_s) * x - phi(1) * m_s
        if order == 2:
            (r1,) = r
            x_s1 = (sigma_at(r1) / sigma_s) * x - phi(r1) * m_s
            m_s1 = model_fn(x_s1, sigma_at(r1))
            return (sigma_t / sigma_s) * x - phi(1) * m_s - (0.5 / r1) * phi(1) * (m_s1 - m_s)
        r1, r2 = r
        phi_22 = phi(r2) / (r2 * h) + 1
        phi_2 = phi(1) / h + 1
        x_s1 = (sigma_at(r1) / sigma_s) * x - phi(r1) * m_s
        m_s1 = model_fn(x_s1, sigma_at(r1))
        x_s2 = (sigma_at(r2) / sigma_s) * x - phi(r2) * m_s + (r2 / r1) * phi_22 * (m_s1 - m_s)
        m_s2 = model_fn(x_s2, sigma_at(r2))
        return (sigma_t / sigma_s) * x - phi(1) * m_s + (1 / r2) * phi_2 * (m_s2 - m_s)

    phi = lambda rj: math.expm1(rj * h)
    if order == 1:
        return x - sigma_t * phi(1) * m_s
    if order == 2:
        (r1,) = r
        x_s1 = x - sigma_at(r1) * phi(r1) * m_s
        m_s1 = model_fn(x_s1, sigma_at(r1))
        return x - sigma_t * phi(1) * m_s - (0.5 / r1) * sigma_t * phi(1) * (m_s1 - m_s)
    r1, r2 = r
    phi_22 = phi(r2) / (r2 * h) - 1
    phi_2 = phi(1) / h - 1
    x_s1 = x - sigma_at(r1) * phi(r1) * m_s
    m_s1 = model_fn(x_s1, sigma_at(r1))
    x_s2 = x - sigma_at(r2) * phi(r2) * m_s - (r2 / r1) * sigma_at(r2) * phi_22 * (m_s1 - m_s)
    m_s2 = model_fn(x_s2, sigma_at(r2))
    return x - sigma_t * phi(1) * m_s - (1 / r2) * sigma_t * phi_2 * (m_s2 - m_s)


def _multistep(x, sigmas, orders, model_fn, data_pred):
    """Multistep DPM-Solver(++) over the grid `sigmas` with the given per-step orders: one new
    evaluation per step, none after the last (reference multistep_dpm_solver_*_update)."""
    sigmas = [float(s) for s in sigmas]
    lambdas = [-math.log(s) for s in sigmas]
    m_prev = [model_fn(x, sigmas[0])]
    for step in range(1, len(sigmas)):
        k, sigma_t, sigma_0 = orders[step - 1], sigmas[step], sigmas[step - 1]
        h = lambdas[step] - lambdas[step - 1]
        m0 = m_prev[-1]
        if data_pred:
            phi_1 = math.expm1(-h)
            x_base = (sigma_t / sigma_0) * x - phi_1 * m0
        else:
            phi_1 = math.expm1(h)
            x_base = x - sigma_t * phi_1 * m0
        if k == 1:
            x = x_base
        elif k == 2:
            r0 = (lambdas[step - 1] - lambdas[step - 2]) / h
            D1_0 = (1 / r0) * (m0 - m_prev[-2])
            x = x_base - 0.5 * phi_1 * D1_0 if data_pred else x_base - 0.5 * sigma_t * phi_1 * D1_0
        else:
            r0 = (lambdas[step - 1] - lambdas[step - 2]) / h
            r1 = (lambdas[step - 2] - lambdas[step - 3]) / h
            D1_0 = (1 / r0) * (m0 - m_prev[-2])
            D1_1 = (1 / r1) * (m_prev[-2] - m_prev[-3])
            D1 = D1_0 + (r0 / (r0 + r1)) * (D1_0 - D1_1)
            D2 = (1 / (r0 + r1)) * (D1_0 - D1_1)
            if data_pred:
                phi_2 = phi_1 / h + 1
                phi_3 = phi_2 / h - 0.5
                x = x_base + phi_2 * D1 - phi_3 * D2
            else:
                phi_2 = phi_1 / h - 1
                phi_3 = phi_2 / h - 0.5
                x = x_base - sigma_t * phi_2 * D1 - sigma_t * phi_3 * D2
        if step < len(sigmas) - 1:  # the final model value is never needed
            m_prev = (m_prev + [model_fn(x, sigma_t)])[-3:]
    return x


# ---------------------------------------------------------------------------------------------

SAMPLERS = {'edm': edm_sampler, 'ablation': ablation_sampler, 'dpm_solver': dpm_solver_sampler}


# ---------------------------------------------------------------------------------------------
# The domain of every sampler setting (the names of EDM's generate.py and this module), checked
# before anything samples: a setting outside it gives NaN or silently wrong images, never an error.

def _number(v):
    """A real number (numpy's included, as the Python API may be given them), not NaN or a bool."""
    return isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_)) and not math.isnan(v)


def _integer(v):
    return isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))


SETTING_DOMAINS = {
    'num_steps': (lambda v: _integer(v) and v >= 2, 'an integer >= 2 (EDM Eq. 5 needs two grid points)'),
    'steps': (lambda v: _integer(v) and v >= 1, 'an integer >= 1'),
    'sigma_min': (lambda v: v is None or _number(v) and 0 < v < math.inf, 'a positive finite number'),
    'sigma_max': (lambda v: v is None or _number(v) and 0 < v < math.inf, 'a positive finite number'),
    'rho': (lambda v: _number(v) and 0 < v < math.inf, 'a positive finite number'),
    'S_churn': (lambda v: _number(v) and 0 <= v < math.inf, 'a finite number >= 0'),
    'S_min': (lambda v: _number(v) and v >= 0, 'a number >= 0'),
    'S_max': (lambda v: _number(v) and v >= 0, 'a number >= 0 (inf: no upper limit)'),
    'S_noise': (lambda v: _number(v) and 0 < v < math.inf, 'a positive finite number'),
    'solver': (lambda v: v in SOLVERS, 'one of ' + ', '.join(SOLVERS)),
    'discretization': (lambda v: v in DISCRETIZATIONS, 'one of ' + ', '.join(DISCRETIZATIONS)),
    'schedule': (lambda v: v in SCHEDULES, 'one of ' + ', '.join(SCHEDULES)),
    'scaling': (lambda v: v in SCALINGS, 'one of ' + ', '.join(SCALINGS)),
    'epsilon_s': (lambda v: _number(v) and 0 < v < 1, 'a number in (0, 1)'),
    'C_1': (lambda v: _number(v) and 0 < v < math.inf, 'a positive finite number'),
    'C_2': (lambda v: _number(v) and 0 < v < math.inf, 'a positive finite number'),
    'M': (lambda v: _integer(v) and v >= 1, 'an integer >= 1'),
    'alpha': (lambda v: _number(v) and 0 < v <= 1, 'a number in (0, 1] (1: Heun, 0.5: midpoint)'),
    'order': (lambda v: v in (1, 2, 3) and _integer(v), '1, 2 or 3'),
    'method': (lambda v: v in DPM_METHODS, 'one of ' + ', '.join(DPM_METHODS)),
    'algorithm_type': (lambda v: v in DPM_ALGORITHMS, 'one of ' + ', '.join(DPM_ALGORITHMS)),
    'skip_type': (lambda v: v in schedules.DPM_SKIP_TYPES, 'one of ' + ', '.join(schedules.DPM_SKIP_TYPES)),
    't_start': (lambda v: v is None or _number(v) and 0 < v <= 1, 'a number in (0, 1]'),
    't_end': (lambda v: v is None or _number(v) and 0 < v < 1, 'a number in (0, 1)'),
    'denoise_to_zero': (lambda v: isinstance(v, (bool, np.bool_)), 'true or false'),
}


def check_setting(name, value):
    """None when `value` lies in the domain of sampler setting `name`, else what was expected."""
    ok, expected = SETTING_DOMAINS.get(name, (lambda v: True, ''))
    return None if ok(value) else f'expected {expected}, got {value!r}'


def check_settings(sampler, **settings):
    """Every setting of one sampler run in its domain, and the settings against each other:
    ValueError('<setting>: what was expected, got what') on the first that is not."""
    for name, value in settings.items():
        problem = check_setting(name, value)
        if problem:
            raise ValueError(f'{name}: {problem}')
    get = lambda name: settings.get(name, inspect.signature(get_sampler(sampler)).parameters[name].default)
    if sampler in ('edm', 'ablation'):
        for name in ('sigma_min', 'sigma_max'):
            if sampler == 'edm' and name in settings and settings[name] is None:  # None: the ablation sampler's defaults only
                raise ValueError(f'{name}: expected a positive finite number, got None')
        lo, hi = sigma_range(sampler, **settings)
        if not lo < hi:  # '(the default)': one of the two is the sampler's default (given or not: the same text)
            defaulted = any(get(name) == inspect.signature(get_sampler(sampler)).parameters[name].default
                            for name in ('sigma_min', 'sigma_max'))
            raise ValueError(f'sigma_min: {lo:g} is not below sigma_max = {hi:g}' + (' (the default)' if defaulted else ''))
        if sampler == 'edm' or get('discretization') == 'edm':
            check_eq5(get('num_steps'), lo, hi, get('rho'))
        if not get('S_min') <= get('S_max'):
            raise ValueError(f'S_min: {get("S_min"):g} is above S_max = {get("S_max"):g}')
    if sampler == 'dpm_solver':
        if get('steps') < get('order'):
            raise ValueError(f'steps: {get("steps")} is fewer than order = {get("order")} (DPM-Solver needs steps >= order)')
        t_start, t_end = get('t_start'), get('t_end')
        if t_start is not None and t_end is not None and not t_end < t_start:
            raise ValueError(f't_end: {t_end:g} is not below t_start = {t_start:g}')


def sigma_range(sampler, **settings):
    """The (sigma_min, sigma_max) a run asks for: an edm or ablation run's settings, else the
    sampler's defaults (the ablation sampler's depend on the discretization); a dpm_solver run's
    (sigma(t_end), sigma(t_start)) on its noise schedule (default: the linear VP), t_end and
    t_start defaulting as dpm_solver_plan's."""
    defaults = inspect.signature(get_sampler(sampler)).parameters
    get = lambda name: settings.get(name, defaults[name].default)
    if sampler == 'dpm_solver':
        ns = get('noise_schedule') or schedules.VPLinearNoiseSchedule()
        t_end = ns.default_t_end(get('steps')) if get('t_end') is None else get('t_end')
        t_start = ns.T if get('t_start') is None else get('t_start')
        first = float(ns.t_array[0]) if hasattr(ns, 't_array') else 0.0  # a discrete schedule's first level, 1/N
        return float(ns.sigma(t_end)) if t_end >= first else 0.0, float(ns.sigma(t_start))  # 0: below every level
    lo, hi = get('sigma_min'), get('sigma_max')
    if sampler == 'ablation' and (lo is None or hi is None):
        default_min, default_max = ablation_sigma_range(get('discretization'), get('epsilon_s'))
        lo, hi = default_min if lo is None else lo, default_max if hi is None else hi
    return lo, hi


def clamped_sigma_range(sampler, net, **settings):
    """(requested, used) sigma range when a requested range reaches outside the model's own
    [net.sigma_min, net.sigma_max] and the sampler clamps it as EDM's generate.py does (for
    dpm_solver: its t_end and t_start, see dpm_solver_grid), else None.
    ValueError when nothing of the range is left inside the model's."""
    lo, hi = sigma_range(sampler, **settings)
    used = (max(lo, net.sigma_min), min(hi, net.sigma_max))
    if not used[0] < used[1]:
        raise ValueError(f'sigma range [{lo:g}, {hi:g}] lies outside the model\'s [{net.sigma_min:g}, '
                         f'{net.sigma_max:g}]: nothing is left to sample after clamping')
    if sampler == 'ablation':
        check_ablation_grid(*used, **settings)
    return None if used == (lo, hi) else ((lo, hi), used)


def check_eq5(num_steps, sigma_min, sigma_max, rho):
    """EDM Eq. 5 must be computable in floating point: sigma^(1/rho) overflows for a rho near 0,
    and for a huge rho the grid's ends drift away from [sigma_min, sigma_max] (rho = 1e15 starts
    at 84.85 for 80; 1e17 collapses to one level at 1). ValueError naming rho."""
    try:
        grid = schedules.edm_sigma_steps(num_steps, sigma_min, sigma_max, rho)
    except OverflowError:
        raise ValueError(f'rho: {rho:g} puts EDM Eq. 5 out of floating-point range for sigma in [{sigma_min:g}, '
                         f'{sigma_max:g}] (sigma^(1/rho) overflows)') from None
    ends = (float(grid[-1]), float(grid[0]))
    if not all(math.isfinite(e) and abs(e / want - 1) <= 1e-9 for e, want in zip(ends, (sigma_min, sigma_max))):
        raise ValueError(f'rho: {rho:g} makes EDM Eq. 5 inexact in floating point: the grid for [{sigma_min:g}, '
                         f'{sigma_max:g}] comes out as [{ends[0]:g}, {ends[1]:g}]')


def check_ablation_grid(lo, hi, discretization='edm', schedule='linear', epsilon_s=1e-3, C_1=0.001, C_2=0.008, M=1000,
                        **_):
    """The ablation sampler's grid on the range it samples [lo, hi] (after clamping): the VP
    sigma(t) fitted to it (sigma(epsilon_s) = lo, sigma(1) = hi) must increase on [epsilon_s, 1]
    (a tiny epsilon_s with a clamped range gives beta_d < 0 and sigmas far above sigma_max), and
    the iddpm discretization needs a level u_j inside. ValueError naming the setting."""
    if 'vp' in (discretization, schedule):
        vp = GenerateVPSchedule.from_sigma_range(lo, hi, epsilon_s)
        slopes = (vp.beta_d * epsilon_s + vp.beta_min, vp.beta_d + vp.beta_min)  # d/dt of 0.5 beta_d t^2 + beta_min t
        if not all(math.isfinite(v) and v > 0 for v in slopes):
            raise ValueError(f'epsilon_s: {epsilon_s:g}: the VP sigma(t) fitted to sigma in [{lo:g}, {hi:g}] '
                             f'(sigma(epsilon_s) = {lo:g}, sigma(1) = {hi:g}) is not increasing on [epsilon_s, 1] '
                             f'(beta_d = {vp.beta_d:g}, beta_min = {vp.beta_min:g}); raise epsilon_s or sigma_min')
    if discretization == 'iddpm':
        u = schedules.iddpm_u(M, C_1, C_2)
        if not ((u >= lo) & (u <= hi)).any():
            raise ValueError(f'discretization: iddpm: no level u_j of M = {M}, C_1 = {C_1:g}, C_2 = {C_2:g} lies in '
                             f'[{lo:g}, {hi:g}]; widen the sigma range')


def clamping_note(sampler, net, clamped):
    """The one line that says a run's sigma range was clamped (clamped_sigma_range's answer)."""
    (lo, hi), (lo_used, hi_used) = clamped
    return (f'{sampler} sigma range [{lo:g}, {hi:g}] reaches outside the model\'s [{net.sigma_min:g}, {net.sigma_max:g}]: '
            f'sampled on [{lo_used:g}, {hi_used:g}] (clamped, as EDM\'s generate.py does)')


class SigmaRangeClamped(UserWarning):
    """A sampler's sigma range reached outside the model's and was clamped to it."""


# Arguments every sampler takes first (EDM's generate.py); everything after them is a setting.
COMMON_ARGUMENTS = ('net', 'latents', 'class_labels', 'randn_like', 'return_nfe')
# Settings that take a Python object, not a value a spec can hold: accepted, never listed as valid.
OBJECT_SETTINGS = ('noise_schedule',)


def setting_names(sampler):
    """The settings a sampler takes: its signature after the common arguments."""
    return [name for name in inspect.signature(get_sampler(sampler)).parameters if name not in COMMON_ARGUMENTS]


def check_entry(sampler, net, stacklevel=3, **settings):
    """The entry check of every public sampler function (generate and each sampler), before any
    work: every setting a setting of this sampler, in its domain and consistent with the others
    (check_settings), and the run's sigma range against the model's (clamped_sigma_range). A
    refusal is a ValueError with the text `orchestrator validate` prints after its field path; a
    range partly outside the model's is clamped, with one SigmaRangeClamped warning (attributed to
    the line `stacklevel` frames up: the caller of the public function)."""
    names = setting_names(sampler)
    valid = [name for name in names if name not in OBJECT_SETTINGS]  # the spec's keys
    for name in settings:
        if name not in names:
            close = difflib.get_close_matches(name, valid, n=1)
            raise ValueError(f'{name}: not a parameter of {sampler}{f" (did you mean {close[0]!r}?)" if close else ""}; '
                             f'valid: {", ".join(sorted(valid))}')
    check_settings(sampler, **settings)
    clamped = clamped_sigma_range(sampler, net, **settings)
    if clamped:
        warnings.warn(clamping_note(sampler, net, clamped), SigmaRangeClamped, stacklevel=stacklevel)


@contextlib.contextmanager
def checked_once(sampler, net, **settings):
    """check_entry once, then silence its clamping warning for the repeated calls inside (batches,
    seed blocks), so that a call of generate, metrics.sample_statistics or metrics.evaluate says a
    clamp once."""
    check_entry(sampler, net, stacklevel=5, **settings)  # past this generator and contextlib: the public caller
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', SigmaRangeClamped)
        yield


def step_summary(sampler, net, **settings):
    """What a run walks, for its row: distinct_steps (the steps between distinct noise levels:
    edm and ablation after rounding to the model's levels, dpm_solver its outer steps) and
    sigma_end (the last noise level of the grid, after clamping to the model's range)."""
    kwargs = {name: p.default for name, p in inspect.signature(get_sampler(sampler)).parameters.items()
              if name not in COMMON_ARGUMENTS}
    kwargs.update(settings)
    take = lambda fn: {k: v for k, v in kwargs.items() if k in inspect.signature(fn).parameters and k != 'net'}
    if sampler == 'dpm_solver':
        noise_schedule, t_outer, orders, _ = dpm_solver_grid(net, **take(dpm_solver_grid))
        return dict(distinct_steps=len(orders), sigma_end=float(noise_schedule.sigma(t_outer[-1]).clamp(net.sigma_min)))
    grid = edm_grid(net, **take(edm_grid)) if sampler == 'edm' else ablation_grid(net, **take(ablation_grid))[0]
    return dict(distinct_steps=len(grid), sigma_end=float(grid[-1]))


class NonFiniteSamples(ValueError):
    """Samples with NaN or infinite values: never scored or used (as uint8 images they would
    silently become black or white)."""


class _FirstNonFinite:
    """A denoiser that remembers the first sigma at which its output was not finite, on the
    device (no host synchronisation per evaluation); everything else is the wrapped net's."""

    def __init__(self, net):
        self.net, self.sigma = net, None

    def __getattr__(self, name):
        return getattr(self.net, name)

    def __call__(self, x, sigma, class_labels=None):
        out = self.net(x, sigma, class_labels)
        s = torch.as_tensor(sigma, dtype=torch.float64, device=out.device).max()
        first = torch.full((), math.nan, dtype=torch.float64, device=out.device) if self.sigma is None else self.sigma
        self.sigma = torch.where(first.isnan() & ~torch.isfinite(out).all(), s, first)
        return out


def get_sampler(name):
    if name not in SAMPLERS:
        raise ValueError(f'unknown sampler {name!r}; valid: {", ".join(SAMPLERS)}')
    return SAMPLERS[name]


def generate(net, seeds, sampler='edm', class_labels=None, class_idx=None, batch_size=64, device='cpu',
             return_labels=False, **sampler_kwargs):
    """Images for the given per-image seeds, in batches, as EDM's generate.py draws them:
    latents from StackedRandomGenerator(seeds), then, for a conditional net (label_dim > 0) and no
    given class_labels, one class per image from the same generator (so labels too depend only on
    the seed; class_idx fixes the class after the draw, as generate.py's --class does), then the
    stochastic noise. Returns (images float32 [N, C, R, R] on the CPU, nfe per batch), and the
    one-hot labels used (or None) with return_labels.
    seeds: check_seeds (list, range or 1-D integer tensor/array; distinct, in [0, 2^32)).
    class_labels: None, N = len(seeds) class indices or an [N, label_dim] one-hot tensor
    (check_class_labels); class_idx: one integer class for every image, not with class_labels."""
    sampler_fn = get_sampler(sampler)
    with checked_once(sampler, net, **sampler_kwargs):  # a clamp is said once, not by each batch's sampler call
        shape = [net.img_channels, net.img_resolution, net.img_resolution]
        label_dim = getattr(net, 'label_dim', 0)
        seeds = check_seeds(seeds)
        class_labels = check_class_labels(class_labels, len(seeds), label_dim_of(net))
        if class_idx is not None and class_labels is not None:
            raise ValueError('class_idx: give class_labels or class_idx, not both')
        if class_idx is not None and (isinstance(class_idx, (bool, np.bool_)) or not isinstance(class_idx, (int, np.integer))):
            raise ValueError(f'class_idx: expected an integer class index, got {class_idx!r}')
        if class_idx is not None and not 0 <= class_idx < label_dim:
            raise ValueError(f'class {class_idx} is out of range: the model has {label_dim} classes')
        out, out_labels, nfe = [], [], 0
        for start in range(0, len(seeds), batch_size):
            batch_seeds = seeds[start:start + batch_size]
            rnd = StackedRandomGenerator(device, batch_seeds)
            latents = rnd.randn([len(batch_seeds), *shape], device=device)
            labels = None
            if class_labels is not None:
                labels = class_labels[start:start + batch_size].to(device)
            elif label_dim:
                labels = torch.eye(label_dim, device=device)[rnd.randint(label_dim, size=[len(batch_seeds)], device=device)]
                if class_idx is not None:
                    labels[:, :] = 0
                    labels[:, class_idx] = 1
            kwargs = dict(sampler_kwargs)
            if sampler != 'dpm_solver':
                kwargs['randn_like'] = rnd.randn_like
            watched = _FirstNonFinite(net)
            with torch.no_grad():
                images, nfe = sampler_fn(watched, latents, labels, return_nfe=True, **kwargs)
            images = images.to(torch.float32)  # checked as kept: a float64 1e300 is a float32 inf
            finite = torch.isfinite(images).flatten(1).all(1)
            if not finite.all():
                at = float(watched.sigma) if watched.sigma is not None and not watched.sigma.isnan() else None
                settings = ' '.join(f'{k}={v}' for k, v in sampler_kwargs.items())
                raise NonFiniteSamples(
                    f'{int((~finite).sum())} of the {len(batch_seeds)} samples of seeds {batch_seeds[0]}..{batch_seeds[-1]} are '
                    f'not finite ({sampler}{" " + settings if settings else ""}); '
                    + (f'the denoiser first returned non-finite values at sigma {at:g}' if at is not None else
                       "the denoiser's outputs were finite: the sampler's own arithmetic made them"))
            out.append(images.cpu())
            out_labels.append(None if labels is None else labels.cpu())
    images = torch.cat(out)
    if return_labels:
        return images, nfe, None if out_labels[0] is None else torch.cat(out_labels)
    return images, nfe
