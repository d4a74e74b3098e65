"""Test helper: write one of our networks in NVlabs/edm's snapshot format (a pickle whose
persistent objects are `torch_utils.persistence._reconstruct_persistent_obj(meta)` calls), so
that every preconditioner x network combination can be round-tripped through the loader. The
embedded module source raises if anything ever executes it."""
import pickle
import sys
import types

import torch

MODULE_SRC = 'raise SystemExit("embedded module source was executed")\n'


def _install_fake_persistence():
    """pickle writes a global only if it can import it: a stand-in module for the writer."""
    if 'torch_utils.persistence' not in sys.modules:
        pkg, mod = types.ModuleType('torch_utils'), types.ModuleType('torch_utils.persistence')

        def _reconstruct_persistent_obj(meta):
            raise AssertionError('the test writer only writes')
        _reconstruct_persistent_obj.__module__ = 'torch_utils.persistence'
        _reconstruct_persistent_obj.__qualname__ = '_reconstruct_persistent_obj'
        mod._reconstruct_persistent_obj = _reconstruct_persistent_obj
        pkg.persistence = mod
        sys.modules.update({'torch_utils': pkg, 'torch_utils.persistence': mod})
    return sys.modules['torch_utils.persistence']._reconstruct_persistent_obj


class _Writer(pickle.Pickler):
    def __init__(self, f, init_kwargs, protocol):
        super().__init__(f, protocol=protocol)
        self.init_kwargs, self.reconstruct = init_kwargs, _install_fake_persistence()

    def reducer_override(self, obj):
        if isinstance(obj, torch.nn.Module) and not isinstance(obj, (torch.nn.ModuleDict, torch.nn.ModuleList)):
            keep = ('training', '_parameters', '_buffers', '_non_persistent_buffers_set', '_modules')
            state = {k: v for k, v in obj.__dict__.items() if k in keep}
            state.update(_init_args=(), _init_kwargs=self.init_kwargs.get(id(obj), {}))
            meta = dict(type='class', version=6, module_src=MODULE_SRC, class_name=type(obj).__name__, state=state)
            return self.reconstruct, (meta,)
        return NotImplemented


def write_edm_snapshot(path, net, precond_kwargs, model_kwargs, protocol=4, numpy_core=False):
    """Write `net` (a tasks.precond preconditioner) as EDM's training loop writes a snapshot.
    numpy_core: spell numpy globals as numpy 1 did (numpy.core...), as 2022 snapshots do."""
    import io
    buf = io.BytesIO()
    blob = dict(ema=net, loss_fn=None, augment_pipe=None, dataset_kwargs=dict(resolution=net.img_resolution))
    _Writer(buf, {id(net): precond_kwargs, id(net.model): model_kwargs}, protocol).dump(blob)
    data = buf.getvalue()
    if numpy_core:  # protocol 2 names globals as text lines, so the module can be respelled
        assert protocol <= 2
        data = data.replace(b'numpy._core.multiarray\n', b'numpy.core.multiarray\n')
    with open(path, 'wb') as f:
        f.write(data)
