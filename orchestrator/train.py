"""Train stage: Ray Train V2 TorchTrainer around tasks.train.train.

Each worker loads the data, trains its share of every batch (DDP when there are several),
and reports every tick through ray.train.report; rank 0 attaches the checkpoint it just wrote.
FailureConfig restarts failed workers, which resume from ray.train.get_checkpoint(); a restarted
run (the same stage re-run after a crash) resumes from the newest checkpoint in its storage.
"""
import contextlib
import dataclasses
import datetime
import glob
import json
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

from orchestrator.results import write_json
from tasks import data as data_mod
from tasks import train as tasks_train

PROGRESS = 'progress.json'


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


def _train_worker(config):
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if world_size > 1:
        init_process_group(rank, world_size, device)
    dataset = data_mod.load_dataset(**config['data'])
    run_dir = os.path.join(config['run_dir'], f'rank{rank}')
    os.makedirs(run_dir, exist_ok=True)

    # Every rank starts from the same state: the last checkpoint Ray Train registered, the stage's
    # newest one, or none. A state file an attempt wrote but died before reporting would put this
    # rank ahead of the others, and DDP would then wait forever for the ranks behind.
    checkpoint, local = ray.train.get_checkpoint(), os.path.join(run_dir, tasks_train.CHECKPOINT)
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            shutil.copy(os.path.join(d, tasks_train.CHECKPOINT), local)
    elif config.get('resume_from'):
        shutil.copy(config['resume_from'], local)
    elif os.path.exists(local):
        os.remove(local)

    def wrap_ddp(net):
        ids = [device] if device.type == 'cuda' else None
        return torch.nn.parallel.DistributedDataParallel(net, device_ids=ids)

    def on_tick(record, checkpoint_path):
        if rank == 0:  # what the driver's progress bar shows (run_train_stage polls it)
            write_json(os.path.join(config['run_dir'], PROGRESS), record)
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
        tasks_train.train(tasks_train.TrainConfig(**config['train']), dataset, run_dir, device=device, resume=True,
                          progress=False, on_tick=on_tick, rank=rank, world_size=world_size,
                          wrap_ddp=wrap_ddp if world_size > 1 else None, data_info=config.get('data_info'))
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


@contextlib.contextmanager
def progress_bar(path, total_kimg):
    """A driver-side bar in kimg, fed by the progress file rank 0 writes every tick."""
    from tqdm import tqdm
    bar = tqdm(total=total_kimg, unit='kimg', desc='train', bar_format='{desc}: {percentage:3.0f}%|{bar}| '
               '{n:.1f}/{total:.1f} kimg [{elapsed}<{remaining}{postfix}]')
    stop = threading.Event()

    def refresh():
        try:
            with open(path) as f:
                record = json.load(f)
        except (OSError, ValueError):
            return  # not written yet, or being replaced
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


def latest_checkpoint(storage):
    """The newest training-state.pt under a stage's Ray storage, or None."""
    paths = glob.glob(os.path.join(storage, '**', tasks_train.CHECKPOINT), recursive=True)
    return max(paths, key=os.path.getmtime) if paths else None


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


def run_train_stage(stage_dir, config, data, workers=1, cpus_per_worker=1.0, use_gpu='auto', max_failures=2):
    """Train `config` (tasks.train.TrainConfig) on the dataset of `data` (tasks.data.load_dataset
    keyword arguments) with Ray Train; returns ({kimg: network file in stage_dir} for every snapshot
    and the final network (total_kimg: network.pt), device used)."""
    use_gpu = ray.cluster_resources().get('GPU', 0) >= workers if use_gpu == 'auto' else use_gpu
    storage = os.path.abspath(os.path.join(stage_dir, 'ray'))
    loop_config = dict(data=data, train=dataclasses.asdict(config), run_dir=os.path.abspath(os.path.join(stage_dir, 'workers')),
                       resume_from=latest_checkpoint(storage), data_info=dict(name=data['name']))
    trainer = ray.train.torch.TorchTrainer(
        _train_worker, train_loop_config=loop_config, torch_config=_OwnProcessGroup(),
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                               resources_per_worker=dict(CPU=cpus_per_worker)),
        run_config=ray.train.RunConfig(name='train', storage_path=storage,
                                       failure_config=ray.train.FailureConfig(max_failures=max_failures),
                                       checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2)))
    with progress_bar(os.path.join(loop_config['run_dir'], PROGRESS), config.total_kimg):
        result = _fit(trainer)
    if result.error is not None:
        raise result.error
    with result.checkpoint.as_directory() as d:
        shutil.copy(os.path.join(d, tasks_train.NETWORK), os.path.join(stage_dir, tasks_train.NETWORK))
    # Snapshots are written by rank 0 into its run folder (on the results root: shared storage).
    snapshots = {config.total_kimg: os.path.join(stage_dir, tasks_train.NETWORK)}
    for k in config.snapshots_kimg:
        if k < config.total_kimg:
            name = tasks_train.snapshot_name(k)
            source = os.path.join(loop_config['run_dir'], 'rank0', name)
            if not os.path.isfile(source):
                raise RuntimeError(f'{source}: the {k:g}-kimg snapshot is missing: is the results root shared storage '
                                   'that every node writes to?')
            shutil.copy(source, os.path.join(stage_dir, name))
            snapshots[k] = os.path.join(stage_dir, name)
    return snapshots, 'cuda' if use_gpu else 'cpu'
