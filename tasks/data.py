"""Datasets as uint8 image tensors [N, C, R, R] plus integer labels, and deterministic partitions.

Loaders read local files only (nothing is ever downloaded) and fail with a DataError that says
which file or directory, what was wrong and how to get the data. Images stay uint8 after any
resizing (as EDM's dataset_tool stores them); `to_model_range` maps them to [-1, 1] for training.
"""
import gzip
import hashlib
import os
from dataclasses import dataclass

import numpy as np
import torch

from tasks.files import NUMPY_GLOBALS, AllowListUnpickler

FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'
FASHION_MNIST_HINT = ('install it with `apt-get install dataset-fashion-mnist` (Debian), which puts the idx files in '
                      f'{FASHION_MNIST_DIR}, or give the directory holding train-images-idx3-ubyte(.gz) etc.')
MNIST_HINT = 'give the directory holding the MNIST idx files (train-images-idx3-ubyte(.gz), t10k-images-idx3-ubyte(.gz), ...)'
CIFAR10_HINT = ('give the directory `cifar-10-batches-py` extracted from cifar-10-python.tar.gz '
                '(data_batch_1..5 and test_batch)')


class DataError(ValueError):
    """A dataset file or directory is missing, unreadable or malformed."""


@dataclass
class ImageDataset:
    images: torch.Tensor          # uint8 [N, C, R, R]
    labels: torch.Tensor          # int64 [N]
    name: str
    num_classes: int = 10

    def __len__(self):
        return self.images.shape[0]

    @property
    def resolution(self):
        return self.images.shape[-1]

    @property
    def channels(self):
        return self.images.shape[1]

    def content_hash(self):
        """sha256 of the pixels and labels: the dataset's identity for caches and plans."""
        h = hashlib.sha256()
        h.update(str(tuple(self.images.shape)).encode())
        h.update(self.images.contiguous().numpy().tobytes())
        h.update(self.labels.numpy().astype(np.int64).tobytes())
        return h.hexdigest()

    def subset(self, indices):
        indices = torch.as_tensor(indices, dtype=torch.long)
        return ImageDataset(self.images[indices], self.labels[indices], self.name, self.num_classes)


# ---------------------------------------------------------------------------------------------
# File formats.

def read_idx(path):
    """An IDX file (MNIST format), gzip-compressed or not, as a uint8 numpy array."""
    try:
        with open(path, 'rb') as f:
            raw = f.read()
        if raw[:2] == b'\x1f\x8b':
            raw = gzip.decompress(raw)
    except FileNotFoundError:
        raise DataError(f'{path}: file not found') from None
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f'{path}: cannot read or decompress ({e}); the file is corrupt or truncated') from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f'{path}: not an unsigned-byte IDX file (bad magic number {raw[:4].hex()})')
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], 'big') for i in range(ndim))
    expected = int(np.prod(dims)) if dims else 0
    if len(raw) - header != expected:
        raise DataError(f'{path}: truncated or corrupt IDX file: header says {dims} = {expected} bytes, '
                        f'found {len(raw) - header}')
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _find(root, stem):
    for name in (stem, stem + '.gz'):
        if os.path.isfile(os.path.join(root, name)):
            return os.path.join(root, name)
    return None


def _check_dir(root, what, hint):
    if not os.path.isdir(root):
        raise DataError(f'{what}: directory {root} does not exist; {hint}')


def load_idx_dataset(root, split, name, hint):
    """MNIST-format dataset: {train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz] in `root`."""
    _check_dir(root, name, hint)
    prefix = {'train': 'train', 'test': 't10k'}.get(split)
    if prefix is None:
        raise ValueError(f'unknown split {split!r}; valid: train, test')
    images_path = _find(root, f'{prefix}-images-idx3-ubyte')
    labels_path = _find(root, f'{prefix}-labels-idx1-ubyte')
    if images_path is None or labels_path is None:
        missing = f'{prefix}-images-idx3-ubyte[.gz]' if images_path is None else f'{prefix}-labels-idx1-ubyte[.gz]'
        raise DataError(f'{name}: {missing} not found in {root}; {hint}')
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(f'{name}: {images_path} holds {images.shape} and {labels_path} holds {labels.shape}; '
                        f'expected [N, H, W] images and N labels')
    return ImageDataset(torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)), name)


def load_fashion_mnist(root=None, split='train'):
    return load_idx_dataset(root or FASHION_MNIST_DIR, split, 'fashion-mnist', FASHION_MNIST_HINT)


def load_mnist(root, split='train'):
    return load_idx_dataset(root, split, 'mnist', MNIST_HINT)


def load_cifar10(root, split='train'):
    """CIFAR-10 from the standard python batches directory (cifar-10-batches-py)."""
    _check_dir(root, 'cifar10', CIFAR10_HINT)
    names = [f'data_batch_{i}' for i in range(1, 6)] if split == 'train' else ['test_batch'] if split == 'test' else None
    if names is None:
        raise ValueError(f'unknown split {split!r}; valid: train, test')
    images, labels = [], []
    for name in names:
        path = os.path.join(root, name)
        try:
            with open(path, 'rb') as f:
                batch = AllowListUnpickler(f, NUMPY_GLOBALS, 'CIFAR-10 python batches', encoding='bytes').load()
            data, batch_labels = batch[b'data'], batch[b'labels']
        except FileNotFoundError:
            raise DataError(f'cifar10: {path} not found; {CIFAR10_HINT}') from None
        except Exception as e:  # truncated pickles raise many different errors
            raise DataError(f'cifar10: {path}: cannot unpickle ({type(e).__name__}: {e}); the file is corrupt or truncated') from None
        images.append(np.asarray(data, dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.append(np.asarray(batch_labels, dtype=np.int64))
    return ImageDataset(torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels)), 'cifar10')


def load_cifar10_npz(path, split='train'):
    """The pixel-exact CIFAR-10 subset of ../shared/data (keys {split}_data [N, 3072] in the
    original R, G, B row layout, and {split}_labels)."""
    try:
        with np.load(path) as f:
            data, labels = f[f'{split}_data'], f[f'{split}_labels']
    except FileNotFoundError:
        raise DataError(f'cifar10-npz: {path} not found') from None
    except KeyError:
        raise DataError(f'cifar10-npz: {path} has no {split}_data / {split}_labels arrays') from None
    except Exception as e:
        raise DataError(f'cifar10-npz: {path}: cannot read ({type(e).__name__}: {e})') from None
    return ImageDataset(torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(labels.astype(np.int64)), 'cifar10')


def load_image_folder(root, extensions=('.png', '.jpg', '.jpeg', '.bmp')):
    """All images under `root` (sorted by path), which must share one size and mode; the label
    is the index of the image's first-level subfolder (0 for images directly in root)."""
    import PIL.Image
    _check_dir(root, 'image-folder', 'give a directory of images')
    paths = sorted(os.path.join(d, f) for d, _, files in os.walk(root) for f in files if f.lower().endswith(extensions))
    if not paths:
        raise DataError(f'image-folder: no {"/".join(extensions)} files under {root}')
    classes = sorted({os.path.relpath(p, root).split(os.sep)[0] for p in paths if os.sep in os.path.relpath(p, root)})
    images, labels = [], []
    for p in paths:
        try:
            img = np.asarray(PIL.Image.open(p))
        except Exception as e:
            raise DataError(f'image-folder: {p}: cannot decode ({e})') from None
        img = img[:, :, None] if img.ndim == 2 else img[:, :, :3]
        if images and img.shape != images[0].shape:
            raise DataError(f'image-folder: {p} is {img.shape}, but {paths[0]} is {images[0].shape}; all images must match')
        images.append(img)
        rel = os.path.relpath(p, root).split(os.sep)
        labels.append(classes.index(rel[0]) if len(rel) > 1 else 0)
    arr = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return ImageDataset(arr, torch.tensor(labels, dtype=torch.int64), 'image-folder', max(len(classes), 1))


# ---------------------------------------------------------------------------------------------
# Transforms.

def prepare(dataset, pad_to_32=False, resolution=None):
    """Optional zero-padding 28 -> 32 (2 px a side, as for MNIST-like data in 32x32 nets), then
    optional resizing to `resolution` (box filter when it divides the size, else antialiased
    bilinear), rounded back to uint8."""
    images = dataset.images
    if pad_to_32:
        if images.shape[-1] != 28:
            raise ValueError(f'pad_to_32 expects 28x28 images, got {images.shape[-1]}x{images.shape[-2]}')
        images = torch.nn.functional.pad(images, (2, 2, 2, 2))
    if resolution is not None and resolution != images.shape[-1]:
        x = images.to(torch.float32)
        size = images.shape[-1]
        if size % resolution == 0:
            x = torch.nn.functional.avg_pool2d(x, size // resolution)
        else:
            x = torch.nn.functional.interpolate(x, size=(resolution, resolution), mode='bilinear', antialias=True, align_corners=False)
        images = x.round().clamp(0, 255).to(torch.uint8)
    return ImageDataset(images, dataset.labels, dataset.name, dataset.num_classes)


def to_model_range(images):
    """uint8 [0, 255] -> float32 [-1, 1] (EDM: x / 127.5 - 1)."""
    return images.to(torch.float32) / 127.5 - 1


def as_model_range(images):
    """uint8 images to [-1, 1] float32; float images are taken to be in model range already."""
    return to_model_range(images) if images.dtype == torch.uint8 else images.to(torch.float32)


def to_uint8(images):
    """[-1, 1] -> uint8 as EDM's generate.py saves images: (x * 127.5 + 128).clip(0, 255)."""
    return (images * 127.5 + 128).clip(0, 255).to(torch.uint8)


def save_image_grid(images, path, nrow=None, upscale=1):
    """Save uint8 images [N, C, R, R] (C = 1 or 3) as one PNG grid with nrow images a row,
    each pixel repeated `upscale` times (small images are easier to look at)."""
    import PIL.Image
    n, c, r, _ = images.shape
    nrow = nrow or int(np.ceil(np.sqrt(n)))
    ncol = int(np.ceil(n / nrow))
    grid = torch.zeros(c, ncol * r, nrow * r, dtype=torch.uint8)
    for i in range(n):
        grid[:, (i // nrow) * r:(i // nrow + 1) * r, (i % nrow) * r:(i % nrow + 1) * r] = images[i]
    grid = grid.repeat_interleave(upscale, 1).repeat_interleave(upscale, 2)
    arr = grid.permute(1, 2, 0).numpy()
    PIL.Image.fromarray(arr[:, :, 0] if c == 1 else arr, 'L' if c == 1 else 'RGB').save(path)


def random_hflip(images, generator=None):
    """Mirror each image horizontally with probability 1/2."""
    flip = torch.rand(images.shape[0], generator=generator) < 0.5
    return torch.where(flip.reshape(-1, 1, 1, 1).to(images.device), images.flip(-1), images)


DATASETS = ('fashion-mnist', 'mnist', 'cifar10', 'cifar10-npz', 'image-folder')


def load_dataset(name, root=None, split='train', pad_to_32=False, resolution=None, limit=None):
    """A dataset by name, prepared (padding, resizing) and optionally cut to its first `limit`
    images."""
    if name == 'fashion-mnist':
        ds = load_fashion_mnist(root, split)
    elif name == 'mnist':
        ds = load_mnist(root or '', split)
    elif name == 'cifar10':
        ds = load_cifar10(root or '', split)
    elif name == 'cifar10-npz':
        ds = load_cifar10_npz(root or '', split)
    elif name == 'image-folder':
        ds = load_image_folder(root or '')
    else:
        raise ValueError(f'unknown dataset {name!r}; valid: {", ".join(DATASETS)}')
    if limit is not None:
        ds = ds.subset(range(min(limit, len(ds))))
    return prepare(ds, pad_to_32=pad_to_32, resolution=resolution)


# ---------------------------------------------------------------------------------------------
# 2-D toy mixtures: (weights, means, variances) for tasks.oracles.GaussianMixtureDenoiser.

def toy_mixture(name, std=0.05):
    """'ring8': 8 equal Gaussians on the unit circle; 'grid9': 3x3 grid on [-1, 1]^2 with
    unequal weights; 'two': two unequal Gaussians (useful for weight-recovery tests)."""
    if name == 'ring8':
        angles = torch.arange(8, dtype=torch.float64) * (2 * np.pi / 8)
        means = torch.stack([angles.cos(), angles.sin()], 1)
        weights = torch.full((8,), 1 / 8, dtype=torch.float64)
    elif name == 'grid9':
        g = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64)
        means = torch.cartesian_prod(g, g)
        weights = torch.arange(1, 10, dtype=torch.float64)
        weights = weights / weights.sum()
    elif name == 'two':
        means = torch.tensor([[-1.0, 0.0], [1.0, 0.5]], dtype=torch.float64)
        weights = torch.tensor([0.3, 0.7], dtype=torch.float64)
    else:
        raise ValueError(f'unknown toy mixture {name!r}; valid: ring8, grid9, two')
    return weights, means, torch.full((len(weights),), std ** 2, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------
# Deterministic partitions for sharding.

def partition(num_items, chunk_size):
    """Split range(num_items) into consecutive chunks of chunk_size (the last may be shorter).
    A chunk's identity is its index, so the same chunk always holds the same items however the
    chunks are later grouped over workers."""
    if chunk_size < 1:
        raise ValueError(f'chunk_size must be >= 1, got {chunk_size}')
    return [range(start, min(start + chunk_size, num_items)) for start in range(0, num_items, chunk_size)]


def assign_chunks(num_chunks, num_workers):
    """Round-robin assignment of chunk indices to workers: worker w gets w, w + W, w + 2W, ..."""
    if num_workers < 1:
        raise ValueError(f'num_workers must be >= 1, got {num_workers}')
    return [list(range(w, num_chunks, num_workers)) for w in range(num_workers)]
