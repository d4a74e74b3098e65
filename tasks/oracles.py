"""Exact denoisers: test oracles, and "pretrained models" whose calibration is known exactly.

* IdealDenoiser: the optimal denoiser of a finite dataset {y_i} (EDM Eq. 57),
  D(x; sigma) = sum_i y_i N(x; y_i, sigma^2 I) / sum_i N(x; y_i, sigma^2 I),
  computed in chunks of the dataset with a streaming log-sum-exp, so 60k images fit in memory.
* GaussianMixtureDenoiser: the exact E[y | y + sigma n = x] of a mixture of Gaussians with
  diagonal covariances: sum_k r_k(x) (mu_k + v_k / (v_k + sigma^2) (x - mu_k)),
  r_k(x) proportional to w_k N(x; mu_k, diag(v_k + sigma^2)).

Both take x of shape [N, ...] and sigma as a scalar or [N] (any of the shapes samplers pass),
and expose sigma_min = 0, sigma_max = inf, round_sigma like tasks.precond's denoisers.
"""
import hashlib
import math

import torch


def _hash_tensors(*tensors):
    h = hashlib.sha256()
    for t in tensors:
        if t is not None:
            h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


def _sigma_column(sigma, n, dtype, device):
    sigma = torch.as_tensor(sigma, dtype=dtype, device=device).reshape(-1)
    return sigma.expand(n) if sigma.numel() == 1 else sigma


class IdealDenoiser:
    """EDM Eq. 57 for images `data` [M, ...] (already scaled, e.g. to [-1, 1]); optional integer
    `labels` [M] make it class-conditional: with one-hot class_labels, image x is denoised
    against the images of its class only."""
    sigma_min, sigma_max = 0.0, float('inf')

    def __init__(self, data, labels=None, chunk_size=4096, dtype=torch.float64):
        self.data = data.reshape(data.shape[0], -1).to(dtype)
        self.sq_norms = self.data.square().sum(1)
        self.labels = None if labels is None else torch.as_tensor(labels).long()
        self.shape = tuple(data.shape[1:])
        self.chunk_size, self.dtype = chunk_size, dtype
        if len(self.shape) == 3:
            self.img_channels, self.img_resolution = self.shape[0], self.shape[1]

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    def fingerprint(self):
        return _hash_tensors(self.data, self.labels)

    def __call__(self, x, sigma, class_labels=None):
        n = x.shape[0]
        xf = x.reshape(n, -1).to(self.dtype).cpu()
        inv_two_var = 1 / (2 * _sigma_column(sigma, n, self.dtype, 'cpu') ** 2)
        classes = None
        if class_labels is not None and self.labels is not None:
            classes = torch.as_tensor(class_labels).reshape(n, -1).argmax(1).cpu()
        running_max = torch.full((n,), -math.inf, dtype=self.dtype)
        running_sum = torch.zeros(n, dtype=self.dtype)
        weighted = torch.zeros_like(xf)
        x_sq = xf.square().sum(1, keepdim=True)
        for start in range(0, self.data.shape[0], self.chunk_size):
            y = self.data[start:start + self.chunk_size]
            dist2 = (x_sq - 2 * xf @ y.T + self.sq_norms[start:start + self.chunk_size]).clamp(min=0)
            logits = -dist2 * inv_two_var[:, None]
            if classes is not None:
                logits = logits.masked_fill(self.labels[start:start + self.chunk_size][None, :] != classes[:, None], -math.inf)
            chunk_max = logits.max(1).values
            new_max = torch.maximum(running_max, chunk_max)
            scale = torch.where(torch.isfinite(new_max), (running_max - new_max).exp(), torch.zeros_like(new_max))
            p = (logits - new_max[:, None]).exp().nan_to_num(0.0)
            running_sum = running_sum * scale + p.sum(1)
            weighted = weighted * scale[:, None] + p @ y
            running_max = new_max
        return (weighted / running_sum[:, None]).reshape(x.shape).to(x.device, x.dtype)


class GaussianMixtureDenoiser:
    """Exact denoiser of sum_k w_k N(mu_k, diag(v_k)) in d = prod(shape) dimensions.
    weights [K], means [K, d], variances [K, d] (or [K] for isotropic components)."""
    sigma_min, sigma_max = 0.0, float('inf')

    def __init__(self, weights, means, variances, shape=None):
        self.weights = torch.as_tensor(weights, dtype=torch.float64)
        self.weights = self.weights / self.weights.sum()
        self.means = torch.as_tensor(means, dtype=torch.float64)
        K, d = self.means.shape
        v = torch.as_tensor(variances, dtype=torch.float64)
        self.variances = v.reshape(K, 1).expand(K, d).clone() if v.ndim == 1 else v
        self.shape = tuple(shape) if shape is not None else (d,)
        if len(self.shape) == 3:
            self.img_channels, self.img_resolution = self.shape[0], self.shape[1]

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    def fingerprint(self):
        return _hash_tensors(self.weights, self.means, self.variances)

    def responsibilities(self, x, sigma):
        """r_k(x) of the noisy mixture at level sigma, [N, K]."""
        n = x.shape[0]
        xf = x.reshape(n, -1).to(torch.float64).cpu()
        var = self.variances[None] + _sigma_column(sigma, n, torch.float64, 'cpu')[:, None, None] ** 2  # [N, K, d]
        log_p = -0.5 * (((xf[:, None] - self.means[None]) ** 2) / var + var.log()).sum(2)
        return torch.softmax(log_p + self.weights.log()[None], dim=1)

    def __call__(self, x, sigma, class_labels=None):
        n = x.shape[0]
        xf = x.reshape(n, -1).to(torch.float64).cpu()
        s2 = _sigma_column(sigma, n, torch.float64, 'cpu')[:, None, None] ** 2
        r = self.responsibilities(x, sigma)
        posterior_means = self.means[None] + self.variances[None] / (self.variances[None] + s2) * (xf[:, None] - self.means[None])
        return (r[:, :, None] * posterior_means).sum(1).reshape(x.shape).to(x.device, x.dtype)

    def sample(self, n, generator=None):
        """n draws from the (clean) mixture, [n, *shape], float64."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.means.shape[1], dtype=torch.float64, generator=generator)
        return (self.means[k] + self.variances[k].sqrt() * z).reshape(n, *self.shape)

    def ode_solution(self, x, sigma_from, sigma_to):
        """Exact probability-flow ODE map x(sigma_from) -> x(sigma_to) for one Gaussian (K = 1):
        x - mu scales by sqrt((v + sigma_to^2) / (v + sigma_from^2))."""
        if self.means.shape[0] != 1:
            raise ValueError('the closed-form ODE solution is only available for a single Gaussian')
        mu, v = self.means[0], self.variances[0]
        xf = x.reshape(x.shape[0], -1).to(torch.float64)
        scale = ((v + sigma_to ** 2) / (v + sigma_from ** 2)).sqrt()
        return (mu + scale * (xf - mu)).reshape(x.shape)
