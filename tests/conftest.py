"""Shared fixtures. Tests that use a Ray cluster fixture get the `ray` marker (multi-node ones
also `multinode`) from the fixtures they ask for, so the markers always say what a test needs:
-m 'not ray' runs everything that needs no Ray cluster."""
import pytest


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
