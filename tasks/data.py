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


# ---------------------------------------------------------------------------------------------
# Images: one decoder (decode_image) for every image reader.

EDM_HINT = "prepare it with NVlabs/edm's dataset_tool.py (python dataset_tool.py --source=... --dest=...zip)"
SIXTEEN_BIT_MODES = ('I;16', 'I;16B', 'I;16L', 'I;16N', 'I')


def _one_line(e):
    return ' '.join(str(e).split())


def image_extensions():
    """The file extensions PIL can open (lower case, with the dot), as EDM's dataset_tool uses them."""
    import PIL.Image
    PIL.Image.init()
    return tuple(sorted(ext for ext, fmt in PIL.Image.registered_extensions().items() if fmt in PIL.Image.OPEN))


def decode_image(source, name):
    """The image in `source` (a path or a binary file object; `name` names it in errors)
    as uint8 [H, W, C] with C = 1 (L) or 3 (RGB), converted as image tools do:
    'L', 'RGB' as they are; 'P' and 'PA' -> the palette's RGB colours (never the indices);
    'LA' -> L and 'RGBA'/'RGBX' -> RGB (alpha dropped); '1' -> 0/255 L; 16-bit greyscale
    ('I;16*', and 'I' with values in 0..65535) -> round(v / 257); 'CMYK', 'YCbCr' -> RGB by PIL.
    Anything else ('F', 'I' outside 0..65535, ...) has no faithful 8-bit reading and is refused."""
    import PIL.Image
    try:
        with PIL.Image.open(source) as img:
            img.load()
            mode = img.mode
            if mode in ('L', 'RGB'):
                arr = np.asarray(img)
            elif mode in ('P', 'PA'):
                arr = np.asarray(img.convert('RGBA'))[:, :, :3]
            elif mode in ('LA', 'RGBA', 'RGBX'):
                arr = np.asarray(img)[:, :, :-1]
            elif mode in ('1', 'CMYK', 'YCbCr'):
                arr = np.asarray(img.convert('L' if mode == '1' else 'RGB'))
            elif mode in SIXTEEN_BIT_MODES:
                arr = np.asarray(img).astype(np.int64)
            else:
                arr = None
    except Exception as e:  # PIL raises many kinds of errors for unreadable files
        raise DataError(f'{name}: cannot decode ({type(e).__name__}: {_one_line(e)})') from None
    if arr is None:
        raise DataError(f'{name}: image mode {mode!r} has no faithful 8-bit reading; '
                        f'supported: L, RGB, P, PA, LA, RGBA, 1, 16-bit greyscale, CMYK, YCbCr')
    if mode in SIXTEEN_BIT_MODES:
        if arr.size and (arr.min() < 0 or arr.max() > 65535):
            raise DataError(f'{name}: image mode {mode!r} holds values {arr.min()}..{arr.max()}, '
                            f'outside the 16-bit range 0..65535; no faithful 8-bit reading')
        arr = np.clip(np.round(arr / 257), 0, 255)  # 65535 -> 255; 257 is odd, so there are no ties
    arr = arr.astype(np.uint8)
    return arr[:, :, None] if arr.ndim == 2 else arr


TRANSFORMS = ('center-crop',)


def center_crop(arr, resolution):
    """EDM dataset_tool's --transform=center-crop: the centred square of the shorter side, resized
    to resolution x resolution with PIL's Lanczos filter. arr: uint8 [H, W, C]."""
    import PIL.Image
    h, w = arr.shape[:2]
    crop = min(h, w)
    arr = arr[(h - crop) // 2:(h + crop) // 2, (w - crop) // 2:(w + crop) // 2]
    img = PIL.Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)
    out = np.asarray(img.resize((resolution, resolution), PIL.Image.LANCZOS))
    return out[:, :, None] if out.ndim == 2 else out


def _decode_all(what, sources, transform=None, resolution=None):
    """Decode every (name, path or file object) of `sources` into one uint8 [N, C, R, R] tensor.
    Images must be square (the networks take square images, and data.resolution only resizes
    square ones) and share one size (never silently reshaped), unless a transform is named
    (transform='center-crop' with a resolution: each image cropped and resized as EDM's
    dataset_tool does). If any image is colour, all become RGB (greyscale replicated to 3
    channels); else all stay 1-channel L."""
    if transform is not None and (transform not in TRANSFORMS or not resolution):
        raise DataError(f'{what}: transform {transform!r} needs one of {", ".join(TRANSFORMS)} and a resolution')
    arrays, first = [], None
    for name, source in sources:
        arr = decode_image(source, f'{what}: {name}')
        if transform == 'center-crop':
            arr = center_crop(arr, resolution)
        h, w = arr.shape[:2]
        if h != w:
            raise DataError(f'{what}: {name} is {w}x{h}, not square; the networks take square images '
                            f'(name a transform: data.transform: center-crop, with data.resolution)')
        if first is None:
            first = (name, w)
        elif w != first[1]:
            raise DataError(f'{what}: {name} is {w}x{w}, but {first[0]} is {first[1]}x{first[1]}; '
                            f'all images must match in size (or name a transform: data.transform: center-crop)')
        arrays.append(arr)
    if any(a.shape[2] == 3 for a in arrays):
        arrays = [np.repeat(a, 3, axis=2) if a.shape[2] == 1 else a for a in arrays]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def load_image_folder(root, extensions=None, transform=None, resolution=None):
    """All images under `root` (sorted by path; default: every extension PIL opens), decoded by
    decode_image into one size and channel count (_decode_all: transform); the label is the index
    of the image's first-level subfolder (sorted; 0 for images directly in root)."""
    _check_dir(root, 'image-folder', 'give a directory of images')
    extensions = tuple(extensions or image_extensions())
    paths = sorted(os.path.join(d, f) for d, _, files in os.walk(root) for f in files if f.lower().endswith(extensions))
    if not paths:
        raise DataError(f'image-folder: no image files ({" ".join(extensions)}) under {root}')
    rels = [os.path.relpath(p, root).split(os.sep) for p in paths]
    classes = sorted({rel[0] for rel in rels if len(rel) > 1})
    labels = [classes.index(rel[0]) if len(rel) > 1 else 0 for rel in rels]
    images = _decode_all('image-folder', ((p, p) for p in paths), transform, resolution)
    return ImageDataset(images, torch.tensor(labels, dtype=torch.int64), 'image-folder', max(len(classes), 1))


def _edm_labels(labels_json, names, where):
    """Integer labels for `names` from dataset.json's "labels" ([[name, label], ...] or null)."""
    if labels_json is None:
        return [0] * len(names), 1
    if not isinstance(labels_json, list) or not all(isinstance(e, list) and len(e) == 2 and isinstance(e[0], str) for e in labels_json):
        raise DataError(f'edm-dataset: {where}: "labels" must be null or a list of [file name, label] pairs')
    table = dict(labels_json)
    known = set(names)
    for fname, label in labels_json:
        if fname not in known:
            raise DataError(f'edm-dataset: {where} labels {fname!r}, which is not an image of the dataset')
        if isinstance(label, bool) or not isinstance(label, int) or label < 0:
            raise DataError(f'edm-dataset: {where}: label {label!r} of {fname!r} is not a class index; '
                            f'only integer class labels are supported (not one-hot or multi-dimensional labels)')
    if len(table) != len(labels_json):
        raise DataError(f'edm-dataset: {where} labels some images more than once')
    missing = [n for n in names if n not in table]
    if missing:
        raise DataError(f'edm-dataset: {where} has no label for {missing[0]!r} ({len(missing)} images unlabelled)')
    labels = [table[n] for n in names]
    return labels, max(labels) + 1


def _read_file(path):
    try:
        with open(path, 'rb') as f:
            return f.read()
    except OSError as e:
        raise DataError(f'edm-dataset: {path}: cannot read ({_one_line(e)})') from None


def _read_member(zf, root, name):
    try:
        return zf.read(name)
    except Exception as e:  # corrupt members raise BadZipFile, zlib.error, EOFError, ...
        raise DataError(f'edm-dataset: {root}: cannot read member {name} ({type(e).__name__}: {_one_line(e)})') from None


def load_edm_dataset(root, transform=None, resolution=None):
    """A dataset as NVlabs/edm's dataset_tool.py writes it: a .zip file or a folder of images
    (any nesting, every extension PIL opens, sorted by their '/'-separated path inside root) and
    an optional top-level dataset.json {"labels": [[path, class], ...] or null}. Without labels
    every label is 0 and num_classes is 1, else num_classes = max label + 1. Zips are read in
    memory: nothing is extracted, and no path from an archive is used as a filesystem path."""
    import zipfile
    if os.path.isdir(root):
        def where(rel):
            return os.path.join(root, *rel.split('/'))
        rels = sorted(os.path.relpath(os.path.join(d, f), root).replace(os.sep, '/') for d, _, files in os.walk(root) for f in files)
        return _edm_dataset(root, rels, lambda rel: _read_file(where(rel)), where, transform, resolution)
    if not os.path.isfile(root):
        raise DataError(f'edm-dataset: {root} does not exist; {EDM_HINT}')
    try:
        zf = zipfile.ZipFile(root)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise DataError(f'edm-dataset: {root}: not a readable zip file, or a truncated one ({_one_line(e)}); {EDM_HINT}') from None
    with zf:
        rels = sorted(n for n in zf.namelist() if not n.endswith('/'))
        return _edm_dataset(root, rels, lambda rel: _read_member(zf, root, rel), lambda rel: f'{root}:{rel}', transform,
                            resolution)


def _edm_dataset(root, rels, read, where, transform=None, resolution=None):
    """The EDM dataset of the files `rels` ('/'-separated relative paths) that read(rel) gives
    as bytes; where(rel) names a file in errors."""
    import io
    import json
    extensions = image_extensions()
    names = [r for r in rels if os.path.splitext(r)[1].lower() in extensions]
    if not names:
        raise DataError(f'edm-dataset: no image files in {root}; {EDM_HINT}')
    labels_json = None
    if 'dataset.json' in rels:
        try:
            labels_json = json.loads(read('dataset.json'))['labels']
        except (ValueError, TypeError, KeyError) as e:
            raise DataError(f'edm-dataset: {where("dataset.json")}: not a JSON object with "labels" ({_one_line(e)})') from None
    labels, num_classes = _edm_labels(labels_json, names, where('dataset.json'))
    images = _decode_all('edm-dataset', ((where(n), io.BytesIO(read(n))) for n in names), transform, resolution)
    return ImageDataset(images, torch.tensor(labels, dtype=torch.int64), 'edm-dataset', num_classes)


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


DATASETS = ('fashion-mnist', 'mnist', 'cifar10', 'cifar10-npz', 'image-folder', 'edm-dataset')


def default_root(name):
    """Where a dataset is found when the spec gives no root (only Debian's Fashion-MNIST has a
    fixed place), else None."""
    return FASHION_MNIST_DIR if name == 'fashion-mnist' else None


def load_dataset(name, root=None, split='train', pad_to_32=False, resolution=None, limit=None, transform=None):
    """A dataset by name, prepared (padding, resizing) and optionally cut to its first `limit`
    images. transform ('center-crop', image folders and EDM datasets only) makes images of any
    shape square at `resolution`, as EDM's dataset_tool does."""
    if transform is not None and name not in ('image-folder', 'edm-dataset'):
        raise DataError(f'{name}: data.transform applies to image files (image-folder, edm-dataset); {name} images '
                        'are square already')
    if name == 'fashion-mnist':
        ds = load_fashion_mnist(root, split)
    elif name == 'mnist':
        ds = load_mnist(root or '', split)
    elif name == 'cifar10':
        ds = load_cifar10(root or '', split)
    elif name == 'cifar10-npz':
        ds = load_cifar10_npz(root or '', split)
    elif name == 'image-folder':
        ds = load_image_folder(root or '', transform=transform, resolution=resolution)
    elif name == 'edm-dataset':
        if split == 'test':
            raise DataError('edm-dataset: an EDM dataset has one split (its zip or folder); use split: train')
        ds = load_edm_dataset(root or '', transform=transform, resolution=resolution)
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
