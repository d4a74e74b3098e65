"""A reduced spec end to end on Ray's multi-node test cluster (conftest.multinode_cluster):
training, calibration actors and sweep trials spread over two worker nodes, the driver in its
own process connected with --address, as a user's would be."""
import os
import subprocess
import sys

import pytest
import torch
import yaml

from orchestrator import results
from tasks import calibration, data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_fashion = pytest.mark.skipif(not os.path.isfile(os.path.join(data.FASHION_MNIST_DIR, 'train-images-idx3-ubyte.gz')),
                                   reason=f'Fashion-MNIST not installed in {data.FASHION_MNIST_DIR}')

SPEC = dict(
    experiment='multinode', seed=0,
    data=dict(name='fashion-mnist', pad_to_32=True, resolution=16, limit=256),
    model=dict(preset='ddpmpp-tiny'),
    train=dict(total_kimg=0.064, batch_size=16, kimg_per_tick=0.032, lr_rampup_kimg=0.05, ema_halflife_kimg=0.05),
    calibrate=dict(images=32, chunk_size=8, actors=2, batch_size=16),
    sweep=dict(samplers=[dict(sampler='dpm_solver', order=2, method='multistep', steps=4)], calibrated=[False, True]),
    evaluate=dict(num_images=4, reference_images=8, batch_size=8),
)


@needs_fashion
def test_reduced_spec_across_two_worker_nodes(multinode_cluster, tmp_path):
    spec_path, root = tmp_path / 'multinode.yaml', tmp_path / 'results'
    spec_path.write_text(yaml.safe_dump(SPEC))
    # The head has no CPUs: whatever ran, ran on the two worker nodes.
    assert sum(1 for n in multinode_cluster.list_all_nodes() if n is not multinode_cluster.head_node) == 2
    env = dict(os.environ, RAY_ADDRESS='')  # the driver connects to the given address only
    proc = subprocess.run([sys.executable, '-m', 'orchestrator', 'run', str(spec_path), '--address', multinode_cluster.address,
                           '--results', str(root)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    sweep = results.read_table(str(root), 'multinode', 'sweep')
    assert len(sweep) == 2 and sweep['fid'].notna().all()
    # The table two actors on two nodes computed is the single-process estimate over the same images.
    cal = results.read_table(str(root), 'multinode', 'calibration')
    assert (cal['images'] == 32).all()
    table_path = next(p for p in (root / 'multinode' / 'stages').glob('calibrate-*/table-data-32.pt'))
    table = calibration.CalibrationTable.load(str(table_path))
    ds = data.load_dataset('fashion-mnist', pad_to_32=True, resolution=16, limit=32)
    expected_sum_y = data.to_model_range(ds.images).to(torch.float64).sum(0)
    assert table.chunks == set(range(4)) and torch.allclose(table.sum_y[0, 0], expected_sum_y, rtol=1e-12, atol=1e-9)
    assert 'Traceback' not in proc.stderr


def test_embedded_cluster_never_joins_another_one(multinode_cluster):
    """With another Ray cluster on the machine (the one `ray start` or this fixture leaves as the
    machine's current cluster), the embedded default still starts a cluster of its own."""
    code = ('from orchestrator import runner; import ray; runner.init_ray(num_cpus=1); '
            'print(len(ray.nodes()), ray.cluster_resources().get("CPU"))')
    env = {k: v for k, v in os.environ.items() if k != 'RAY_ADDRESS'}
    proc = subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-2:] == ['1', '1.0']  # its own single node, not the three of the other cluster
