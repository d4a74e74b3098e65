"""The model stages: train (Ray Train V2 TorchTrainer around tasks.train.train) or checkpoint
(a model the spec names), and the train_log table.

Each training worker takes the dataset from Ray's object store (the driver loaded it once),
trains its share of every batch (DDP when there are several) in a folder of its own node, and
reports every tick through ray.train.report; rank 0 attaches the checkpoint it just wrote, which
Ray Train keeps under the stage's storage (the results root: a path every node shares, or object
storage), uploads each snapshot there as soon as it is written, and tells the driver's progress
bar its tick through a small actor. FailureConfig restarts failed workers, which resume from
ray.train.get_checkpoint(); a restarted run (the same stage re-run after a crash) resumes from the
newest checkpoint in the stage's storage.
"""
import contextlib
import dataclasses
import datetime
import os
import shutil
import socket
import tempfile
import threading

import ray
import ray.train
import ray.train.backend
import ray.train.collective
import ray.train.torch
import torch

from orchestrator import results
from orchestrator.spec import StageFailed, snapshot_key
from orchestrator.storage import fetch, stage_input
from tasks import checkpoints, data, samplers
from tasks import train as tasks_train


class _OwnProcessGroup(ray.train.torch.TorchConfig):
    """Ray Train's torch set-up (device placement) without its process group: Ray's makes a
    TCPStore that listens on every interface. The train function makes the group itself
    (init_process_group below), its store bound to rank 0's node address only."""

    @property
    def backend_cls(self):
        return ray.train.backend.Backend  # no on_start: no process group made by Ray


def init_process_group(rank, world_size, device):
    """The workers' torch process group. Rank 0 binds the store's socket to its node address
    (127.0.0.1 on the embedded cluster, see runner.init_ray) and passes the address to the other
    ranks through Ray Train's broadcast; the gloo/NCCL sockets follow GLOO/NCCL_SOCKET_IFNAME."""
    sock = address = None
    if rank == 0:
        host = ray.util.get_node_ip_address()
        sock = socket.socket(socket.AF_INET6 if ':' in host else socket.AF_INET)
        sock.bind((host, 0))
        address = host, sock.getsockname()[1]
    host, port = ray.train.collective.broadcast_from_rank_zero(address)
    timeout = datetime.timedelta(minutes=30)
    store = torch.distributed.TCPStore(host, port, world_size, is_master=rank == 0, timeout=timeout,
                                       master_listen_fd=sock.detach() if sock else None)  # the store owns the socket now
    torch.distributed.init_process_group('nccl' if device.type == 'cuda' else 'gloo', store=store, rank=rank,
                                         world_size=world_size, timeout=timeout)


@ray.remote(num_cpus=0)
class ProgressBoard:
    """Rank 0's latest tick record, for the driver's progress bar (whatever node rank 0 is on),
    and the error that stopped training when it is one that a restart would only repeat."""

    def __init__(self):
        self.record = self.error = None

    def report(self, record):
        self.record = record

    def latest(self):
        return self.record

    def fail(self, error):
        self.error = self.error or error

    def failure(self):
        return self.error


def on_driver_node(actor_class):
    """The actor class pinned to the driver's node: a helper of the driver's must not live on a
    worker node the cluster may lose (the run would end with the node, not retry; a multi-node test
    saw it when the board landed on the removed node)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    return actor_class.options(scheduling_strategy=NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(),
                                                                                  soft=False))


def _train_worker(config):
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if world_size > 1:
        init_process_group(rank, world_size, device)
    dataset = ray.get(config['dataset'])
    storage, key = config['storage'], config['stage_key']
    run_dir = tempfile.mkdtemp(prefix=f'calib-edm-train-rank{rank}-')  # this node's; what must last goes to storage
    # Every rank starts from the same state: the last checkpoint Ray Train registered, the stage's
    # newest one, or none.
    checkpoint, local = ray.train.get_checkpoint(), os.path.join(run_dir, tasks_train.CHECKPOINT)
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            shutil.copy(os.path.join(d, tasks_train.CHECKPOINT), local)
    elif config.get('resume_from'):
        shutil.copy(fetch(config['resume_from']), local)
    recording = config['train']['recording_table']
    train_config = tasks_train.TrainConfig(**dict(config['train'], recording_table=recording and fetch(recording)))
    snapshots = {tasks_train.snapshot_name(k): k for k in train_config.snapshots_kimg}
    tracking = None
    if config.get('mlflow'):
        from ray.air.integrations.mlflow import setup_mlflow
        tracking = setup_mlflow(dataclasses.asdict(train_config), **config['mlflow'])  # a no-op on ranks other than 0

    def wrap_ddp(net):
        ids = [device] if device.type == 'cuda' else None
        return torch.nn.parallel.DistributedDataParallel(net, device_ids=ids)

    def on_tick(record, checkpoint_path):
        if rank == 0:
            # A snapshot reaches storage before any later checkpoint is registered, so a restart
            # from that checkpoint (which never writes it again) finds it there.
            for name in set(snapshots) & set(os.listdir(run_dir)):
                storage.upload(os.path.join(run_dir, name), f'{key}/{name}')
                save_train_samples(storage, key, os.path.join(run_dir, name), snapshots.pop(name), device)
            config['progress'].report.remote(record)
            if tracking is not None:
                tracking.log_metrics({k: record[k] for k in ('loss', 'kimg', 'img_per_sec', 'lr')}, step=record['tick'])
        if checkpoint_path is None:
            ray.train.report(record)
            return
        with tempfile.TemporaryDirectory() as d:
            shutil.copy(checkpoint_path, d)
            network = os.path.join(os.path.dirname(checkpoint_path), tasks_train.NETWORK)
            if os.path.exists(network):
                shutil.copy(network, d)
            ray.train.report(record, checkpoint=ray.train.Checkpoint.from_directory(d))

    try:
        tasks_train.train(train_config, dataset, run_dir, device=device, resume=True,
                          progress=False, on_tick=on_tick, rank=rank, world_size=world_size,
                          wrap_ddp=wrap_ddp if world_size > 1 else None, data_info=config.get('data_info'))
        if rank == 0:
            save_train_samples(storage, key, os.path.join(run_dir, tasks_train.NETWORK), train_config.total_kimg, device)
    except tasks_train.NonFiniteLoss as e:  # deterministic: told to the driver (every rank stops at once), not retried
        ray.get(config['progress'].fail.remote(str(e)))  # delivered before this worker ends
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        shutil.rmtree(run_dir, ignore_errors=True)


def save_train_samples(storage, stage_key, network, kimg, device):
    """<experiment>/samples/train-<kimg>.png: 64 samples (seeds 0..63, EDM's deterministic 18-step
    sampler) of a snapshot, on the worker that wrote it (its device)."""
    net = checkpoints.load_denoiser(network, 'network.pt').to(device)
    images, _ = samplers.generate(net, range(64), 'edm', device=device, num_steps=18)
    experiment = stage_key.split('/')[0]
    storage.write_file(f'{experiment}/samples/train-{kimg:g}kimg.png', lambda path: data.save_image_grid(
        data.to_uint8(images), path, nrow=8, upscale=max(1, 64 // images.shape[-1])))


@contextlib.contextmanager
def progress_bar(board, total_kimg):
    """A driver-side bar in kimg, fed by what rank 0 reports to `board` every tick."""
    from tqdm import tqdm
    bar = tqdm(total=total_kimg, unit='kimg', desc='train', bar_format='{desc}: {percentage:3.0f}%|{bar}| '
               '{n:.1f}/{total:.1f} kimg [{elapsed}<{remaining}{postfix}]')
    stop = threading.Event()

    def refresh():
        try:
            record = ray.get(board.latest.remote(), timeout=5)
        except ray.exceptions.RayError:
            return
        if record is not None:
            bar.n = min(record['kimg'], total_kimg)
            bar.set_postfix_str(f'loss {record["loss"]:.4f}, {record["img_per_sec"]:.0f} img/s')

    def poll():
        while not stop.wait(1.0):
            refresh()

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield bar
    finally:
        stop.set()
        thread.join()
        refresh()
        bar.close()


def latest_checkpoint(storage, key):
    """The newest training-state.pt under a stage's Ray Train storage (its URI), or None."""
    found = [(mtime, k) for k, mtime in storage.files(key) if k.endswith('/' + tasks_train.CHECKPOINT)]
    return storage.uri(max(found)[1]) if found else None


def _fit(trainer):
    """trainer.fit() in a helper thread. On the main thread Ray Train installs a SIGINT handler
    of its own (kept after fit) that aborts training and returns as if it had finished; here Ctrl-C
    raises KeyboardInterrupt on the main thread, as in every other stage (cli.main stops the run)."""
    outcome = {}

    def fit():
        try:
            outcome['result'] = trainer.fit()
        except BaseException as e:  # handed to the main thread
            outcome['error'] = e
    thread = threading.Thread(target=fit, name='train-fit', daemon=True)  # daemon: never holds up the exit
    thread.start()
    thread.join()
    if 'error' in outcome:
        raise outcome['error']
    return outcome['result']


def run_train_stage(stage, upstream, dataset, opts):
    """Train the stage's config (tasks.train.TrainConfig) on `dataset` with Ray Train. Outputs:
    every snapshot's network (URI or path under the stage's storage) by snapshot key, the final
    one, and the device used."""
    storage, key, o = stage.storage, stage.key, stage.options
    config = tasks_train.TrainConfig(**dict(stage.inputs['config'], recording_table=o['recording_table']))
    workers = stage.inputs['workers']
    use_gpu = ray.cluster_resources().get('GPU', 0) >= workers if o['use_gpu'] == 'auto' else o['use_gpu']
    recording = config.recording_table and stage_input(storage, config.recording_table, stage.inputs['config']['recording_table'])
    board = on_driver_node(ProgressBoard).remote()
    # MLflow (report.mlflow): rank 0 logs every tick to the stage's run, which the driver finds by its tags.
    mlflow = opts.tracker and dict(opts.tracker.train_setup(), tags=dict(stage='train', stage_hash=stage.hash))
    loop_config = dict(dataset=ray.put(dataset), train=dict(dataclasses.asdict(config), recording_table=recording),
                       storage=storage, stage_key=key, progress=board, mlflow=mlflow,
                       resume_from=latest_checkpoint(storage, f'{key}/ray'), data_info=dict(name=stage.inputs['data']['name']))
    trainer = ray.train.torch.TorchTrainer(
        _train_worker, train_loop_config=loop_config, torch_config=_OwnProcessGroup(),
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                               resources_per_worker=dict(CPU=o['cpus_per_worker'])),
        run_config=ray.train.RunConfig(name='train', storage_path=storage.uri(key, 'ray'),
                                       failure_config=ray.train.FailureConfig(max_failures=o['max_failures']),
                                       checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2)))
    try:
        with progress_bar(board, config.total_kimg):
            result = _fit(trainer)
        failure = ray.get(board.failure.remote())
    finally:
        ray.kill(board)
    if failure:
        raise StageFailed(failure)
    if result.error is not None:
        raise result.error
    with result.checkpoint.as_directory() as d:
        storage.upload(os.path.join(d, tasks_train.NETWORK), f'{key}/{tasks_train.NETWORK}')
    snapshots = {config.total_kimg: tasks_train.NETWORK}
    snapshots.update({k: tasks_train.snapshot_name(k) for k in config.snapshots_kimg if k < config.total_kimg})
    for k, name in snapshots.items():
        if not storage.exists(f'{key}/{name}'):
            raise RuntimeError(f'{storage.uri(key, name)}: the {k:g}-kimg snapshot is missing')
    models = {snapshot_key(k): dict(network=storage.uri(key, name), format='network.pt', kimg=k)
              for k, name in sorted(snapshots.items())}
    return dict(network=models[snapshot_key(config.total_kimg)]['network'], format='network.pt',
                device='cuda' if use_gpu else 'cpu', snapshots=models)


def run_checkpoint_stage(stage, upstream, dataset, opts):
    """The model files a spec names, each loaded once here (a file that cannot load fails before
    any work) and made readable by remote code (stage_input)."""
    snapshots = {}
    for path, file in zip(stage.options['paths'], stage.inputs['files']):
        net = checkpoints.load_denoiser(fetch(path, file['sha256']), stage.inputs['format'])
        fmt, kimg = net.source['format'], file['kimg']
        opts.log(f'model: {path} ({fmt}, {type(net).__name__}, {net.img_channels}x{net.img_resolution}x'
                 f'{net.img_resolution}, {net.label_dim} classes, sigma {net.sigma_min:g}..{net.sigma_max:g}'
                 f'{"" if kimg is None else f", {kimg:g} kimg"})')
        snapshots[snapshot_key(kimg)] = dict(network=stage_input(stage.storage, path, file['sha256']), format=fmt, kimg=kimg,
                                             sha256=file['sha256'])
    last = list(snapshots.values())[-1]
    return dict(network=last['network'], format=last['format'], device=None, sha256=last['sha256'], snapshots=snapshots)


def write_train_log(spec, stage, outputs, prov):
    """train_log: one row per training tick of the final network."""
    config, log = tasks_train.read_log(fetch(outputs['network']))
    rows = [dict(r, config=config) for r in log]
    results.write_table(stage.storage, spec.experiment, 'train_log', rows, dict(prov, device=outputs['device']))
