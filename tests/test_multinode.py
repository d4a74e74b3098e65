"""Ray's multi-node test cluster (conftest.multinode_cluster): worker nodes lost during training,
calibration and the sweep, the driver in its own process connected with --address, as a user's
would be. (A reduced spec across two worker nodes end to end: test_no_shared_disk.py.)"""
import os
import re
import subprocess
import sys
import time

import pytest
import torch
import yaml

from orchestrator import results
from tasks import calibration, data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_fashion = pytest.mark.skipif(not os.path.isfile(os.path.join(data.FASHION_MNIST_DIR, 'train-images-idx3-ubyte.gz')),
                                   reason=f'Fashion-MNIST not installed in {data.FASHION_MNIST_DIR}')

def test_embedded_cluster_never_joins_another_one(multinode_cluster):
    """With another Ray cluster on the machine (the one `ray start` or this fixture leaves as the
    machine's current cluster), the embedded default still starts a cluster of its own."""
    code = ('from orchestrator import runner; import ray; runner.init_ray(num_cpus=1); '
            'print(len(ray.nodes()), ray.cluster_resources().get("CPU"))')
    env = {k: v for k, v in os.environ.items() if k != 'RAY_ADDRESS'}
    proc = subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-2:] == ['1', '1.0']  # its own single node, not the three of the other cluster


# ---------------------------------------------------------------------------------------------
# Lost nodes: `cluster.remove_node` without a graceful shutdown, as a node that dies or is
# pre-empted. Each test leaves the cluster with two worker nodes again.

def _workers(cluster):
    return [n for n in cluster.list_all_nodes() if n is not cluster.head_node]


def _restore(cluster):
    """Two worker nodes again (as an autoscaler replaces a lost node)."""
    while len(_workers(cluster)) < 2:
        cluster.add_node(**cluster.worker_args)
    cluster.wait_for_nodes()


def _tiny_model(tmp_path):
    from tasks import train as tasks_train
    ds = data.load_dataset('fashion-mnist', pad_to_32=True, resolution=16, limit=64)
    tasks_train.train(tasks_train.TrainConfig(batch_size=16, total_kimg=0.016, kimg_per_tick=0.016), ds, str(tmp_path),
                      progress=False)
    return str(tmp_path / tasks_train.NETWORK)


def _start(cluster, raw, tmp_path, name, *args):
    """`orchestrator run --address` of spec `raw` in its own process; output to <name>.log."""
    spec_path, log = tmp_path / f'{name}.yaml', tmp_path / f'{name}.log'
    spec_path.write_text(yaml.safe_dump(raw))
    env = dict(os.environ, RAY_ADDRESS='')
    proc = subprocess.Popen([sys.executable, '-m', 'orchestrator', 'run', str(spec_path), '--address', cluster.address,
                             '--results', str(tmp_path / name), *args], cwd=ROOT, env=env,
                            stdout=open(log, 'w'), stderr=subprocess.STDOUT, text=True)
    proc.log = log
    return proc


def _finish(proc, timeout=300):
    rc = proc.wait(timeout=timeout)
    return rc, proc.log.read_text()


def _wait_for(condition, timeout=180, what=''):
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f'timed out waiting for {what}')


def _node_running(cluster, class_name):
    """The worker node on which a live actor of class_name runs, or None."""
    from ray.util.state import list_actors
    alive = list_actors(address=cluster.dashboard_url, filters=[('class_name', '=', class_name), ('state', '=', 'ALIVE')],
                        raise_on_missing_output=False)
    nodes = {n.node_id: n for n in _workers(cluster)}
    return next((nodes[a.node_id] for a in alive if a.node_id in nodes), None)


def _table(root, experiment):
    path = next((root / experiment / 'stages').glob('calibrate-*/*/table-data-*.pt'))
    return calibration.CalibrationTable.load(str(path))


@needs_fashion
def test_lost_node_during_calibration_gives_the_identical_table(multinode_cluster, tmp_path):
    """A worker node removed while both calibration actors work: the lost actor's chunks are
    recomputed on the node left (the finished actor is released so the new one fits), and the
    merged table is bit for bit the undisturbed run's. With both worker nodes gone the stage
    cannot progress: it says so after --stall-timeout and exits non-zero."""
    cluster = multinode_cluster
    raw = dict(experiment='lost', seed=0, data=dict(name='fashion-mnist', pad_to_32=True, resolution=16, limit=512),
               model=dict(checkpoint=_tiny_model(tmp_path)), calibrate=dict(images=160, chunk_size=8, actors=2, batch_size=16))
    try:
        rc, out = _finish(_start(cluster, raw, tmp_path, 'undisturbed'))
        assert rc == 0, out[-3000:]
        started = time.time()
        proc = _start(cluster, raw, tmp_path, 'disturbed')
        node = _wait_for(lambda: _node_running(cluster, 'CalibrationActor'), what='a calibration actor')
        time.sleep(1.0)  # into its chunks
        cluster.remove_node(node, allow_graceful=False)
        rc, out = _finish(proc)
        assert rc == 0, out[-3000:]
        assert 'was lost' in out and 'Traceback' not in out, out[-3000:]
        a, b = _table(tmp_path / 'undisturbed', 'lost'), _table(tmp_path / 'disturbed', 'lost')
        assert a.chunks == b.chunks == set(range(20))
        for name in ('sum_D', 'sum_y', 'sum_r2', 'count'):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
        print(f'lost node: calibration finished {time.time() - started:.1f} s after the run started')

        # No worker node left: nothing can run the chunks; the stage says so and the run exits.
        _restore(cluster)
        raw['calibrate']['seed'] = 1  # another table: nothing reused
        proc = _start(cluster, raw, tmp_path, 'stalled', '--stall-timeout', '5')
        _wait_for(lambda: _node_running(cluster, 'CalibrationActor'), what='a calibration actor')
        for node in _workers(cluster):
            cluster.remove_node(node, allow_graceful=False)
        removed = time.time()
        rc, out = _finish(proc, timeout=120)
        assert rc == 2, out[-3000:]
        assert re.search(r'error: calibrate \(data\): no progress for 5 s; \d chunk group\(s\) wait for an actor '
                         r'\(1 CPU, 0 GPU each\); the cluster has 0 CPU, 0 GPU free of', out), out[-3000:]  # (the total lags node deaths)
        assert 'Traceback' not in out and time.time() - removed < 60
    finally:
        _restore(cluster)


@needs_fashion
def test_lost_node_during_the_sweep_retries_the_trial_and_keeps_every_row(multinode_cluster, tmp_path):
    """A worker node removed while sweep trials run on both: the lost trial is retried
    (sweep.max_failures) on the node left, every row lands in the table, and the run succeeds."""
    cluster = multinode_cluster
    raw = dict(experiment='lost-sweep', seed=0, data=dict(name='fashion-mnist', pad_to_32=True, resolution=16, limit=64),
               model=dict(checkpoint=_tiny_model(tmp_path)),
               sweep=dict(samplers=[dict(sampler='edm', num_steps=[4, 6, 8, 10])], calibrated=[False], max_failures=2),
               evaluate=dict(num_images=8, reference_images=8, batch_size=8))
    try:
        proc = _start(cluster, raw, tmp_path, 'sweep')
        trial = lambda: _node_running(cluster, 'ImplicitFunc') or _node_running(cluster, '_trial')
        node = _wait_for(trial, what='a running sweep trial')
        time.sleep(1.0)
        cluster.remove_node(node, allow_graceful=False)
        rc, out = _finish(proc)
        assert rc == 0, out[-3000:]
        sweep = results.read_table(str(tmp_path / 'sweep'), 'lost-sweep', 'sweep')
        assert sorted(sweep['nfe']) == [7, 11, 15, 19] and sweep['fid'].notna().all()
        assert 'error' not in sweep.columns or sweep['error'].isna().all()

        # No worker node left: the retried trials wait for resources that never come; after
        # --stall-timeout the sweep stops, says so, and the run exits naming what did not run.
        _restore(cluster)
        raw['evaluate']['num_images'] = 6  # other trials: nothing reused
        proc = _start(cluster, raw, tmp_path, 'stalled', '--stall-timeout', '20')  # time for a trial to start on the new node
        _wait_for(trial, what='a running sweep trial')
        for node in _workers(cluster):
            cluster.remove_node(node, allow_graceful=False)
        removed = time.time()
        rc, out = _finish(proc, timeout=180)
        assert rc == 2, out[-3000:]
        assert re.search(r"sweep: no progress for 20 s: trials wait for a worker \(1 CPU, 0 GPU each\); the cluster has "
                         r"[\d.]+ CPU, 0 GPU free",  # (what Ray counts free lags node deaths)
                         out), out[-3000:]
        assert re.search(r'error: sweep: 4 trial\(s\) failed: edm num_steps=4 @ 0.016 kimg; ', out), out[-3000:]
        assert 'Traceback' not in out and time.time() - removed < 120
    finally:
        _restore(cluster)


@needs_fashion
def test_lost_node_during_training_resumes_to_the_same_network(multinode_cluster, tmp_path):
    """Two DDP workers on two nodes; one node is removed after the first checkpoint and a new one
    joins (as an autoscaler would add it): Ray Train restarts the worker group from the last
    checkpoint and the final network is bit for bit the undisturbed run's."""
    cluster = multinode_cluster
    raw = dict(experiment='lost-train', seed=0, data=dict(name='fashion-mnist', pad_to_32=True, resolution=16, limit=256),
               model=dict(preset='ddpmpp-tiny'),
               train=dict(total_kimg=0.384, batch_size=16, kimg_per_tick=0.064, checkpoint_ticks=1, lr_rampup_kimg=0.05,
                          ema_halflife_kimg=0.05, workers=2, max_failures=2))
    network = lambda name: next((tmp_path / name / 'lost-train' / 'stages').glob('train-*/network.pt'))
    try:
        rc, out = _finish(_start(cluster, raw, tmp_path, 'undisturbed'))
        assert rc == 0, out[-3000:]
        proc = _start(cluster, raw, tmp_path, 'disturbed')

        def past_first_checkpoint():  # Ray Train has registered one in the stage's storage
            return any((tmp_path / 'disturbed').glob('lost-train/stages/train-*/ray/**/training-state.pt'))
        _wait_for(past_first_checkpoint, what='the first checkpoint')
        cluster.remove_node(_node_running(cluster, 'RayTrainWorker'), allow_graceful=False)
        _restore(cluster)
        rc, out = _finish(proc)
        assert rc == 0, out[-3000:]
        a = torch.load(network('undisturbed'), weights_only=True)
        b = torch.load(network('disturbed'), weights_only=True)
        assert a['cur_nimg'] == b['cur_nimg'] == 384
        for name in a['ema']:
            assert torch.equal(a['ema'][name], b['ema'][name]), name
    finally:
        _restore(cluster)
