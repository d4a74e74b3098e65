"""Files written whole or not at all, and files from elsewhere read as data (pickles through an
allow-list, torch files with weights_only)."""
import hashlib
import os
import pickle
import re

import numpy as np
import torch


def atomic_write(path, write, suffix=''):
    """Call write(tmp) on a temporary name beside `path`, then rename it to `path`: a reader
    never sees a half-written file, and a crash leaves the old file (or none). `suffix` keeps an
    extension that the writer would otherwise append (np.savez adds '.npz')."""
    tmp = f'{path}.tmp-{os.getpid()}{suffix}'
    write(tmp)
    os.replace(tmp, path)
    return path


def sha256_file(path):
    """sha256 of a file's bytes; of a directory, of every file in it with its relative path."""
    h = hashlib.sha256()
    files = [path] if os.path.isfile(path) else sorted(os.path.join(d, f) for d, _, names in os.walk(path) for f in names)
    for name in files:
        if name != path:
            h.update(os.path.relpath(name, path).encode())
        with open(name, 'rb') as f:
            for block in iter(lambda: f.read(1 << 20), b''):
                h.update(block)
    return h.hexdigest()


class CheckpointError(ValueError):
    """A model file that cannot be loaded; the message names the file and what was expected."""


def load_torch_file(path, map_location='cpu', mmap=False):
    """torch.load of a file this project wrote, refusing anything but tensors and plain data.
    mmap: tensors are mapped, not read (for a look at what a large file holds)."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise CheckpointError(f'{path}: no such file') from None
    except Exception as e:  # weights_only refusals are UnpicklingError; corrupt zips RuntimeError
        text = str(e).strip()
        refused = re.search(r'(?:Unsupported global: GLOBAL|unsupported GLOBAL) (\S+)', text)
        if refused:  # torch's message goes on to say how to load it anyway; this file is not one to trust
            raise CheckpointError(f'{path}: refused: it would import {refused.group(1)} to load (only tensors and '
                                  'plain data are read from model files)') from None
        first = text.splitlines()[0] if text else ''
        raise CheckpointError(f'{path}: not a plain-data torch file ({type(e).__name__}: {first})') from None


# ---------------------------------------------------------------------------------------------
# Pickles from elsewhere (CIFAR-10 batches, EDM snapshots): read as data through an allow-list.
# A pickle names callables (globals) that the loader calls; only the ones listed here are ever
# resolved, so nothing a file names outside the list can run.

def _numpy_scalar(dtype, data=None):
    """numpy's scalar reconstructor, for plain (non-object) dtypes only."""
    dtype = np.dtype(dtype)
    if dtype.hasobject or not isinstance(data, bytes):
        raise pickle.UnpicklingError(f'refused numpy scalar of dtype {dtype}')
    return np.frombuffer(data, dtype=dtype)[0]


def _numpy_reconstruct(cls, shape, dtype):
    if cls is not np.ndarray:
        raise pickle.UnpicklingError(f'refused numpy array subclass {cls!r}')
    return np.ndarray.__new__(np.ndarray, shape, dtype)


# numpy 1 pickles name numpy.core..., numpy 2 pickles numpy._core...
NUMPY_GLOBALS = {
    **{f'{core}.multiarray.{name}': fn for core in ('numpy.core', 'numpy._core')
       for name, fn in (('scalar', _numpy_scalar), ('_reconstruct', _numpy_reconstruct))},
    'numpy.dtype': np.dtype,
    'numpy.ndarray': np.ndarray,
}


class AllowListUnpickler(pickle.Unpickler):
    """pickle.Unpickler that resolves only the globals in `allowed` ({'module.name': object});
    any other raises UnpicklingError naming it. `what` says what kind of file was expected."""

    def __init__(self, file, allowed, what, **kwargs):
        super().__init__(file, **kwargs)
        self.allowed, self.what = allowed, what

    def find_class(self, module, name):
        key = f'{module}.{name}'
        if key in self.allowed:
            return self.allowed[key]
        raise pickle.UnpicklingError(f'refused global {key}: not on the allow-list for {self.what} '
                                     '(nothing from the file was run)')
