"""Calibration of a pretrained diffusion model (Pang et al., NeurIPS 2023) in EDM's denoiser view.

The calibrated noise model is eps_cal(x) = eps(x) - E_{q_sigma}[eps(x)] (Calib Eq. 8). With
eps = (x - D) / sigma and x = y + sigma n, E[eps] = -c(sigma) / sigma where

    c(sigma) = E_{y, n}[D(y + sigma n; sigma)] - E[y],

so the calibrated denoiser is D_cal(x; sigma) = D(x; sigma) - c(sigma) (DESIGN.md). The Monte
Carlo estimate uses the same images y_i for both means, c_hat = mean_i (D_i - y_i): the known
E[n] = 0 is not re-estimated (a control variate; the paper's plain mean of eps adds mean(n)).

A CalibrationTable keeps, per class group g and grid sigma k, float64 sums of D, of y and of
(D - y)^2 (the paired residual, which the standard error needs) and counts, so estimates over any
partition of the data merge by addition. Noise for image i at grid point k depends only on
(seed, chunk of i, k): tables estimated over any grouping of chunks, in any order, agree to
float64 summation order. Guarantee (tested): relative difference <= 1e-12 of the offset scale.
"""
import hashlib
import json
import math
import warnings

import numpy as np
import torch

from tasks import data as data_mod
from tasks.files import atomic_write
from tasks import samplers as samplers_mod

TABLE_FORMAT = 'calibration-table/1'
SOURCES = ('data', 'generated')
SIGMA_RTOL = 1e-9  # a queried sigma matches a grid sigma within this relative tolerance


class CalibrationError(ValueError):
    """A calibration table does not fit the model, data or sampler it is used with."""


def check_sigmas(sigmas, name='sigmas', scalar_ok=False):
    """Noise levels as a 1-D float64 CPU tensor. Accepted: a non-empty 1-D list / tensor / array
    of positive finite numbers, or one number where a single sigma is taken (scalar_ok). Zero,
    negative, NaN, inf, empty or 2-D: ValueError naming the argument."""
    expected = f'{name}: expected {"a positive finite number or " if scalar_ok else ""}a non-empty 1-D sequence of positive finite numbers'
    try:
        s = torch.as_tensor(sigmas, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f'{expected}, got {type(sigmas).__name__}') from None
    if s.ndim > 1 or s.ndim == 0 and not scalar_ok or s.numel() == 0:
        raise ValueError(f'{expected}, got shape {list(s.shape)}')
    s = s.flatten().cpu()
    bad = ~(torch.isfinite(s) & (s > 0))
    if bad.any():
        raise ValueError(f'{expected}, got {float(s[bad][0]):g}')
    return s


def _image_shape(net):
    """(C, R, R) of the images the net denoises, or None when it does not say."""
    if hasattr(net, 'img_channels') and hasattr(net, 'img_resolution'):
        return (net.img_channels, net.img_resolution, net.img_resolution)
    return None


def fingerprint(net):
    """sha256 identifying a denoiser: its class and parameters/buffers (or an oracle's data)."""
    h = hashlib.sha256(type(net).__name__.encode())
    if hasattr(net, 'fingerprint'):
        h.update(net.fingerprint().encode())
    elif isinstance(net, torch.nn.Module):
        for name, t in sorted(net.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
    else:
        raise TypeError(f'cannot fingerprint {type(net).__name__}: give it a fingerprint() method')
    return h.hexdigest()


class CalibrationTable:
    """Sums for c(sigma) on a sigma grid, per class (num_classes > 0) or pooled (num_classes = 0).

    sigmas: 1-D float64, strictly increasing. shape: image shape (C, H, W) or (d,).
    meta: what the table was estimated for: model, dataset, seed, chunk_size, noise_draws,
    flips, source ('data' or 'generated'), ... (saved with the table and checked on use).
    """

    def __init__(self, sigmas, shape, num_classes=0, meta=None):
        sigmas = check_sigmas(sigmas, scalar_ok=True)
        if not torch.all(sigmas[1:] > sigmas[:-1]):
            raise ValueError(f'sigmas: expected a strictly increasing grid (sorted, no repeats), got {sigmas.tolist()[:8]}')
        self.sigmas, self.shape, self.num_classes = sigmas, tuple(shape), int(num_classes)
        G, K = max(self.num_classes, 1), len(sigmas)
        self.sum_D = torch.zeros(G, K, *self.shape, dtype=torch.float64)
        self.sum_y = torch.zeros_like(self.sum_D)
        self.sum_r2 = torch.zeros_like(self.sum_D)
        self.count = torch.zeros(G, K, dtype=torch.int64)
        self.meta = dict(meta or {})
        self.chunks = set()

    # -- accumulation --------------------------------------------------------------------------

    def add(self, k, D, y, labels=None):
        """Add a batch evaluated at grid point k: denoised D and clean y, [B, *shape]. labels (used
        by a per-class table only): B class indices in [0, num_classes) or a [B, num_classes]
        one-hot tensor (samplers.check_class_labels)."""
        if self.num_classes:
            if labels is None:
                raise ValueError(f'labels: a per-class table ({self.num_classes} classes) needs the batch\'s labels')
            labels = samplers_mod.check_class_labels(labels, len(D), self.num_classes, one_hot=False, name='labels')
        self._add(k, D, y, labels)

    def _add(self, k, D, y, labels=None):
        """add() without the label check (estimate_table checks its labels once)."""
        D, y = D.detach().to('cpu', torch.float64), y.detach().to('cpu', torch.float64)
        g = torch.zeros(D.shape[0], dtype=torch.long) if self.num_classes == 0 else torch.as_tensor(labels).long().cpu()
        self.sum_D[:, k].index_add_(0, g, D)
        self.sum_y[:, k].index_add_(0, g, y)
        self.sum_r2[:, k].index_add_(0, g, (D - y) ** 2)
        self.count[:, k].index_add_(0, g, torch.ones_like(g))

    def check_finite(self, what):
        """CalibrationError when a kept float64 sum is not finite (a D of 1e300 squares to inf)."""
        for name in ('sum_D', 'sum_y', 'sum_r2'):
            bad = ~torch.isfinite(getattr(self, name))
            if bad.any():
                k = int(bad.flatten(2).any(2).any(0).nonzero()[0])
                raise CalibrationError(f'{what}: the sums of the table overflow at sigma {float(self.sigmas[k]):g} '
                                       f'({name} is not finite); no table is made from them')
        return self

    def merge(self, other):
        """A new table holding the sums of both; refuses overlapping chunks and other setups."""
        self.check_compatible(other.meta, 'merge')
        if not torch.equal(self.sigmas, other.sigmas) or self.shape != other.shape or self.num_classes != other.num_classes:
            raise CalibrationError('cannot merge tables with different sigma grids, image shapes or class counts')
        overlap = self.chunks & other.chunks
        if overlap:
            raise CalibrationError(f'chunks {sorted(overlap)[:5]} are in both tables: they would be counted twice')
        out = CalibrationTable(self.sigmas, self.shape, self.num_classes, self.meta)
        for name in ('sum_D', 'sum_y', 'sum_r2', 'count'):
            setattr(out, name, getattr(self, name) + getattr(other, name))
        out.chunks = self.chunks | other.chunks
        out.meta['image_count'] = self.meta.get('image_count', 0) + other.meta.get('image_count', 0)
        return out.check_finite('merge')

    # -- estimates -----------------------------------------------------------------------------

    def _pooled(self, per_class):
        if per_class or self.num_classes == 0:
            return self.sum_D, self.sum_y, self.sum_r2, self.count
        return (self.sum_D.sum(0, keepdim=True), self.sum_y.sum(0, keepdim=True),
                self.sum_r2.sum(0, keepdim=True), self.count.sum(0, keepdim=True))

    def offset(self, per_class=False):
        """c_hat(sigma) = mean D - mean y, [G, K, *shape] (G = 1 unless per_class); NaN (0/0) where a
        grid sigma or class holds no image, which lookup and dsm_gap refuse to use (check_counts)."""
        sum_D, sum_y, _, n = self._pooled(per_class)
        n = n.to(torch.float64).reshape(*n.shape, *[1] * len(self.shape))
        return (sum_D - sum_y) / n

    def check_counts(self, k=None, per_class=False):
        """CalibrationError when grid point(s) k (all by default) hold no image: their term is 0/0."""
        n = self.count if per_class else self.count.sum(0, keepdim=True)  # the counts alone: a lookup's hot path
        empty, sigmas = (n == 0).any(0), self.sigmas
        if k is not None:
            k = torch.as_tensor(k).reshape(-1)
            empty, sigmas = empty[k], sigmas[k]
        if empty.any():
            raise CalibrationError(f'the table holds no image at sigma {float(sigmas[empty][0]):g}'
                                   + (' for some class' if per_class and self.num_classes else '')
                                   + f' (of {self.meta.get("image_count", 0)} images in all): its term would be 0/0')

    def standard_error(self, per_class=False):
        """Monte Carlo standard error of c_hat per pixel: std(D - y) / sqrt(n)."""
        sum_D, sum_y, sum_r2, n = self._pooled(per_class)
        n = n.to(torch.float64).reshape(*n.shape, *[1] * len(self.shape))
        mean_r = (sum_D - sum_y) / n
        var = ((sum_r2 / n - mean_r ** 2) * n / (n - 1)).clamp(min=0)
        return (var / n).sqrt()

    def mean_eps(self, per_class=False):
        """E_{q_sigma}[eps] = -c(sigma) / sigma, the term Calib Eq. 8 subtracts."""
        return -self.offset(per_class) / self.sigmas.reshape(1, -1, *[1] * len(self.shape))

    # -- lookup --------------------------------------------------------------------------------

    def index_of(self, sigma, context=''):
        """Grid indices of the given sigmas (exact match within SIGMA_RTOL), or a CalibrationError
        naming the sigma, the nearest grid point and who asked. sigma: one positive finite number or
        a 1-D sequence of them (check_sigmas)."""
        s = check_sigmas(sigma, 'sigma', scalar_ok=True)
        idx = torch.searchsorted(self.sigmas, s).clamp(0, len(self.sigmas) - 1)
        lower = (idx - 1).clamp(min=0)
        idx = torch.where((self.sigmas[lower] - s).abs() < (self.sigmas[idx] - s).abs(), lower, idx)
        bad = (self.sigmas[idx] - s).abs() > SIGMA_RTOL * s
        if bad.any():
            j = int(bad.nonzero()[0])
            who = f' (asked by {context})' if context else ''
            raise CalibrationError(f'sigma {float(s[j]):.10g}{who} is not on the calibration grid '
                                   f'(nearest {float(self.sigmas[idx[j]]):.10g}; grid of {len(self.sigmas)} sigmas in '
                                   f'[{float(self.sigmas[0]):.4g}, {float(self.sigmas[-1]):.4g}]); estimate the table on '
                                   f'the sigmas this sampler queries (queried_sigmas) or allow log-sigma interpolation')
        return idx

    def lookup(self, sigma, class_labels=None, interpolate=False, context=''):
        """c(sigma) for a scalar or per-image sigma [B] (check_sigmas): [B or 1, *shape] float64.
        Per-class offsets when the table has classes and class_labels are given (B class indices
        in [0, num_classes) or a [B, num_classes] one-hot tensor: samplers.check_class_labels,
        B = the number of sigmas unless one); pooled otherwise (class_labels then unused)."""
        per_class = self.num_classes > 0 and class_labels is not None
        s = check_sigmas(sigma, 'sigma', scalar_ok=True)
        if per_class:  # checked on the CPU: one transfer, as the lookup always made
            labels = class_labels.cpu() if isinstance(class_labels, torch.Tensor) else class_labels
            g = samplers_mod.check_class_labels(labels, None if len(s) == 1 else len(s), self.num_classes, one_hot=False)
        c = self.offset(per_class)  # [G, K, *shape]
        if interpolate:
            ls, grid = s.log(), self.sigmas.log()
            if (ls < grid[0] - 1e-12).any() or (ls > grid[-1] + 1e-12).any():
                raise CalibrationError(f'sigma {s.tolist()} outside the calibration grid [{float(self.sigmas[0]):.4g}, '
                                       f'{float(self.sigmas[-1]):.4g}]{" (asked by " + context + ")" if context else ""}; '
                                       f'interpolation does not extrapolate')
            hi = torch.searchsorted(grid, ls).clamp(1, len(grid) - 1)
            w = ((ls - grid[hi - 1]) / (grid[hi] - grid[hi - 1])).reshape(1, -1, *[1] * len(self.shape))
            values = c[:, hi - 1] * (1 - w) + c[:, hi] * w
            self.check_counts(torch.cat([hi - 1, hi]), per_class)
        else:
            k = self.index_of(s, context)
            self.check_counts(k, per_class)
            values = c[:, k]
        if per_class:
            return values[g, torch.arange(len(g)) if values.shape[1] > 1 else torch.zeros_like(g)]
        return values[0]

    # -- identity and files --------------------------------------------------------------------

    def check_compatible(self, expected, what='use'):
        """Refuse use with another model, dataset, image shape or setup: names the field."""
        for key in ('model', 'dataset', 'shape', 'source'):
            if key in expected and key in self.meta and expected[key] != self.meta[key]:
                raise CalibrationError(f'calibration table field {key!r} differs ({what}): table has '
                                       f'{self.meta[key]!r}, expected {expected[key]!r}')

    def state(self):
        return dict(format=TABLE_FORMAT, sigmas=self.sigmas, shape=list(self.shape), num_classes=self.num_classes,
                    sum_D=self.sum_D, sum_y=self.sum_y, sum_r2=self.sum_r2, count=self.count,
                    chunks=sorted(self.chunks), meta=json.dumps(self.meta, sort_keys=True))

    def save(self, path):
        atomic_write(path, lambda tmp: torch.save(self.state(), tmp))

    @classmethod
    def load(cls, path):
        try:
            s = torch.load(path, map_location='cpu', weights_only=True)
        except FileNotFoundError:
            raise CalibrationError(f'{path}: no such calibration table') from None
        except Exception as e:
            raise CalibrationError(f'{path}: not a readable calibration table ({type(e).__name__}: {e})') from None
        if not isinstance(s, dict) or s.get('format') != TABLE_FORMAT:
            raise CalibrationError(f'{path}: not a calibration table (format {s.get("format") if isinstance(s, dict) else type(s).__name__!r}, '
                                   f'expected {TABLE_FORMAT!r})')
        return cls.from_state(s, origin=path)

    @classmethod
    def from_state(cls, s, origin='table state'):
        """Inverse of state() (used by load and by Ray actors returning partial tables)."""
        t = cls(s['sigmas'], s['shape'], s['num_classes'], json.loads(s['meta']))
        for name in ('sum_D', 'sum_y', 'sum_r2', 'count'):
            if tuple(s[name].shape) != tuple(getattr(t, name).shape):
                raise CalibrationError(f'{origin}: {name} has shape {tuple(s[name].shape)}, expected {tuple(getattr(t, name).shape)}')
            if not torch.isfinite(s[name]).all():  # a table that would subtract NaN from every denoised image
                raise CalibrationError(f'{origin}: {name} holds NaN or infinite values; not a usable calibration table')
            setattr(t, name, s[name])
        t.chunks = set(s['chunks'])
        return t


# ---------------------------------------------------------------------------------------------
# Estimation.

def chunk_noise(seed, chunk_index, k, num_images, draws, shape):
    """Noise for the images of one chunk at grid point k, [num_images, draws, *shape]: a function
    of (seed, chunk_index, k) only (counter-based seeding via numpy's SeedSequence)."""
    state = np.random.SeedSequence([int(seed), int(chunk_index), int(k)]).generate_state(2, np.uint64)
    g = torch.Generator().manual_seed(int(state[0] % (1 << 63)))
    return torch.randn(num_images, draws, *shape, generator=g)


def estimate_table(net, images, sigmas, labels=None, num_classes=0, chunk_size=1000, chunk_indices=None,
                   seed=0, noise_draws=1, flips=False, batch_size=256, device='cpu', meta=None, progress=False, on_step=None):
    """A CalibrationTable over the given chunks of `images` (uint8 [N, C, H, W], or float in
    model range). Each image contributes noise_draws noisy copies per sigma (x2 with flips: the
    mirrored image too). batch_size only splits the work: the table does not depend on it.
    A conditional net (label_dim > 0) sees each image's own label, one-hot; the table keeps
    per-class sums only when num_classes > 0 (Calib Sec. 3.2), else the pooled term.
    progress shows a tqdm bar; on_step(images) is called after each (chunk, sigma).
    images: samplers.check_images (float: |x| <= 5, the net's (C, R, R) when it says); sigmas:
    check_sigmas; labels: N class indices or an [N, C] one-hot tensor (samplers.check_class_labels,
    C = the net's label_dim or num_classes; checked but unused for a pooled unconditional table)."""
    net_classes = getattr(net, 'label_dim', 0)
    if net_classes and num_classes and num_classes != net_classes:
        raise ValueError(f'num_classes: expected the model\'s {net_classes} classes (label_dim) or 0 (pooled), got {num_classes}')
    label_dim = net_classes or num_classes
    if label_dim and labels is None:
        raise ValueError(f'the model is conditional ({label_dim} classes): calibration needs the images\' labels')
    images = samplers_mod.check_images(images, shape=_image_shape(net))
    sigmas = check_sigmas(sigmas, scalar_ok=True)
    lo, hi = getattr(net, 'sigma_min', 0), getattr(net, 'sigma_max', math.inf)
    outside = (sigmas < lo * (1 - 1e-9)) | (sigmas > hi * (1 + 1e-9))  # (a grid's rounding is not "outside")
    if outside.any():
        raise ValueError(f'sigmas: {float(sigmas[outside][0]):g} lies outside the model\'s [{lo:g}, {hi:g}], where it was '
                         'never trained (no sampler asks for it there)')
    labels = samplers_mod.check_class_labels(labels, len(images), label_dim or None, one_hot=False, name='labels')
    images_f = data_mod.as_model_range(images)
    shape = tuple(images_f.shape[1:])
    chunks = data_mod.partition(len(images_f), chunk_size)
    chunk_indices = range(len(chunks)) if chunk_indices is None else chunk_indices
    table = CalibrationTable(sigmas, shape, num_classes, dict(meta or {}, chunk_size=chunk_size, seed=seed,
                                                               noise_draws=noise_draws, flips=flips, shape=list(shape)))
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(chunk_indices) * len(table.sigmas), unit='sigma-chunk', desc='calibrate')
    count = 0
    for c in chunk_indices:
        rows = chunks[c]
        y = images_f[rows.start:rows.stop]
        lab = None if labels is None else labels[rows.start:rows.stop]
        if flips:
            y, lab = torch.cat([y, y.flip(-1)]), None if lab is None else torch.cat([lab, lab])
        y = y.repeat_interleave(noise_draws, 0)
        lab = None if lab is None else lab.repeat_interleave(noise_draws, 0)
        onehot = None if lab is None or not label_dim else torch.eye(label_dim)[lab]
        for k, sigma in enumerate(table.sigmas.tolist()):
            n = chunk_noise(seed, c, k, len(rows), noise_draws * (2 if flips else 1), shape)
            # Row order of n: image-major within each flip half, matching y's layout.
            n = n.reshape(len(rows), 2 if flips else 1, noise_draws, *shape).transpose(0, 1).reshape(-1, *shape)
            for b in range(0, len(y), batch_size):
                yb = y[b:b + batch_size].to(device)
                xb = yb + sigma * n[b:b + batch_size].to(device)
                lb = None if onehot is None else onehot[b:b + batch_size].to(device)
                with torch.no_grad():
                    D = net(xb, torch.full((len(xb),), sigma, dtype=torch.float64, device=device), lb)
                if not torch.isfinite(D).all():  # a NaN would poison every mean of this sigma
                    raise CalibrationError(f'the denoiser returned non-finite values at sigma {sigma:g} for images '
                                           f'{rows.start}..{rows.stop - 1} (chunk {c}); no table is made from them')
                table._add(k, D, yb, None if lab is None else lab[b:b + batch_size])
            if bar is not None:
                bar.update(1)
            if on_step is not None:
                on_step(len(rows))
        table.chunks.add(c)
        count += len(rows)
    if bar is not None:
        bar.close()
    table.meta['image_count'] = count
    return table.check_finite('estimate_table')


def generated_dataset(net, num_images, sampler='edm', seeds=None, batch_size=64, device='cpu', **sampler_kwargs):
    """num_images samples of `net` as a uint8 ImageDataset (quantized as saved images), for
    calibration on generated data (Calib Table 4, right). Seeds default to 0..N-1. A conditional
    net's samples carry the class each seed drew (samplers.generate). seeds: num_images of them
    (samplers.check_seeds)."""
    seeds = list(range(num_images)) if seeds is None else samplers_mod.check_seeds(seeds)
    if len(seeds) != num_images:
        raise ValueError(f'seeds: expected num_images = {num_images} seeds, got {len(seeds)}')
    images, _, labels = samplers_mod.generate(net, seeds, sampler, batch_size=batch_size, device=device,
                                              return_labels=True, **sampler_kwargs)
    label_dim = getattr(net, 'label_dim', 0)
    labels = torch.zeros(len(seeds), dtype=torch.long) if labels is None else labels.argmax(1)
    return data_mod.ImageDataset(data_mod.to_uint8(images), labels, f'generated:{sampler}', max(label_dim, 1))


# ---------------------------------------------------------------------------------------------
# Using the term.

class CalibratedDenoiser:
    """D_cal(x; sigma) = D(x; sigma) - c(sigma), c from a CalibrationTable (exact grid lookup;
    log-sigma interpolation only when `interpolate`) or from an OffsetNet (dynamic recording).
    With a per-class table and class labels, c is the class's own term (Calib Sec. 3.2) unless
    per_class=False, which subtracts the pooled term."""

    def __init__(self, net, calibration, interpolate=False, context='', per_class=True):
        self.net, self.calibration, self.interpolate, self.context = net, calibration, interpolate, context
        self.per_class = per_class
        if per_class and isinstance(calibration, CalibrationTable) and calibration.num_classes:
            # A class with no image in the estimate has no term (0/0): refused, never a NaN image.
            empty = (calibration.count.sum(1) == 0).nonzero().flatten().tolist()
            if empty:
                raise CalibrationError(f'{context + ": " if context else ""}per-class calibration: class(es) '
                                       f'{", ".join(map(str, empty))} have no image in the table\'s '
                                       f'{calibration.meta.get("image_count", "?")} images; estimate on more images or subtract '
                                       'the pooled term (per_class=False)')
        self.sigma_min, self.sigma_max = net.sigma_min, net.sigma_max
        for attr in ('img_channels', 'img_resolution', 'label_dim'):
            if hasattr(net, attr):
                setattr(self, attr, getattr(net, attr))

    def round_sigma(self, sigma):
        return self.net.round_sigma(sigma)

    def offset(self, sigma, class_labels=None):
        """c(sigma): sigma one number or [B]; class_labels B class indices or a [B, C] one-hot
        tensor (CalibrationTable.lookup; an OffsetNet with classes gets them as one-hot)."""
        class_labels = class_labels if self.per_class else None
        if isinstance(self.calibration, CalibrationTable):
            return self.calibration.lookup(sigma, class_labels, self.interpolate, self.context)
        if getattr(self.calibration, 'num_classes', 0):
            class_labels = samplers_mod.check_class_labels(class_labels, None, self.calibration.num_classes)
        return self.calibration.offset(sigma, class_labels)

    def __call__(self, x, sigma, class_labels=None):
        D = self.net(x, sigma, class_labels)
        return D - self.offset(sigma, class_labels).to(D.device, D.dtype)


def calibration_term(c, sigma, prediction, alpha=1.0):
    """The term a model of each parametrization subtracts (Calib Eq. 26), from c(sigma) in EDM
    space, for a VP model with x_t = alpha (y + sigma n), std_t = alpha sigma:
    noise E[eps] = -c / sigma; data E[x0_hat] - E[x0] = c; score E[s] = c / (sigma^2 alpha);
    velocity E[v_hat - v] = -c / std_t (alpha^2 + std^2 = 1)."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    if prediction == 'noise':
        return -c / sigma
    if prediction == 'data':
        return c
    if prediction == 'score':
        return c / (sigma ** 2 * alpha)
    if prediction == 'v':
        return -c / (sigma * alpha)
    raise ValueError(f'unknown prediction {prediction!r}; valid: noise, data, v, score')


def dsm_gap(table):
    """Calib Eq. 27: the reduction of the per-sigma DSM objective by calibration,
    ||E eps||^2 = ||c||^2 / sigma^2 in noise space (and ||c||^2 in the denoiser's D space), [K],
    with the Monte Carlo standard error of each (`noise_se`, `data_se`) by the delta method:
    se(||c||^2) = 2 sqrt(sum_i c_i^2 se(c_i)^2), and `noise_floor`: what the estimate of
    ||E eps||^2 averages to when E eps = 0, sum_i se(c_i)^2 / sigma^2 (its upward bias)."""
    table.check_counts()
    c, se = table.offset()[0].flatten(1), table.standard_error()[0].flatten(1)
    c2, c2_se = c.square().sum(1), 2 * (c.square() * se.square()).sum(1).sqrt()
    # Overflow is refused; the SE of one image is NaN (unknown), which is what it says.
    bad = ~torch.isfinite(c2 / table.sigmas ** 2) | torch.isinf(c2_se / table.sigmas ** 2)
    if bad.any():
        raise CalibrationError(f'||E eps||^2 or its standard error is not finite at sigma {float(table.sigmas[bad][0]):g} '
                               '(the offsets overflow when squared): no row is made of it')
    return dict(noise=c2 / table.sigmas ** 2, data=c2, noise_se=c2_se / table.sigmas ** 2, data_se=c2_se,
                noise_floor=se.square().sum(1) / table.sigmas ** 2)


def likelihood_terms(table, noise_schedule):
    """Calib Figure 1 for a VP noise schedule: per grid sigma (t = t(sigma)), 0.5 ||E eps||^2
    and g(t)^2 / (2 std_t^2) ||E eps||^2 with g(t)^2 = beta(t) = -2 d log alpha_t / dt."""
    t = noise_schedule.t_of_sigma(table.sigmas)
    h = 1e-6
    beta = -(noise_schedule.log_alpha(t + h) - noise_schedule.log_alpha(t - h)) / h
    e2 = dsm_gap(table)['noise']
    return dict(t=t, sigma=table.sigmas, half_sq=0.5 * e2, weighted=beta / (2 * noise_schedule.std(t) ** 2) * e2)


def likelihood_gain(table):
    """Calib Eq. 11: the gain of the likelihood lower bound by calibration, in nats per image: the
    integral over t of g(t)^2 / (2 std_t^2) ||E eps||^2. With sigma = std/alpha as the time
    variable this is the integral of ||E eps||^2 d ln sigma for every schedule (VP:
    beta dt / (2 (1 - alpha^2)) = d ln sigma; VE and EDM: d sigma^2 / (2 sigma^2) = d ln sigma), taken by
    the trapezoid rule in ln sigma over the table's grid (a dense grid gives the integral; a
    sampler's grid of a few points, a rough value).
    Returns nats, se (delta method per sigma, combined as if the sigmas' errors were independent:
    they share the images, so this understates it when they are positively correlated),
    noise_floor (what the estimate averages to when E eps = 0: dsm_gap's noise_floor integrated the
    same way; a gain not well above it is not resolved), grid_points."""
    order = torch.argsort(table.sigmas)
    ln_sigma = table.sigmas[order].log()
    gaps = ln_sigma.diff()
    weights = torch.zeros_like(ln_sigma)  # trapezoid weights: sum_k w_k f_k = trapezoid(f, ln sigma)
    weights[:-1] += gaps / 2
    weights[1:] += gaps / 2
    gap = dsm_gap(table)
    nats = float((weights * gap['noise'][order]).sum())
    se = float((weights.square() * gap['noise_se'][order].square()).sum().sqrt())
    if not math.isfinite(nats) or math.isinf(se):
        raise CalibrationError(f'the likelihood gain ({nats:g} +- {se:g} nats) is not finite: the terms overflow when '
                               'integrated')
    return dict(nats=nats,
                se=se,
                noise_floor=float((weights * gap['noise_floor'][order]).sum()), grid_points=len(ln_sigma))


def queried_sigmas(sampler, net, **sampler_kwargs):
    """The sigmas `sampler` evaluates the denoiser at with these settings (Heun's second
    evaluations, DPM-Solver's intermediate points and stochastic sigma-hats included), found by
    running the sampler's own code on a recording stand-in for `net`. Sorted float64."""

    class Recorder:
        sigma_min, sigma_max = net.sigma_min, net.sigma_max
        round_sigma = staticmethod(net.round_sigma)
        sigmas = []

        def __call__(self, x, sigma, class_labels=None):
            self.sigmas.append(float(torch.as_tensor(sigma, dtype=torch.float64).flatten()[0]))
            return torch.zeros_like(x)

    rec = Recorder()
    with warnings.catch_warnings():  # a recording, not a run: whoever samples says it
        warnings.simplefilter('ignore', samplers_mod.SigmaRangeClamped)
        samplers_mod.get_sampler(sampler)(rec, torch.zeros(1, 1, dtype=torch.float64), **sampler_kwargs)
    return torch.tensor(sorted(set(rec.sigmas)), dtype=torch.float64)


def union_sigmas(*grids):
    """Union of sigma grids (each 1-D or one number, positive and finite: check_sigmas), sorted,
    with values equal within SIGMA_RTOL merged."""
    if not grids:
        raise ValueError('sigmas: union_sigmas needs at least one sigma grid')
    s = torch.sort(torch.cat([check_sigmas(g, f'sigmas (grid {i})', scalar_ok=True) for i, g in enumerate(grids)])).values
    keep = torch.ones(len(s), dtype=torch.bool)
    keep[1:] = (s[1:] - s[:-1]) > SIGMA_RTOL * s[1:]
    return s[keep]


# ---------------------------------------------------------------------------------------------
# Dynamic recording (Calib Sec. 3.5): a small network h_phi(sigma) that tracks c(sigma).

class OffsetNet(torch.nn.Module):
    """h_phi(sigma, class) -> c(sigma) [*shape]: sinusoidal features of log sigma, two SiLU
    layers, optional class embedding. Trained by regression on D - y (whose mean is c)."""

    def __init__(self, shape, num_classes=0, hidden=256, features=32):
        super().__init__()
        self.shape, self.num_classes, self.features = tuple(shape), num_classes, features
        d = int(np.prod(shape))
        self.mlp = torch.nn.Sequential(torch.nn.Linear(2 * features, hidden), torch.nn.SiLU(),
                                       torch.nn.Linear(hidden, hidden), torch.nn.SiLU(), torch.nn.Linear(hidden, d))
        self.label = torch.nn.Linear(num_classes, 2 * features, bias=False) if num_classes else None
        torch.nn.init.zeros_(self.mlp[-1].weight)
        torch.nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, sigma, class_labels=None):
        log_sigma = torch.as_tensor(sigma, dtype=torch.float32, device=self.mlp[0].weight.device).reshape(-1, 1).log()
        freqs = 2.0 ** torch.arange(self.features, device=log_sigma.device) / 64
        emb = torch.cat([(log_sigma * freqs).sin(), (log_sigma * freqs).cos()], 1)
        if self.label is not None and class_labels is not None:
            emb = emb + self.label(class_labels.to(emb.dtype))
        return self.mlp(emb).reshape(-1, *self.shape)

    def offset(self, sigma, class_labels=None):
        with torch.no_grad():
            return self(sigma, class_labels).to(torch.float64)


class DynamicRecorder:
    """Trains an OffsetNet from (sigma, D(x; sigma), y) triples, alongside the model's training
    (tasks.train feeds each batch) or post hoc on a frozen model (fit_offset_net)."""

    def __init__(self, offset_net, lr=1e-3):
        self.h = offset_net
        self.optimizer = torch.optim.Adam(offset_net.parameters(), lr=lr)

    def update(self, sigma, D, y, class_labels=None):
        """One Adam step on the batch's regression loss, returned as a float. A loss that is not
        finite (D - y after its float32 cast: a float64 D of 1e300 is inf there) is returned
        without a step, so h_phi never takes NaN weights: the caller stops (fit_offset_net here,
        the training loss's own check in tasks.train)."""
        target = (D.detach() - y.detach()).to(torch.float32)
        loss = (self.h(sigma.flatten(), class_labels) - target).square().mean()
        value = float(loss.detach())
        if math.isfinite(value):
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        return value


def offset_mse(offset_net, table):
    """Mean square error of h_phi against the table's c(sigma), over grid sigmas and pixels."""
    return float((offset_net.offset(table.sigmas) - table.offset()[0]).square().mean())


def fit_offset_net(net, images, steps=500, batch_size=128, lr=1e-3, P_mean=-1.2, P_std=1.2, seed=0, device='cpu',
                   offset_net=None):
    """Post-hoc dynamic recording on a frozen denoiser: sigma ~ logN(P_mean, P_std^2) (EDM's
    training distribution), y from `images` (uint8 or model range: samplers.check_images)."""
    images_f = data_mod.as_model_range(samplers_mod.check_images(images, shape=_image_shape(net)))
    h = offset_net or OffsetNet(images_f.shape[1:])
    recorder = DynamicRecorder(h.to(device), lr)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        idx = torch.randint(len(images_f), (batch_size,), generator=g)
        y = images_f[idx].to(device)
        sigma = (torch.randn(batch_size, generator=g) * P_std + P_mean).exp().to(device)
        x = y + sigma.reshape(-1, *[1] * (y.ndim - 1)) * torch.randn(y.shape, generator=g).to(device)
        with torch.no_grad():
            D = net(x, sigma)
        if not math.isfinite(recorder.update(sigma, D, y)):
            raise CalibrationError(f'fit_offset_net: D(x; sigma) - y is not finite for a batch with sigma in '
                                   f'[{float(sigma.min()):g}, {float(sigma.max()):g}] (step {step}); no h_phi is made of it')
    return h


# ---------------------------------------------------------------------------------------------
# Calib Figure 3: the normalized mean image E[eps] per sigma and its top-10% pixels.

def save_mean_eps_figure(table, path, num_sigmas=6):
    """PNG: for num_sigmas grid sigmas, the normalized E[eps] image (min-max per image) and the
    mask of its top-10% pixels by |E[eps]| (Calib Fig. 3)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    e = table.mean_eps()[0]  # [K, *shape]
    ks = np.unique(np.linspace(0, len(table.sigmas) - 1, num_sigmas).round().astype(int))
    fig, axes = plt.subplots(2, len(ks), figsize=(1.8 * len(ks), 4), squeeze=False)
    for col, k in enumerate(ks):
        img = e[k].reshape(-1, *e.shape[-2:]) if e.ndim == 4 else e[k].reshape(1, 1, -1)
        img = img.permute(1, 2, 0).numpy()
        norm = (img - img.min()) / max(img.max() - img.min(), 1e-30)
        mag = np.abs(img).sum(-1)
        mask = mag >= np.quantile(mag, 0.9)
        axes[0, col].imshow(norm.squeeze(-1) if norm.shape[-1] == 1 else norm, cmap='gray')
        axes[0, col].set_title(f'sigma={float(table.sigmas[k]):.3g}\n||E eps||^2={float((e[k] ** 2).sum()):.3g}', fontsize=7)
        axes[1, col].imshow(mask, cmap='gray')
        for ax in axes[:, col]:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0, 0].set_ylabel('E[eps], normalized', fontsize=7)
    axes[1, 0].set_ylabel('top 10% |E[eps]|', fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
