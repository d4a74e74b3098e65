"""A cluster whose worker nodes cannot see the driver's disk, as on KubeRay or a cloud cluster:
a head with no CPUs and two 1-CPU worker nodes, each started with `ray start --block` inside its
own mount namespace (`unshare --mount`), with a tmpfs over the folder that holds the driver's
spec, local results root and cache. The driver connects with --address, as a user's would:
training, calibration actors and sweep trials spread over the two nodes. System paths (Debian's dataset folder, the virtual environment) stay
shared, as on nodes built from one image. The reduced spec runs there end to end with its
results on object storage (moto's S3 server on loopback); a local results root is refused up
front. (`ray start` joins a multi-node cluster only with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER unset,
and then Ray gives its nodes this machine's own address instead of 127.0.0.1: nothing leaves the
machine.)"""
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import torch
import yaml

from orchestrator import results
from orchestrator.storage import Storage, fetch
from tasks import calibration, data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RAY = os.path.join(os.path.dirname(sys.executable), 'ray')

SPEC = dict(
    experiment='isolated', seed=0,
    data=dict(name='fashion-mnist', pad_to_32=True, resolution=16, limit=256),
    model=dict(preset='ddpmpp-tiny'),
    train=dict(total_kimg=0.064, batch_size=16, kimg_per_tick=0.032, lr_rampup_kimg=0.05, ema_halflife_kimg=0.05),
    calibrate=dict(images=32, chunk_size=8, actors=2, batch_size=16),
    sweep=dict(samplers=[dict(sampler='dpm_solver', order=2, method='multistep', steps=4)], calibrated=[False, True]),
    evaluate=dict(num_images=4, reference_images=8, batch_size=8),
)


def _can_unshare():
    if sys.platform != 'linux' or shutil.which('unshare') is None:
        return False
    probe = subprocess.run(['unshare', '--mount', '--propagation', 'private', 'sh', '-c', 'mount -t tmpfs tmpfs /mnt'],
                           capture_output=True)
    return probe.returncode == 0


pytestmark = [
    pytest.mark.ray, pytest.mark.multinode,
    pytest.mark.skipif(not _can_unshare(), reason='needs Linux and the right to make a mount namespace with a tmpfs '
                                                  '(unshare --mount as root): the worker node must not see the driver\'s disk'),
    pytest.mark.skipif(not os.path.isfile(os.path.join(data.FASHION_MNIST_DIR, 'train-images-idx3-ubyte.gz')),
                       reason=f'Fashion-MNIST not installed in {data.FASHION_MNIST_DIR}'),
]


def _env(**extra):
    """The environment of the nodes and the driver: each node's own (the S3 endpoint and test
    credentials of conftest.py), never forwarded by the orchestrator. RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER
    is the embedded cluster's, which refuses to join a multi-node cluster."""
    env = {k: v for k, v in os.environ.items() if k not in ('RAY_ADDRESS', 'RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER')}
    return dict(env, RAY_AUTH_MODE='disabled', **extra)


def _orchestrator(*args, cache, timeout=900):
    return subprocess.run([sys.executable, '-m', 'orchestrator', *args], cwd=ROOT, env=_env(CALIB_EDM_CACHE=cache),
                          capture_output=True, text=True, timeout=timeout)


class IsolatedCluster:
    """`ray start` head (0 CPUs) and two 1-CPU worker nodes, each in its own mount namespace with a
    tmpfs over `hidden`. Every process is ended by its process group at exit."""

    def __init__(self, hidden, log_dir):
        from orchestrator.runner import free_port
        self.port, self.hidden, self.procs = free_port(), hidden, []
        self.temp_dir = tempfile.mkdtemp(prefix='ray-ns-', dir='/tmp')  # short: Ray's unix sockets live under it
        self.worker_cache = tempfile.mkdtemp(prefix='calib-edm-worker-cache-', dir='/tmp')
        self.address = f'127.0.0.1:{self.port}'
        common = ['--block', '--node-ip-address=127.0.0.1', f'--object-store-memory={100 * 1024 ** 2}', '--disable-usage-stats']
        try:
            self._start_nodes(hidden, log_dir, common)
        except BaseException:  # a node that did not come up: end the others, as close() would
            self.close()
            raise

    def _start_nodes(self, hidden, log_dir, common):
        from orchestrator.runner import free_port
        self._start([RAY, 'start', '--head', '--num-cpus=0', f'--port={self.port}', f'--temp-dir={self.temp_dir}',
                     '--dashboard-host=127.0.0.1', f'--dashboard-port={free_port()}', *common], os.path.join(log_dir, 'head.log'))
        self._wait_for_nodes(1)
        worker = ' '.join([RAY, 'start', f'--address={self.address}', '--num-cpus=1', *common])
        for i in range(2):  # one after the other: two `ray start` on one address at once may time out registering
            self._start(['unshare', '--mount', '--propagation', 'private', 'sh', '-c',
                         f'mount -t tmpfs tmpfs {hidden} && exec {worker}'], os.path.join(log_dir, f'worker{i}.log'),
                        CALIB_EDM_CACHE=self.worker_cache)
            self._wait_for_nodes(2 + i)

    def _start(self, command, log, **env):
        with open(log, 'w') as f:
            self.procs.append(subprocess.Popen(command, env=_env(**env), stdout=f, stderr=subprocess.STDOUT,
                                               start_new_session=True))

    def _wait_for_nodes(self, count, timeout=120):
        ask = f'import ray; ray.init(address="{self.address}"); print(sum(n["Alive"] for n in ray.nodes()))'
        deadline = time.time() + timeout
        while time.time() < deadline:
            out = subprocess.run([sys.executable, '-c', ask], env=_env(), capture_output=True, text=True, timeout=60)
            if out.returncode == 0 and out.stdout.strip().splitlines()[-1:] == [str(count)]:
                return
            time.sleep(1)
        raise RuntimeError(f'the cluster did not reach {count} node(s) in {timeout} s')

    def close(self):
        for proc in reversed(self.procs):  # worker first, then head
            for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
                try:
                    os.killpg(proc.pid, sig)
                    proc.wait(wait)
                    break
                except ProcessLookupError:
                    break
                except subprocess.TimeoutExpired:
                    continue
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        shutil.rmtree(self.worker_cache, ignore_errors=True)


def _calibration_table(root):
    storage = Storage(root)
    key = next(k for k, _ in storage.files('isolated/stages') if k.endswith('/table-data-32.pt'))
    return calibration.CalibrationTable.load(fetch(storage.uri(key)))


def test_reduced_spec_on_a_cluster_without_shared_disk(s3_bucket, tmp_path, ray_subprocess):
    hidden = tmp_path / 'driver'  # the driver's disk: spec, local results root, cache
    hidden.mkdir()
    spec = hidden / 'isolated.yaml'
    spec.write_text(yaml.safe_dump(SPEC))
    cache = str(hidden / 'cache')
    # The single-node reference: the embedded cluster, results on the same object store.
    single = _orchestrator('run', str(spec), '--results', f'{s3_bucket}/single', cache=cache)
    assert single.returncode == 0, single.stdout[-3000:] + single.stderr[-3000:]

    cluster = IsolatedCluster(str(hidden), str(tmp_path))
    try:
        # A local results root cannot work there: refused before any stage, in seconds, in one line.
        started = time.time()
        local = _orchestrator('run', str(spec), '--address', cluster.address, '--results', str(hidden / 'results'),
                              cache=cache)
        assert local.returncode == 2 and 'the results root is not shared: 2 of 3 node(s) cannot see' in local.stderr, \
            local.stdout[-2000:] + local.stderr[-3000:]
        assert local.stderr.strip().count('\n') == 0 and 'Traceback' not in local.stderr and '== train' not in local.stdout
        assert time.time() - started < 60
        assert not os.path.exists(hidden / 'results' / 'isolated' / 'stages')

        multi = _orchestrator('run', str(spec), '--address', cluster.address, '--results', f'{s3_bucket}/multi', cache=cache)
        assert multi.returncode == 0, multi.stdout[-3000:] + multi.stderr[-3000:]
        assert 'Traceback' not in multi.stderr
    finally:
        cluster.close()
    # Every row, the calibration table bit for bit the single-node one, read straight from the bucket.
    sweep = results.read_table(f'{s3_bucket}/multi', 'isolated', 'sweep')
    assert len(sweep) == 2 and sweep['fid'].notna().all() and 'error' not in sweep.columns
    reference = results.read_table(f'{s3_bucket}/single', 'isolated', 'sweep')
    assert sorted(sweep['label']) == sorted(reference['label'])
    assert (results.read_table(f'{s3_bucket}/multi', 'isolated', 'calibration')['images'] == 32).all()
    a, b = _calibration_table(f'{s3_bucket}/multi'), _calibration_table(f'{s3_bucket}/single')
    for name in ('sum_D', 'sum_y', 'sum_r2', 'count'):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    # The table two actors on two nodes computed is the single-process estimate over the same images.
    ds = data.load_dataset('fashion-mnist', pad_to_32=True, resolution=16, limit=32)
    expected_sum_y = data.to_model_range(ds.images).to(torch.float64).sum(0)
    assert a.chunks == set(range(4)) and torch.allclose(a.sum_y[0, 0], expected_sum_y, rtol=1e-12, atol=1e-9)
    # What ran there is on the store, not on the driver's disk (the worker never wrote to it).
    stored = {k.split('/')[2].split('-')[0] for k, _ in Storage(f'{s3_bucket}/multi').files('isolated/stages')}
    assert stored == {'train', 'calibrate', 'reference', 'sweep'}
    # Re-running on the object store reuses every stage.
    again = _orchestrator('run', str(spec), '--results', f'{s3_bucket}/single', cache=cache)
    assert again.returncode == 0 and again.stdout.count(': reused') == 4, again.stdout[-3000:]
