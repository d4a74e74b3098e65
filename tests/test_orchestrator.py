"""Orchestrator tests; those on the embedded local cluster (the ray_cluster fixture of
conftest.py, started once per session) carry the `ray` marker."""
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import pandas as pd
import pytest
import torch
import yaml

from orchestrator import results, runner, spec
from tasks import calibration, checkpoints, data, schedules
from tasks import train as tasks_train

fashion_present = os.path.isfile(os.path.join(data.FASHION_MNIST_DIR, 'train-images-idx3-ubyte.gz'))
needs_fashion = pytest.mark.skipif(not fashion_present, reason=f'Fashion-MNIST not installed in {data.FASHION_MNIST_DIR}')

TINY = dict(
    experiment='tiny', seed=0,
    data=dict(name='fashion-mnist', pad_to_32=True, resolution=16, limit=512),
    model=dict(preset='ddpmpp-tiny'),
    train=dict(total_kimg=0.128, batch_size=16, kimg_per_tick=0.032, checkpoint_ticks=2, lr_rampup_kimg=0.05, ema_halflife_kimg=0.05),
    calibrate=dict(images=48, chunk_size=8, actors=2, batch_size=16),
    sweep=dict(samplers=[dict(sampler='dpm_solver', order=2, method='multistep', steps=[4, 6])], calibrated=[False, True]),
    evaluate=dict(num_images=6, reference_images=8, batch_size=8, kid=True, precision_recall=True),
)


def _spec(tmp_path, name='s.yaml', **changes):
    d = yaml.safe_load(yaml.safe_dump(TINY))
    for section, values in changes.items():
        if values is None:  # no such section
            d.pop(section, None)
        elif isinstance(values, dict):
            d[section].update(values)
        else:
            d[section] = values
    path = tmp_path / name
    path.write_text(yaml.safe_dump(d))
    return spec.load(str(path))


def _kill_one_actor(class_name, ready, kills):
    """In a thread: once ready() says so, SIGKILL the process of one live actor of class_name
    (as a crashed or pre-empted worker dies), and record its pid in `kills`."""
    from ray.util.state import list_actors

    def watch():
        deadline = time.time() + 120
        while time.time() < deadline:
            alive = list_actors(filters=[('class_name', '=', class_name), ('state', '=', 'ALIVE')], raise_on_missing_output=False)
            if alive and ready():
                pid = alive[0].pid
                os.kill(pid, signal.SIGKILL)
                kills.append(pid)
                return
            time.sleep(0.2)
    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def _listeners_of_descendants():
    """{(process name, local address)} of every TCP socket that this process and its descendants
    (the embedded cluster's GCS, raylet, agents, workers) listen on, from `ss -ltnpH`."""
    children = {}
    for stat in glob.glob('/proc/[0-9]*/stat'):
        try:
            with open(stat) as f:
                fields = f.read().rsplit(')', 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        children.setdefault(int(fields[1]), []).append(int(stat.split('/')[2]))
    ours, todo = set(), [os.getpid()]
    while todo:
        pid = todo.pop()
        ours.add(pid)
        todo += children.get(pid, [])
    out = subprocess.run(['ss', '-ltnpH'], capture_output=True, text=True, check=True).stdout
    found = set()
    for line in out.splitlines():
        local = line.split()[3]
        for name, pid in re.findall(r'\("([^"]+)",pid=(\d+)', line):
            if int(pid) in ours:
                found.add((name, local))
    return found


@needs_fashion
@pytest.mark.skipif(shutil.which('ss') is None, reason='ss (iproute2) is not installed: it lists the listening sockets')
def test_two_worker_training_killed_midway_resumes_exactly_on_loopback_only(ray_cluster, tmp_path):
    """A 2-worker DDP run whose worker process is killed after the first checkpoint is restarted
    by FailureConfig from that checkpoint and ends with the same weights as an uninterrupted run
    (per-rank data order and noise are restored). While they train, every socket the embedded
    cluster's processes listen on (Ray's GCS, raylet, agents and workers, torch's process-group
    store, gloo) is bound to 127.0.0.1: the store used to listen on every interface, Ray's agents
    on the machine's address."""
    from orchestrator.train import run_train_stage
    s = _spec(tmp_path, train=dict(workers=2, max_failures=1, total_kimg=0.384, kimg_per_tick=0.064, checkpoint_ticks=1,
                                   snapshots_kimg=[0.192]))
    # The same stage under two results roots: one run is disturbed, the other not.
    failed, clean = ([st for st in runner.plan.make_plan(s, str(tmp_path / root)) if st.name == 'train'][0]
                     for root in ('failed', 'clean'))
    dataset = runner.plan.load_data(*runner.plan.data_inputs(s.data))

    def past_first_checkpoint():  # Ray Train has registered a checkpoint in the stage's storage
        return any(k.endswith(tasks_train.CHECKPOINT) for k, _ in failed.storage.files(failed.key))
    seen, done = set(), threading.Event()

    def listeners():
        while not done.is_set():
            seen.update(_listeners_of_descendants())
            time.sleep(0.2)
    sampler = threading.Thread(target=listeners, daemon=True)
    sampler.start()
    kills = []
    watcher = _kill_one_actor('RayTrainWorker', past_first_checkpoint, kills)
    run = lambda stage: run_train_stage(stage, {}, dataset, runner.RunOptions(log=lambda *a: None))
    outputs = run(failed)
    watcher.join()
    assert kills  # a worker did die mid-run
    reference = run(clean)
    done.set()
    sampler.join()
    train_workers = {address for name, address in seen if 'RayTrainWo' in name}
    assert len(train_workers) >= 4, seen  # each worker's Ray server and gloo socket, and rank 0's store
    outside = sorted((name, address) for name, address in seen
                     if address.rsplit(':', 1)[0] not in ('127.0.0.1', '[::ffff:127.0.0.1]', '[::1]'))
    assert not outside, outside
    assert sorted(outputs['snapshots']) == sorted(reference['snapshots']) == ['0.192kimg', '0.384kimg']
    assert outputs['device'] == 'cpu'
    for key, nimg in (('0.192kimg', 192), ('0.384kimg', 384)):  # the snapshot too, kept across the restart
        a, b = (torch.load(o['snapshots'][key]['network'], weights_only=True) for o in (outputs, reference))
        assert a['cur_nimg'] == b['cur_nimg'] == nimg
        for name in a['ema']:
            assert torch.equal(a['ema'][name], b['ema'][name]), name
    assert [r['kimg'] for r in a['log']] == [r['kimg'] for r in b['log']]


@needs_fashion
def test_killed_calibration_actor_gives_identical_table(ray_cluster, tmp_path):
    """A lost actor's chunks are recomputed: the merged tables are bit for bit those of a run
    without failure (the driver merges in group order). The table of the smaller image count is
    the estimate over its first chunks alone."""
    from orchestrator.calibrate import run_calibration
    ds = data.load_dataset('fashion-mnist', pad_to_32=True, resolution=16, limit=64)
    tasks_train.train(tasks_train.TrainConfig(batch_size=16, total_kimg=0.032, kimg_per_tick=0.016), ds, str(tmp_path), progress=False)
    network = dict(network=str(tmp_path / tasks_train.NETWORK), format='network.pt')
    s = _spec(tmp_path, calibrate=dict(TINY['calibrate'], images=[16, 48]))
    net = checkpoints.load_denoiser(network['network'])
    sigmas = calibration.queried_sigmas('dpm_solver', net, steps=4, order=2, method='multistep')
    messages = []
    whole = run_calibration(network, ds, s.calibrate, 'data', sigmas, dict(dataset='x'), log=messages.append)
    # An actor process killed while it works (a denser grid keeps the actors busy for seconds).
    dense = calibration.union_sigmas(sigmas, calibration.queried_sigmas('edm', net, num_steps=64))
    started = time.time()
    kills = []
    watcher = _kill_one_actor('CalibrationActor', lambda: time.time() > started + 1.0, kills)
    killed = run_calibration(network, ds, s.calibrate, 'data', dense, dict(dataset='x'), log=messages.append)
    watcher.join()
    assert kills and any('was lost' in m for m in messages)
    undisturbed = run_calibration(network, ds, s.calibrate, 'data', dense, dict(dataset='x'), log=messages.append)
    assert sorted(undisturbed) == sorted(killed) == [16, 48]
    assert killed[48].chunks == undisturbed[48].chunks == set(range(6)) and whole[16].chunks == {0, 1}
    for name in ('sum_D', 'sum_y', 'sum_r2', 'count'):
        assert torch.equal(getattr(killed[48], name), getattr(undisturbed[48], name)), name
    first = calibration.estimate_table(net, ds.images[:48], sigmas, chunk_size=8, chunk_indices=[0, 1], batch_size=16)
    assert whole[16].meta['image_count'] == first.meta['image_count'] == 16 and torch.equal(whole[16].count, first.count)
    # Same images and noise; D differs only by float32 rounding (the actor runs torch on 1 thread).
    for name, rtol in (('sum_y', 1e-12), ('sum_D', 1e-6), ('sum_r2', 1e-6)):
        a, b = getattr(whole[16], name), getattr(first, name)
        assert float((a - b).abs().max()) <= rtol * float(b.abs().max()), name
    # Generated source: image i is the sample of seed i, so the 8-image table's clean images are
    # exactly the first 8 samples, however the chunks were spread over actors.
    gen_spec = _spec(tmp_path, 'g.yaml', calibrate=dict(TINY['calibrate'], images=[8, 16], source='generated',
                                                        generation=dict(sampler='edm', num_steps=3)))
    gen = run_calibration(network, ds, gen_spec.calibrate, 'generated', sigmas, dict(dataset='x'), log=messages.append)
    samples = calibration.generated_dataset(net, 8, sampler='edm', num_steps=3).images
    assert gen[8].meta['source'] == 'generated' and gen[16].chunks == {0, 1} and int(gen[8].count[0, 0]) == 8
    expected_sum_y = data.to_model_range(samples).to(torch.float64).sum(0)
    # (a pixel may round to the next uint8 level across thread counts: 2/255 in model range)
    assert float((gen[8].sum_y[0, 0] - expected_sum_y).abs().max()) <= 0.02


SNAPSHOTS = os.path.join(os.path.dirname(__file__), '..', '..', 'shared', 'data', 'edm-snapshots')
CIFAR_NPZ = os.path.join(os.path.dirname(__file__), '..', '..', 'shared', 'data', 'cifar10', 'derived',
                         'cifar10_batch_prefixes_subset.npz')


@pytest.mark.skipif(not (os.path.isdir(SNAPSHOTS) and os.path.isfile(CIFAR_NPZ)),
                    reason='../shared/data (EDM snapshots, CIFAR-10 subset) is not beside this checkout')
def test_edm_snapshot_calibrated_and_swept_end_to_end(ray_cluster, tmp_path):
    """A conditional EDM snapshot (ADM, written by EDM's own code) through the orchestrator:
    calibrated on CIFAR-10 images with their labels, per class and pooled from one estimate,
    swept with labels drawn per seed, measured against published-format statistics."""
    import numpy as np
    stats = tmp_path / 'stats.npz'
    np.savez(stats, mu=np.zeros(2048), sigma=np.eye(2048))
    raw = dict(experiment='edm-fixture', seed=0,
               data=dict(name='cifar10-npz', root=CIFAR_NPZ, resolution=16),
               model=dict(checkpoint=os.path.join(SNAPSHOTS, 'adm-edm-cond.pkl')),
               calibrate=dict(images=30, chunk_size=10, actors=2, batch_size=10, per_class=[False, True]),  # every class
               sweep=dict(samplers=[dict(sampler='edm', num_steps=3)], calibrated=[False, True]),
               evaluate=dict(num_images=4, batch_size=4, reference_stats=str(stats)))
    path = tmp_path / 'edm.yaml'
    path.write_text(yaml.safe_dump(raw))
    s = spec.load(str(path))
    root = str(tmp_path / 'results')
    stages = runner.run(s, results_root=root)
    assert [st.name for st in stages] == ['checkpoint', 'calibrate', 'reference', 'sweep']
    sweep = results.read_table(root, 'edm-fixture', 'sweep')
    assert len(sweep) == 3 and sweep['fid'].notna().all() and (sweep['nfe'] == 5).all()
    assert set(sweep['calibration_per_class'].dropna()) == {False, True}
    assert (sweep['reference_sha256'] == checkpoints.sha256_file(str(stats))).all()
    table = calibration.CalibrationTable.load(next(iter(runner.plan.make_plan(s, root)[1].outputs()['tables'].values())))
    assert table.num_classes == 10 and int(table.count.sum(0)[0]) == 30 and (table.count[:, 0] > 0).all()
    # Per-class and pooled calibration differ, and the pooled term is the class-weighted mean.
    assert len(set(sweep['fid'].round(6))) == 3
    pooled = table.offset()[0]
    per_class = table.offset(per_class=True)
    weights = table.count[:, 0].to(torch.float64) / 30
    assert torch.allclose((weights.reshape(-1, 1, 1, 1, 1) * per_class).sum(0), pooled, atol=1e-9)


@needs_fashion
def test_reduced_quickstart_end_to_end_and_reuse(ray_cluster, tmp_path):
    """The whole pipeline on a tiny spec: Parquet tables with the documented columns, one sweep
    row per Tune trial, figures from those rows; a second run reuses every stage."""
    s = _spec(tmp_path)
    root = str(tmp_path / 'results')
    runner.run(s, results_root=root)
    sweep = results.read_table(root, 'tiny', 'sweep')
    assert len(sweep) == len(s.trials()) == 4
    assert set(results.PROVENANCE) <= set(sweep.columns)
    assert {'label', 'sampler', 'calibrated', 'params', 'nfe', 'fid', 'num_samples', 'weights_sha256', 'wall_time'} <= set(sweep.columns)
    assert sorted(sweep['nfe']) == [4, 4, 6, 6] and sweep['fid'].notna().all() and (sweep['num_samples'] == 6).all()
    # What each trial walked: DPM-Solver's outer steps, and its grid's end (t_end = 1e-3 on the linear VP: steps <= 15).
    assert sorted(sweep['distinct_steps']) == [4, 4, 6, 6]
    assert sweep['sigma_end'].tolist() == pytest.approx([float(schedules.VPLinearNoiseSchedule().sigma(1e-3))] * 4, rel=1e-12)
    assert sweep['note'].str.contains('6 samples < 2048 feature dimensions').all()  # small-sample FID is labelled
    # KID and precision/recall need the reference stage's features, which it keeps when asked.
    assert sweep[['kid_mean', 'kid_std', 'precision', 'recall']].notna().all().all()
    cal = results.read_table(root, 'tiny', 'calibration')
    assert {'source', 'table_images', 'sigma', 'images', 'c_norm2', 'mean_eps_norm2', 'mean_eps_norm2_se'} <= set(cal.columns)
    assert (cal['images'] == 48).all() and (cal['table_images'] == 48).all() and (cal['source'] == 'data').all()
    assert set(sweep[sweep['calibrated']]['calibration_images']) == {48}
    log = results.read_table(root, 'tiny', 'train_log')
    assert {'kimg', 'loss', 'img_per_sec', 'config'} <= set(log.columns) and log['kimg'].iloc[-1] == pytest.approx(0.128)
    md = open(os.path.join(root, 'tiny', 'sweep.md')).read()
    for value in sweep['fid']:
        assert f'{value:.2f}' in md  # the table is made from the Parquet rows
    assert os.path.getsize(os.path.join(root, 'tiny', 'fid_vs_nfe.png')) > 1000
    # Each trial's sample grid (min(64, 6) images: the 6 it measured) beside the tables, and the sheet of them.
    assert all(os.path.isfile(os.path.join(root, 'tiny', p)) for p in sweep['samples'])
    assert os.path.getsize(os.path.join(root, 'tiny', 'samples.png')) > 1000
    assert os.path.getsize(os.path.join(root, 'tiny', 'samples', 'train-0.128kimg.png')) > 100  # the trained network's 64
    # run.json, and `show` from storage alone: a finished run, every stage done, the best rows.
    record = json.load(open(os.path.join(root, 'tiny', 'run.json')))
    assert record['status'] == 'done' and [d['name'] for d in record['stages_done']] == ['train', 'calibrate', 'reference', 'sweep']
    assert record['sweep']['trials_done'] == 4 and record['sweep']['best']['fid'] == pytest.approx(
        min(json.loads(b)[0] for b in sweep['fid_blocks']))  # the best first-block value the trials reported
    shown = '\n'.join(results.show(root, 'tiny'))
    assert 'last run: done' in shown and shown.count(' done (ran in this run') == 4
    assert f'{sweep["fid"].min():.6f}' in shown

    runner.run(s, results_root=root)
    timings = results.read_table(root, 'tiny', 'timings')
    assert set(timings['status']) == {'reused'}
    assert results.read_table(root, 'tiny', 'sweep')['fid'].tolist() == sweep['fid'].tolist()

    # Trial by trial: with two trials' rows gone (as after a driver killed mid-sweep) and the
    # calibration table of one of them missing, the re-run runs only those two; the one that
    # fails is named, the other three rows land in Parquet, and the next run retries only it.
    sweep_stage = [st for st in runner.plan.make_plan(s, root) if st.name == 'sweep'][0]
    os.remove(sweep_stage.storage.path(sweep_stage.key, 'DONE.json'))
    by_label = dict(zip(sweep['label'], sweep['trial_hash']))
    failing = [label for label in by_label if 'calibrated' in label and 'steps=4' in label][0]
    rerun = [label for label in by_label if 'calibrated' not in label and 'steps=6' in label][0]
    for label in (failing, rerun):
        os.remove(os.path.join(root, '.trials', by_label[label] + '.json'))
    table = runner.plan.make_plan(s, root)[1].outputs()['tables'][spec.table_key(s.train.total_kimg, 'data', 48)]
    messages = []

    def log(message):  # the table goes missing once the sweep starts (its stage stays finished)
        messages.append(message)
        if message.startswith('== sweep'):
            os.rename(table, table + '.away')
    with pytest.raises(runner.StageFailed, match=r'sweep: 1 trial\(s\) failed: ' + re.escape(failing)):
        runner.run(s, results_root=root, log=log)
    assert any('2 of 4 trial(s) finished before and reused; 2 to run' in m for m in messages)
    shown = '\n'.join(results.show(root, 'tiny'))
    assert 'last run: failed in stage sweep' in shown and f'StageFailed: sweep: 1 trial(s) failed: {failing}' in shown, shown
    assert re.search(r'sweep +[0-9a-f]{16} +failed', shown) and re.search(r'train +[0-9a-f]{16} +done \(reused', shown), shown
    partial = results.read_table(root, 'tiny', 'sweep')
    assert len(partial) == 4 and partial['fid'].notna().sum() == 3
    assert 'table-data-48.pt: no such file' in partial.set_index('label').loc[failing, 'error']
    assert partial.set_index('label').loc[rerun, 'fid'] == sweep.set_index('label').loc[rerun, 'fid']  # same seeds
    os.rename(table + '.away', table)
    messages = []
    runner.run(s, results_root=root, log=messages.append)
    assert any('3 of 4 trial(s) finished before and reused; 1 to run' in m for m in messages)
    assert results.read_table(root, 'tiny', 'sweep').set_index('label')['fid'].to_dict() == sweep.set_index('label')['fid'].to_dict()


@needs_fashion
def test_training_snapshots_calibrated_and_swept_end_to_end(ray_cluster, tmp_path):
    """train.snapshots_kimg through the orchestrator: one calibration table per snapshot (on the
    snapshot's own network), every sweep row naming its snapshot, a likelihood row per table, and
    training_progress.png / .md made from those rows."""
    s = _spec(tmp_path, train=dict(snapshots_kimg=[0.064]),
              sweep=dict(samplers=[dict(sampler='dpm_solver', order=2, method='multistep', steps=4)], calibrated=[False, True]),
              evaluate=dict(num_images=4, reference_images=8, batch_size=8, seed_blocks=2))
    root = str(tmp_path / 'results')
    stages = runner.run(s, results_root=root)
    sweep = results.read_table(root, 'tiny', 'sweep')
    assert sorted(zip(sweep['snapshot_kimg'], sweep['calibrated'])) == [(0.064, False), (0.064, True), (0.128, False), (0.128, True)]
    assert sweep['fid_blocks'].map(lambda v: len(json.loads(v))).eq(2).all() and (sweep['seed_blocks'] == 2).all()
    cal = results.read_table(root, 'tiny', 'calibration')
    assert sorted(cal['snapshot_kimg'].unique()) == [0.064, 0.128]
    likelihood = results.read_table(root, 'tiny', 'likelihood')
    assert sorted(likelihood['snapshot_kimg']) == [0.064, 0.128] and (likelihood['likelihood_gain_nats'] > 0).all()
    # Each snapshot's table was estimated on that snapshot's network.
    outputs = {st.name: st.outputs() for st in stages}
    for kimg in (0.064, 0.128):
        snapshot = outputs['train']['snapshots'][spec.snapshot_key(kimg)]
        table = calibration.CalibrationTable.load(outputs['calibrate']['tables'][spec.table_key(kimg, 'data', 48)])
        net = checkpoints.load_denoiser(snapshot['network'])
        assert table.meta['snapshot_kimg'] == kimg and table.meta['model'] == calibration.fingerprint(net)
    assert torch.load(outputs['train']['snapshots']['0.064kimg']['network'], weights_only=True)['cur_nimg'] == 64
    for name in ('training_progress.png', 'training_progress.md'):
        assert os.path.isfile(os.path.join(root, 'tiny', name))
    md = open(os.path.join(root, 'tiny', 'training_progress.md')).read()
    assert md.count('| 0.064 |') == 1 and md.count('| 0.128 |') == 1


@needs_fashion
def test_submit_runs_the_spec_as_a_ray_job(ray_cluster, tmp_path, capsys):
    """`orchestrator submit --wait` ships the tracked sources and a spec from outside the project
    to the cluster's job server (here the embedded cluster's dashboard) and exits with the job's
    status; a stray untracked file is never shipped."""
    from orchestrator import cli, submit
    stray = os.path.join(submit.ROOT, f'.env-stray-{os.getpid()}')
    with open(stray, 'w') as f:
        f.write('SECRET=1\n')
    try:
        files, size = submit.make_package('tests/specs/tiny-train.yaml', str(tmp_path / 'package'))
    finally:
        os.remove(stray)
    assert os.path.basename(stray) not in files and 'orchestrator/cli.py' in files and submit.JOB_SPEC in files
    assert not any(f.startswith(('.venv/', 'results/.trials')) or '/stages/' in f for f in files) and size < 50 * 2 ** 20
    outside = tmp_path / 'elsewhere.yaml'  # a spec that is not in the project folder
    outside.write_text(open('tests/specs/tiny-train.yaml').read())
    # The job runs on the cluster's own interpreter; here that is this virtual environment's,
    # which a plain `python` on PATH need not be (CI's PATH has no .venv/bin).
    code = cli.main(['submit', str(outside), '--address', ray_cluster, '--results', str(tmp_path / 'job-results'),
                     '--python', sys.executable, '--wait', '--stall-timeout', '300'])  # (the job's run must take it)
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    assert re.search(r'submitted job \S+: \d+ files, [\d.]+ MiB', out) and '== train' in out and 'SUCCEEDED' in out


@needs_fashion
def test_impossible_requests_stop_before_any_stage(ray_cluster, tmp_path):
    """On the embedded (CPU-only, fixed-size) cluster a GPU request, or more reference images than
    the split holds, is refused with the field before anything is written or run."""
    root = tmp_path / 'results'
    with pytest.raises(spec.SpecError, match=r'sweep.resources.gpu: asks 1 GPU per sweep trial, the cluster has 0 GPU'):
        runner.run(_spec(tmp_path, sweep=dict(TINY['sweep'], resources=dict(cpu=1, gpu=1))), results_root=str(root))
    with pytest.raises(spec.SpecError, match=r'evaluate.reference_images: 100000 images asked for, but fashion-mnist train holds 60000'):
        runner.run(_spec(tmp_path, 'r.yaml', evaluate=dict(TINY['evaluate'], reference_images=100000)), results_root=str(root))
    assert not root.exists()


@needs_fashion
@pytest.mark.parametrize('stage', ['train', 'calibrate', 'sweep'])
def test_ctrl_c_stops_the_run_cleanly_in_any_stage(tmp_path, stage, ray_subprocess):
    """Ctrl-C (SIGINT to the terminal's process group: the driver and every Ray process it
    started) during training, calibration or the sweep: the run stops within seconds with exit
    status 130 and one line, no traceback, no Ray process left, the stage not marked done and the
    experiment lock released. (Ray Train and Tune each install a SIGINT handler that ends their
    loop and returns as if finished; the orchestrator keeps Ctrl-C for itself.)"""
    root = tmp_path / 'results'
    raw = yaml.safe_load(yaml.safe_dump(TINY))
    raw['train'].update(total_kimg=2.0)
    raw['calibrate'].update(images=512)
    if stage != 'train':  # a model file instead of training: the later stages come sooner
        ds = data.load_dataset('fashion-mnist', pad_to_32=True, resolution=16, limit=64)
        tasks_train.train(tasks_train.TrainConfig(batch_size=16, total_kimg=0.016, kimg_per_tick=0.016), ds, str(tmp_path),
                          progress=False)
        raw['model'] = dict(checkpoint=str(tmp_path / tasks_train.NETWORK))
        raw['calibrate'].update(images=16 if stage == 'sweep' else 512)
        raw['evaluate'].update(num_images=64, kid=False, precision_recall=False)  # (KID would need 64 reference images)
    path = tmp_path / 'ctrlc.yaml'
    path.write_text(yaml.safe_dump(raw))
    # As a terminal's foreground job: SIGINT at its default (a shell's background job, as this suite
    # may be, starts its children with SIGINT ignored, and Python keeps it so).
    run = ('import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); '
           f'sys.argv = ["orchestrator", "run", {str(path)!r}, "--results", {str(root)!r}]; '
           'runpy.run_module("orchestrator", run_name="__main__")')
    proc = subprocess.Popen([sys.executable, '-c', run],
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)  # its own process group
    out = []
    reader = threading.Thread(target=lambda: out.extend(iter(lambda: proc.stdout.read(1), '')), daemon=True)
    reader.start()
    deadline = time.time() + 240
    while f'== {stage} (' not in ''.join(out) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, ''.join(out)[-3000:]
    time.sleep(2.0)  # into the stage's work
    os.killpg(proc.pid, signal.SIGINT)
    interrupted = time.time()
    rc = proc.wait(timeout=60)
    took = time.time() - interrupted
    reader.join(5)
    text = ''.join(out)
    assert rc == 130, text[-3000:]
    assert 'interrupted: run stopped' in text and 'Traceback' not in text, text[-3000:]
    assert took < 30, took
    time.sleep(1.0)
    # The embedded cluster's processes carry the driver's pid in their session name.
    left = subprocess.run(['pgrep', '-f', rf'session_[0-9_-]+_{proc.pid}\b'], capture_output=True, text=True).stdout.split()
    assert not left, left
    stage_dirs = glob.glob(str(root / 'tiny' / 'stages' / f'{stage}-*'))
    assert stage_dirs and not any(os.path.exists(os.path.join(d, 'DONE.json')) for d in stage_dirs)
    assert not (root / 'tiny' / '.lease.json').exists()


@needs_fashion
def test_non_finite_results_fail_their_stage_in_one_line(ray_cluster, tmp_path):
    """Field reports: NaN samples scored as black images (FID 784, exit 0). Now a sweep trial
    whose samples are not finite gets an error row (not retried: the same seeds fail the same way)
    and the run fails naming it; calibration on a network whose D is not finite and training whose
    loss is not finite stop their stage with one line naming the sigma or the tick."""
    ds = data.load_dataset('fashion-mnist', pad_to_32=True, resolution=16, limit=32)
    tasks_train.train(tasks_train.TrainConfig(batch_size=16, total_kimg=0.016, kimg_per_tick=0.016), ds, str(tmp_path),
                      progress=False)
    blob = torch.load(tmp_path / tasks_train.NETWORK, weights_only=True)
    blob['ema'] = {k: v.fill_(float('nan')) if v.is_floating_point() else v for k, v in blob['ema'].items()}
    torch.save(blob, tmp_path / 'nan.pt')
    root = str(tmp_path / 'results')
    messages = []
    sweep_only = _spec(tmp_path, 'nan.yaml', model=dict(checkpoint=str(tmp_path / 'nan.pt')), calibrate=None,
                       sweep=dict(samplers=[dict(sampler='edm', num_steps=3)], calibrated=[False], max_failures=2),
                       evaluate=dict(num_images=4, reference_images=8, batch_size=4))
    with pytest.raises(runner.StageFailed, match=re.escape(
            'sweep: 1 trial(s) failed: edm num_steps=3 @ 0.016 kimg. The other rows are in')):
        runner.run(sweep_only, results_root=root, log=messages.append)
    row = results.read_table(root, 'tiny', 'sweep').iloc[0]
    assert row['error'] == ('NonFiniteSamples: 4 of the 4 samples of seeds 0..3 are not finite (edm num_steps=3); the '
                            'denoiser first returned non-finite values at sigma 80'), row['error']
    assert 'fid' not in row or pd.isna(row['fid'])
    assert not any('retrying' in m for m in messages)  # deterministic: Tune did not run it again

    calibrate_only = _spec(tmp_path, 'nan-cal.yaml', model=dict(checkpoint=str(tmp_path / 'nan.pt')), sweep=None)
    # Two actors work on chunks 0 and 1 at once: the stage stops at whichever fails first.
    with pytest.raises(runner.StageFailed, match=r'calibrate \(data\): the denoiser returned non-finite values at sigma '
                                                  r'[\d.e+-]+ for images (0\.\.7 \(chunk 0\)|8\.\.15 \(chunk 1\)); no table is '
                                                  r'made from them'):
        runner.run(calibrate_only, results_root=root, log=messages.append)

    diverging = _spec(tmp_path, 'nan-train.yaml', train=dict(TINY['train'], loss_kwargs=dict(P_mean=1000.0), max_failures=2),
                      calibrate=None, sweep=None)
    started = time.time()
    with pytest.raises(runner.StageFailed, match=re.escape('training: the loss is not finite at tick 0 (0.032 kimg')):
        runner.run(diverging, results_root=root, log=messages.append)
    assert time.time() - started < 120  # stopped at once, not after Ray Train's retries
    stages = runner.plan.make_plan(diverging, root)
    assert not stages[0].done
