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
