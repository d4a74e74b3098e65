"""Noise schedules and time-step discretizations, in float64.

Two families live here:

* EDM Table 1 (Karras et al. 2022): sigma(t), sigma'(t), sigma^-1(sigma), s(t), s'(t) for the
  VP, VE and linear (iDDPM, EDM) schedules, and the time steps {t_i} of the VP, VE, iDDPM and
  EDM discretizations. "sigma" is always EDM's noise level in the non-scaled space
  (x = y + sigma * n).
* DPM-Solver's VP noise schedules (Lu et al. 2022): q(x_t | x_0) = N(alpha_t x_0, std_t^2 I)
  with lambda_t = log(alpha_t / std_t). The EDM noise level of time t is
  sigma(t) = std_t / alpha_t = exp(-lambda_t), which is how every sampler here sees them.

Everything accepts python floats or tensors and returns float64 tensors.
"""
import math

import torch

F64 = torch.float64


def _f64(x):
    return torch.as_tensor(x, dtype=F64)


# ---------------------------------------------------------------------------------------------
# EDM Table 1: sigma(t) and s(t).

class VPSchedule:
    """EDM Table 1, VP column: sigma(t) = sqrt(exp(0.5 beta_d t^2 + beta_min t) - 1),
    s(t) = 1 / sqrt(exp(0.5 beta_d t^2 + beta_min t))."""

    def __init__(self, beta_d=19.9, beta_min=0.1):
        self.beta_d, self.beta_min = float(beta_d), float(beta_min)

    def sigma(self, t):
        t = _f64(t)
        return ((0.5 * self.beta_d * t ** 2 + self.beta_min * t).exp() - 1).sqrt()

    def sigma_deriv(self, t):
        t, sigma = _f64(t), self.sigma(t)
        return 0.5 * (self.beta_min + self.beta_d * t) * (sigma + 1 / sigma)

    def sigma_inv(self, sigma):
        sigma = _f64(sigma)
        return ((self.beta_min ** 2 + 2 * self.beta_d * (sigma ** 2 + 1).log()).sqrt() - self.beta_min) / self.beta_d

    def s(self, t):
        return 1 / (1 + self.sigma(t) ** 2).sqrt()

    def s_deriv(self, t):
        return -self.sigma(t) * self.sigma_deriv(t) * self.s(t) ** 3

    @classmethod
    def from_sigma_range(cls, sigma_min, sigma_max, epsilon_s=1e-3):
        """The VP schedule whose sigma(epsilon_s) = sigma_min and sigma(1) = sigma_max
        (EDM generate.py's ablation_sampler, used with schedule='vp')."""
        beta_d = 2 * (math.log(sigma_min ** 2 + 1) / epsilon_s - math.log(sigma_max ** 2 + 1)) / (epsilon_s - 1)
        beta_min = math.log(sigma_max ** 2 + 1) - 0.5 * beta_d
        return cls(beta_d=beta_d, beta_min=beta_min)


class VESchedule:
    """EDM Table 1, VE column: sigma(t) = sqrt(t), s(t) = 1."""

    def sigma(self, t):
        return _f64(t).sqrt()

    def sigma_deriv(self, t):
        return 0.5 / _f64(t).sqrt()

    def sigma_inv(self, sigma):
        return _f64(sigma) ** 2

    def s(self, t):
        return torch.ones_like(_f64(t))

    def s_deriv(self, t):
        return torch.zeros_like(_f64(t))


class LinearSchedule:
    """EDM Table 1, iDDPM and EDM columns: sigma(t) = t, s(t) = 1."""

    def sigma(self, t):
        return _f64(t)

    def sigma_deriv(self, t):
        return torch.ones_like(_f64(t))

    def sigma_inv(self, sigma):
        return _f64(sigma)

    def s(self, t):
        return torch.ones_like(_f64(t))

    def s_deriv(self, t):
        return torch.zeros_like(_f64(t))


class VPScaling:
    """s(t) = 1 / sqrt(1 + sigma(t)^2) on top of any sigma(t) (EDM generate.py, scaling='vp')."""

    def __init__(self, schedule):
        self.schedule = schedule

    def __call__(self, t):
        return 1 / (1 + self.schedule.sigma(t) ** 2).sqrt()

    def deriv(self, t):
        return -self.schedule.sigma(t) * self.schedule.sigma_deriv(t) * self(t) ** 3


SCHEDULES = {'vp': VPSchedule, 've': VESchedule, 'linear': LinearSchedule}


# ---------------------------------------------------------------------------------------------
# EDM Table 1: time-step discretizations. Each returns num_steps values, largest noise first,
# without the final t_N = 0 (the samplers append it).

def edm_sigma_steps(num_steps, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """EDM Eq. 5: sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho."""
    _check_num_steps(num_steps)
    i = torch.arange(num_steps, dtype=F64)
    return (sigma_max ** (1 / rho) + i / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def vp_time_steps(num_steps, epsilon_s=1e-3):
    """EDM Table 1, VP: t_i = 1 + i/(N-1) (epsilon_s - 1)."""
    _check_num_steps(num_steps)
    i = torch.arange(num_steps, dtype=F64)
    return 1 + i / (num_steps - 1) * (epsilon_s - 1)


def ve_time_steps(num_steps, sigma_min=0.02, sigma_max=100.0):
    """EDM Table 1, VE: t_i = sigma_max^2 (sigma_min^2 / sigma_max^2)^(i/(N-1))."""
    _check_num_steps(num_steps)
    i = torch.arange(num_steps, dtype=F64)
    return sigma_max ** 2 * (sigma_min ** 2 / sigma_max ** 2) ** (i / (num_steps - 1))


def iddpm_u(M=1000, C_1=0.001, C_2=0.008, dtype=F64):
    """EDM Table 1, iDDPM: u_M = 0, u_{j-1} = sqrt((u_j^2 + 1) / max(abar(j-1)/abar(j), C_1) - 1),
    abar(j) = sin^2(pi/2 j / (M (C_2 + 1))). Returns u_0 ... u_M (decreasing).

    The arithmetic is EDM's, so that the levels are the same floats: abar and its ratio are
    evaluated in float32 (in EDM an integer tensor times a Python float is float32), u is
    accumulated in `dtype` (float32 in EDM's iDDPMPrecond, float64 in generate.py's sampler)."""
    alpha_bar = lambda j: (0.5 * math.pi * torch.as_tensor(j) / M / (C_2 + 1)).sin() ** 2
    u = torch.zeros(M + 1, dtype=dtype)
    for j in range(M, 0, -1):
        u[j - 1] = ((u[j] ** 2 + 1) / (alpha_bar(j - 1) / alpha_bar(j)).clip(min=C_1) - 1).sqrt()
    return u


def iddpm_sigma_steps(num_steps, sigma_min=0.002, sigma_max=81.0, M=1000, C_1=0.001, C_2=0.008):
    """iDDPM discretization as EDM's generate.py computes it: the u_j inside
    [sigma_min, sigma_max], indexed by round((len - 1) / (N - 1) * i). With the defaults this is
    Table 1's t_i = u_floor(j_0 + (M - 1 - j_0)/(N - 1) i + 1/2), j_0 = 8."""
    _check_num_steps(num_steps)
    u = iddpm_u(M, C_1, C_2)
    u_filtered = u[(u >= sigma_min) & (u <= sigma_max)]
    i = torch.arange(num_steps, dtype=F64)
    return u_filtered[((len(u_filtered) - 1) / (num_steps - 1) * i).round().to(torch.int64)]


def _check_num_steps(num_steps):
    if int(num_steps) != num_steps or num_steps < 2:
        raise ValueError(f'num_steps must be an integer >= 2, got {num_steps!r}')


# ---------------------------------------------------------------------------------------------
# DPM-Solver's VP noise schedules (NoiseScheduleVP of the reference implementation).

class DPMNoiseSchedule:
    """Common part: alpha_t, std_t (DPM-Solver's sigma_t), lambda_t and the EDM noise level."""
    T = 1.0

    def alpha(self, t):
        return self.log_alpha(t).exp()

    def std(self, t):
        """DPM-Solver's sigma_t = sqrt(1 - alpha_t^2)."""
        return (-torch.expm1(2 * self.log_alpha(t))).sqrt()

    def lambda_(self, t):
        """Half log-SNR lambda_t = log alpha_t - log std_t."""
        log_alpha = self.log_alpha(t)
        return log_alpha - 0.5 * (-torch.expm1(2 * log_alpha)).log()

    def sigma(self, t):
        """EDM noise level of time t: std_t / alpha_t = exp(-lambda_t)."""
        return (-self.lambda_(t)).exp()

    def t_of_sigma(self, sigma):
        return self.inverse_lambda(-_f64(sigma).log())

    def default_t_end(self, steps):
        raise NotImplementedError


class VPLinearNoiseSchedule(DPMNoiseSchedule):
    """Continuous-time linear VP-SDE: beta(t) = beta_0 + t (beta_1 - beta_0), t in [0, 1]."""
    total_N = 1000

    def __init__(self, beta_0=0.1, beta_1=20.0):
        self.beta_0, self.beta_1 = float(beta_0), float(beta_1)

    def log_alpha(self, t):
        t = _f64(t)
        return -0.25 * t ** 2 * (self.beta_1 - self.beta_0) - 0.5 * t * self.beta_0

    def inverse_lambda(self, lamb):
        lamb = _f64(lamb)
        tmp = 2 * (self.beta_1 - self.beta_0) * torch.logaddexp(-2 * lamb, torch.zeros_like(lamb))
        delta = self.beta_0 ** 2 + tmp
        return tmp / (delta.sqrt() + self.beta_0) / (self.beta_1 - self.beta_0)

    def default_t_end(self, steps):
        """The recommendation of the reference's docstring for continuous-time models: 1e-3 when
        steps <= 15, else 1e-4 (its code defaults to 1/N; Calib Table 1 used 1e-4 from 15 steps
        on, which its specs give as t_end)."""
        return 1e-3 if steps <= 15 else 1e-4


class VPDiscreteNoiseSchedule(DPMNoiseSchedule):
    """Discrete-time DPM (DDPM) with N betas, seen at continuous times t_n = (n + 1) / N with
    log alpha_t piecewise linear in t, as the reference does. Levels with log-SNR below -5.1 at
    the noisy end are dropped (the reference's numerical_clip_alpha; e.g. cosine schedules) and
    N is then the number of levels kept.

    Levels of sigma 0 at the clean end (alphas_cumprod = 1: betas starting at 0, or MONAI's cosine
    form) are dropped too, as MONAI PR 8427 clips them away: lambda is infinite there, and DPM-Solver
    on such a grid gives NaN. `first_level` counts them: kept level j is training step
    first_level + j. Anything else that is not a noise schedule (betas outside [0, 1], NaN,
    alphas_cumprod that rise, or two training steps of the same level) is a ValueError."""

    def __init__(self, betas=None, alphas_cumprod=None, clipped_lambda=-5.1):
        if (betas is None) == (alphas_cumprod is None):
            raise ValueError('give exactly one of betas or alphas_cumprod')
        if betas is not None:
            betas = _f64(betas)
            bad = ~((betas >= 0) & (betas <= 1))  # NaN too
            if betas.ndim != 1 or not len(betas) or bad.any():
                raise ValueError('betas: expected a non-empty 1-D sequence in [0, 1], got '
                                 + (f'shape {list(betas.shape)}' if betas.ndim != 1 or not len(betas)
                                    else f'{float(betas[bad][0])!r} at step {int(bad.nonzero()[0])}'))
            log_alphas = 0.5 * torch.log1p(-betas).cumsum(0)
        else:
            abar = _f64(alphas_cumprod)
            bad = ~((abar >= 0) & (abar <= 1))
            if abar.ndim != 1 or not len(abar) or bad.any():
                raise ValueError('alphas_cumprod: expected a non-empty 1-D sequence in [0, 1], got '
                                 + (f'shape {list(abar.shape)}' if abar.ndim != 1 or not len(abar)
                                    else f'{float(abar[bad][0])!r} at step {int(bad.nonzero()[0])}'))
            log_alphas = 0.5 * abar.log()
        rising = (log_alphas.diff() > 0).nonzero().flatten()
        if len(rising):
            n = int(rising[0]) + 1
            raise ValueError(f'alphas_cumprod rises at step {n} ({float(log_alphas[n - 1].exp() ** 2):.6g} -> '
                             f'{float(log_alphas[n].exp() ** 2):.6g}): not a noise schedule')
        self.first_level = int((log_alphas == 0).sum())  # sigma 0: leading, as log alpha never rises
        log_alphas = log_alphas[self.first_level:]
        if not len(log_alphas):
            raise ValueError('alphas_cumprod: every level is 1 (sigma 0): the schedule adds no noise')
        lambdas = log_alphas - 0.5 * (-torch.expm1(2 * log_alphas)).log()
        idx = int(torch.searchsorted(lambdas.flip(0).contiguous(), torch.tensor([clipped_lambda], dtype=F64)))
        if idx == len(log_alphas):
            raise ValueError(f'every level has log-SNR below {clipped_lambda}: nothing is left after the clip')
        if idx > 0:
            log_alphas = log_alphas[:-idx]
        repeated = (log_alphas.diff() == 0).nonzero().flatten()
        if len(repeated):
            n = self.first_level + int(repeated[0]) + 1
            raise ValueError(f'alphas_cumprod: training steps {n - 1} and {n} have the same noise level (beta_{n} is 0, or '
                             'rounds to 0 in alphas_cumprod\'s precision): the time input at that level would be ambiguous')
        # As the reference: N counts the kept levels only, and time is re-spaced over (1/N, 1],
        # which moves lambda_T, the default end time 1/N and the model time (t - 1/N) * 1000.
        self.log_alpha_array = log_alphas
        self.total_N = len(log_alphas)
        self.t_array = torch.linspace(0, 1, self.total_N + 1, dtype=F64)[1:]

    @classmethod
    def ddpm_linear(cls, N=1000, beta_start=1e-4, beta_end=0.02):
        """DDPM's linear betas (Ho et al. 2020)."""
        return cls(betas=torch.linspace(beta_start, beta_end, N, dtype=F64))

    def log_alpha(self, t):
        return interpolate(_f64(t), self.t_array, self.log_alpha_array)

    def inverse_lambda(self, lamb):
        log_alpha = -0.5 * torch.logaddexp(torch.zeros_like(_f64(lamb)), -2 * _f64(lamb))
        return interpolate(log_alpha, self.log_alpha_array.flip(0), self.t_array.flip(0))

    def default_t_end(self, steps):
        """The reference's recommendation for discrete-time models: t = 1/N."""
        return 1.0 / self.total_N


def interpolate(x, xp, yp):
    """Piecewise-linear y(x) through increasing keypoints (xp, yp), extended linearly beyond
    both ends by the outermost segments (as the reference's interpolate_fn)."""
    K = xp.shape[0]
    idx = torch.searchsorted(xp, x.contiguous()).clamp(1, K - 1)
    x0, x1, y0, y1 = xp[idx - 1], xp[idx], yp[idx - 1], yp[idx]
    return y0 + (x - x0) * (y1 - y0) / (x1 - x0)


DPM_SKIP_TYPES = ('logSNR', 'time_uniform', 'time_quadratic')


def dpm_time_steps(noise_schedule, skip_type, t_T, t_0, N):
    """DPM-Solver's time grid of N + 1 times from t_T down to t_0 (reference get_time_steps)."""
    if skip_type == 'logSNR':
        lambda_T, lambda_0 = noise_schedule.lambda_(t_T), noise_schedule.lambda_(t_0)
        return noise_schedule.inverse_lambda(torch.linspace(float(lambda_T), float(lambda_0), N + 1, dtype=F64))
    if skip_type == 'time_uniform':
        return torch.linspace(float(t_T), float(t_0), N + 1, dtype=F64)
    if skip_type == 'time_quadratic':
        return torch.linspace(float(t_T) ** 0.5, float(t_0) ** 0.5, N + 1, dtype=F64) ** 2
    raise ValueError(f'unknown skip_type {skip_type!r}; valid: {", ".join(DPM_SKIP_TYPES)}')
