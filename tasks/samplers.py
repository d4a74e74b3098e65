"""Samplers over a denoiser D(x; sigma) (tasks.precond): EDM's deterministic and stochastic
samplers and DPM-Solver / DPM-Solver++.

All samplers keep their state in float64, take standard-normal `latents` of shape
[N, C, H, W] (or [N, d]) and return the images; with return_nfe=True they return
(images, nfe), nfe being the number of denoiser evaluations made (one evaluation = one call on
the whole batch). Per-image seeds: draw latents and noise with StackedRandomGenerator so an
image depends only on its own seed, never on the batch it was computed in.
"""
import math

import numpy as np
import torch

from tasks import schedules


class StackedRandomGenerator:
    """One torch.Generator per image (EDM generate.py): image i's latents and noise depend only on
    seeds[i]."""

    def __init__(self, device, seeds):
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
    """Wraps a denoiser and counts its evaluations (and optionally records the sigmas asked)."""

    def __init__(self, net, record_sigmas=False):
        self.net, self.nfe, self.sigmas = net, 0, [] if record_sigmas else None
        self.sigma_min, self.sigma_max = net.sigma_min, net.sigma_max

    def round_sigma(self, sigma):
        return self.net.round_sigma(sigma)

    def __call__(self, x, sigma, class_labels=None):
        self.nfe += 1
        if self.sigmas is not None:
            s = torch.as_tensor(sigma, dtype=torch.float64)
            self.sigmas.append(float(s) if s.numel() == 1 else s.tolist())
        return self.net(x, sigma, class_labels)


def _result(x, net, return_nfe):
    return (x, net.nfe) if return_nfe else x


# ---------------------------------------------------------------------------------------------
# EDM.

def edm_sampler(net, latents, class_labels=None, randn_like=torch.randn_like,
                num_steps=18, sigma_min=0.002, sigma_max=80, rho=7,
                S_churn=0, S_min=0, S_max=float('inf'), S_noise=1, return_nfe=False):
    """EDM Algorithm 2 (stochastic Heun; deterministic Algorithm 1 when S_churn = 0) on the
    Eq. 5 grid, with sigma(t) = t and s(t) = 1; the last step is Euler, so NFE = 2 N - 1.
    Same signature and arithmetic as EDM's generate.py."""
    net = CountedDenoiser(net)
    sigma_min = max(sigma_min, net.sigma_min)
    sigma_max = min(sigma_max, net.sigma_max)

    t_steps = schedules.edm_sigma_steps(num_steps, sigma_min, sigma_max, rho).to(latents.device)
    t_steps = torch.cat([net.round_sigma(t_steps), torch.zeros_like(t_steps[:1])])  # t_N = 0

    x_next = latents.to(torch.float64) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next

        # Increase noise temporarily.
        gamma = min(S_churn / num_steps, np.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0
        t_hat = net.round_sigma(t_cur + gamma * t_cur)
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


SOLVERS = ('euler', 'heun')
DISCRETIZATIONS = ('vp', 've', 'iddpm', 'edm')
SCHEDULES = ('vp', 've', 'linear')
SCALINGS = ('vp', 'none')


def ablation_sampler(net, latents, class_labels=None, randn_like=torch.randn_like,
                     num_steps=18, sigma_min=None, sigma_max=None, rho=7,
                     solver='heun', discretization='edm', schedule='linear', scaling='none',
                     epsilon_s=1e-3, C_1=0.001, C_2=0.008, M=1000, alpha=1,
                     S_churn=0, S_min=0, S_max=float('inf'), S_noise=1, return_nfe=False):
    """EDM's generalized sampler (generate.py): Algorithms 1 and 2 with any sigma(t), s(t) and
    discretization of Table 1, Euler or Heun (alpha = 1) / general 2nd-order RK (alpha)."""
    for name, value, valid in (('solver', solver, SOLVERS), ('discretization', discretization, DISCRETIZATIONS),
                               ('schedule', schedule, SCHEDULES), ('scaling', scaling, SCALINGS)):
        if value not in valid:
            raise ValueError(f'unknown {name} {value!r}; valid: {", ".join(valid)}')
    net = CountedDenoiser(net)
    vp_default = schedules.VPSchedule(beta_d=19.9, beta_min=0.1)  # generate.py's default range
    if sigma_min is None:
        sigma_min = {'vp': float(vp_default.sigma(epsilon_s)), 've': 0.02, 'iddpm': 0.002, 'edm': 0.002}[discretization]
    if sigma_max is None:
        sigma_max = {'vp': float(vp_default.sigma(1)), 've': 100, 'iddpm': 81, 'edm': 80}[discretization]
    sigma_min = max(sigma_min, net.sigma_min)
    sigma_max = min(sigma_max, net.sigma_max)
    vp = schedules.VPSchedule.from_sigma_range(sigma_min, sigma_max, epsilon_s)

    # Time steps in terms of noise level.
    if discretization == 'vp':
        sigma_steps = vp.sigma(schedules.vp_time_steps(num_steps, epsilon_s))
    elif discretization == 've':
        sigma_steps = schedules.VESchedule().sigma(schedules.ve_time_steps(num_steps, sigma_min, sigma_max))
    elif discretization == 'iddpm':
        sigma_steps = schedules.iddpm_sigma_steps(num_steps, sigma_min, sigma_max, M, C_1, C_2)
    else:
        sigma_steps = schedules.edm_sigma_steps(num_steps, sigma_min, sigma_max, rho)
    sigma_steps = sigma_steps.to(latents.device)

    # Noise level schedule sigma(t) and scaling s(t).
    sched = vp if schedule == 'vp' else schedules.VESchedule() if schedule == 've' else schedules.LinearSchedule()
    sigma, sigma_deriv, sigma_inv = sched.sigma, sched.sigma_deriv, sched.sigma_inv
    if scaling == 'vp':
        s_fn = schedules.VPScaling(sched)
        s, s_deriv = s_fn, s_fn.deriv
    else:
        s, s_deriv = (lambda t: 1), (lambda t: 0)

    t_steps = sigma_inv(net.round_sigma(sigma_steps))
    t_steps = torch.cat([t_steps, torch.zeros_like(t_steps[:1])])  # t_N = 0

    t_next = t_steps[0]
    x_next = latents.to(torch.float64) * (sigma(t_next) * s(t_next))
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next

        # Increase noise temporarily.
        gamma = min(S_churn / num_steps, np.sqrt(2) - 1) if S_min <= sigma(t_cur) <= S_max else 0
        t_hat = sigma_inv(net.round_sigma(sigma(t_cur) + gamma * sigma(t_cur)))
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
    """
    if algorithm_type not in DPM_ALGORITHMS:
        raise ValueError(f'unknown DPM-Solver algorithm_type {algorithm_type!r}; valid: {", ".join(DPM_ALGORITHMS)}')
    noise_schedule = noise_schedule or schedules.VPLinearNoiseSchedule()
    t_outer, orders, r = dpm_solver_plan(noise_schedule, steps, order, method, skip_type, t_start, t_end)
    sigma_outer = noise_schedule.sigma(t_outer)
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
    one-hot labels used (or None) with return_labels."""
    sampler_fn = get_sampler(sampler)
    shape = [net.img_channels, net.img_resolution, net.img_resolution]
    label_dim = getattr(net, 'label_dim', 0)
    if class_idx is not None and not 0 <= class_idx < label_dim:
        raise ValueError(f'class {class_idx} is out of range: the model has {label_dim} classes')
    out, out_labels, nfe = [], [], 0
    seeds = list(seeds)
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
        with torch.no_grad():
            images, nfe = sampler_fn(net, latents, labels, return_nfe=True, **kwargs)
        out.append(images.to(torch.float32).cpu())
        out_labels.append(None if labels is None else labels.cpu())
    images = torch.cat(out)
    if return_labels:
        return images, nfe, None if out_labels[0] is None else torch.cat(out_labels)
    return images, nfe
