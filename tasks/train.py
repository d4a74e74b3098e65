"""The single-process training loop (EDM training/training_loop.py semantics) that a Ray Train
worker calls. Progress is measured in images (kimg).

Semantics kept from EDM: Adam; learning rate lr * min(cur_nimg / (lr_rampup_kimg * 1000), 1);
loss = sum of the per-element weighted loss / batch size; NaN/inf gradients zeroed/clamped;
EMA with half-life ema_halflife_kimg, ramped up as min(half-life, ema_rampup_ratio * cur_nimg),
beta = 0.5 ** (batch_size / half-life_in_images).

Determinism: the data order and the training noise come from two torch.Generators seeded by
(seed, rank); their states are part of the checkpoint, so a run resumed from a checkpoint
continues exactly as if it had not stopped.
"""
import copy
import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from tasks import calibration
from tasks import data as data_mod
from tasks.files import atomic_write, load_torch_file
from tasks.losses import build_loss
from tasks.precond import build_denoiser


@dataclass
class TrainConfig:
    """Everything that decides a training run (the spec's `model` and `train` sections map onto
    these names; these are the only defaults)."""
    preset: str = 'ddpmpp-tiny'            # tasks.networks.PRESETS
    precond: str = 'edm'                   # vp | ve | iddpm | edm
    loss: str = 'edm'                      # vp | ve | edm
    network_overrides: dict = field(default_factory=dict)
    precond_kwargs: dict = field(default_factory=dict)
    loss_kwargs: dict = field(default_factory=dict)
    cond: bool = False                     # class-conditional (one-hot labels)
    batch_size: int = 128                  # total over all workers
    total_kimg: float = 20.0
    lr: float = 2e-3
    adam_betas: tuple = (0.9, 0.999)
    adam_eps: float = 1e-8
    lr_rampup_kimg: float = 2.0
    ema_halflife_kimg: float = 4.0
    ema_rampup_ratio: Optional[float] = 0.05   # None disables the ramp-up
    hflip: bool = False
    bf16: bool = False                     # bf16 autocast of the network
    channels_last: bool = False
    seed: int = 0
    kimg_per_tick: float = 2.0
    checkpoint_ticks: int = 2
    # EMA networks kept along the way (snapshot_name(k)), each at the first step that reaches k kimg:
    # the network a run of total_kimg = k would end with, bit for bit (nothing depends on total_kimg).
    snapshots_kimg: list = field(default_factory=list)
    dynamic_recording: bool = False        # train h_phi(sigma) alongside (Calib Sec. 3.5)
    recording_lr: float = 1e-3
    recording_table: Optional[str] = None  # CalibrationTable file to log h_phi's MSE against

    def __post_init__(self):
        self.adam_betas = tuple(self.adam_betas)
        if self.batch_size < 1 or self.total_kimg <= 0 or self.lr <= 0:
            raise ValueError(f'batch_size, total_kimg and lr must be positive; got {self.batch_size}, {self.total_kimg}, {self.lr}')
        self.snapshots_kimg = sorted({float(k) for k in self.snapshots_kimg})
        if any(not 0 < k <= self.total_kimg for k in self.snapshots_kimg):
            raise ValueError(f'snapshots_kimg must lie in (0, total_kimg = {self.total_kimg:g}]; got {self.snapshots_kimg}')


CHECKPOINT = 'training-state.pt'
NETWORK = 'network.pt'


def snapshot_name(kimg):
    """The file of the EMA network kept at `kimg` (TrainConfig.snapshots_kimg)."""
    return f'network-{kimg:g}kimg.pt'


def atomic_torch_save(obj, path):
    """torch.save, whole or not at all."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


class NonFiniteLoss(ValueError):
    """The training loss, or a network about to be saved, became NaN or infinite: the run stops
    (nothing after it would mean anything)."""


def check_finite_loss(record, world_size=1):
    """Stop at the first tick whose mean loss is not finite, on every rank at once (the flag is
    reduced over the ranks, so no rank waits for another in a collective that never comes)."""
    finite = torch.tensor(int(torch.isfinite(torch.tensor(record['loss']))))
    if world_size > 1:
        torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
    if not finite:
        raise NonFiniteLoss(f'training: the loss is not finite at tick {record["tick"]} ({record["kimg"]:g} kimg; this '
                            f'rank\'s mean {record["loss"]}); the run stops there (lower lr, check the data and the network)')


def learning_rate(lr, cur_nimg, lr_rampup_kimg):
    """EDM's linear ramp-up: lr * min(cur_nimg / (lr_rampup_kimg * 1000), 1)."""
    return lr * min(cur_nimg / max(lr_rampup_kimg * 1000, 1e-8), 1)


def ema_beta(batch_size, cur_nimg, ema_halflife_kimg, ema_rampup_ratio):
    """EDM's EMA decay per step: 0.5 ** (batch_size / half-life in images), the half-life capped
    at ema_rampup_ratio * cur_nimg early in training."""
    halflife_nimg = ema_halflife_kimg * 1000
    if ema_rampup_ratio is not None:
        halflife_nimg = min(halflife_nimg, cur_nimg * ema_rampup_ratio)
    return 0.5 ** (batch_size / max(halflife_nimg, 1e-8))


def build_network(config, dataset_shape, label_dim):
    channels, resolution = dataset_shape
    return build_denoiser(config.preset, config.precond, img_resolution=resolution, img_channels=channels,
                          label_dim=label_dim, precond_kwargs=config.precond_kwargs, **config.network_overrides)


class _Batches:
    """Shuffled epochs over this worker's share of the dataset, driven by one generator."""

    def __init__(self, num_items, batch_size, generator, rank=0, world_size=1):
        self.num_items, self.batch_size, self.generator = num_items, batch_size, generator
        self.rank, self.world_size = rank, world_size
        self.order, self.pos = None, 0

    def next(self):
        out, count = [], 0
        while count < self.batch_size:
            if self.order is None or self.pos >= len(self.order):
                self.order = torch.randperm(self.num_items, generator=self.generator)[self.rank::self.world_size]
                self.pos = 0
            take = self.order[self.pos:self.pos + self.batch_size - count]
            out.append(take)
            self.pos += len(take)
            count += len(take)
        return torch.cat(out)

    def state_dict(self):
        return dict(order=self.order, pos=self.pos, generator=self.generator.get_state())

    def load_state_dict(self, state):
        self.order, self.pos = state['order'], state['pos']
        self.generator.set_state(state['generator'])


def train(config, dataset, run_dir, device='cpu', resume=True, progress=True, on_tick=None,
          rank=0, world_size=1, wrap_ddp=None, data_info=None):
    """Train a denoiser on `dataset` (tasks.data.ImageDataset, uint8) for config.total_kimg.

    Writes run_dir/training-state.pt every config.checkpoint_ticks ticks and at the end
    (net, EMA, optimizer, progress, every rank's RNG states, resolved config), and
    run_dir/network.pt (EMA weights, config, log) at the end; resumes from training-state.pt when
    `resume`. on_tick(record, checkpoint_path) is called on every rank after each tick, with the
    path of the checkpoint just written (rank 0) or None (the Ray Train wrapper reports them).
    `wrap_ddp(net)` wraps the network for data-parallel training (batch_size is the total over
    `world_size` workers). Returns the list of tick records.
    """
    os.makedirs(run_dir, exist_ok=True)
    device = torch.device(device)
    if config.batch_size % world_size:
        raise ValueError(f'batch_size {config.batch_size} is not divisible by the {world_size} workers')
    batch_gpu = config.batch_size // world_size
    label_dim = dataset.num_classes if config.cond else 0

    data_gen = torch.Generator().manual_seed(config.seed * 1000003 + rank)
    noise_gen = torch.Generator(device).manual_seed(config.seed * 1000003 + rank + 7919)
    torch.manual_seed(config.seed)  # network initialization, identical on every worker
    net = build_network(config, (dataset.channels, dataset.resolution), label_dim).to(device).train()
    if config.channels_last:
        net = net.to(memory_format=torch.channels_last)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    optimizer = torch.optim.Adam(net.parameters(), lr=config.lr, betas=config.adam_betas, eps=config.adam_eps)
    loss_fn = build_loss(config.loss, **config.loss_kwargs)
    batches = _Batches(len(dataset), batch_gpu, data_gen, rank, world_size)
    cur_nimg, log = 0, []
    recorder = reference_table = None
    if config.dynamic_recording:
        recorder = calibration.DynamicRecorder(
            calibration.OffsetNet((dataset.channels, dataset.resolution, dataset.resolution), label_dim).to(device),
            config.recording_lr)
        if config.recording_table:
            reference_table = calibration.CalibrationTable.load(config.recording_table)

    ckpt_path = os.path.join(run_dir, CHECKPOINT)
    if resume and os.path.exists(ckpt_path):
        state = load_torch_file(ckpt_path, map_location=device)
        saved = TrainConfig(**state['config'])
        # total_kimg may grow (train longer) and snapshots change (they do not steer training); the rest must match.
        diff = [k for k in dataclasses.asdict(config) if k not in ('total_kimg', 'snapshots_kimg')
                and getattr(saved, k) != getattr(config, k)]
        if diff:
            raise ValueError(f'{ckpt_path} was written with another config (differs in: {", ".join(diff)}); '
                             f'use another run directory or resume=False')
        if len(state['rank_states']) != world_size:
            raise ValueError(f'{ckpt_path} was written by {len(state["rank_states"])} workers; resume it with as many')
        net.load_state_dict(state['net'])
        ema.load_state_dict(state['ema'])
        optimizer.load_state_dict(state['optimizer'])
        rng = state['rank_states'][rank]
        batches.load_state_dict(rng['batches'])
        noise_gen.set_state(rng['noise_generator'].cpu())
        torch.set_rng_state(rng['torch_rng'].cpu())  # dropout draws from the global generator
        if device.type == 'cuda':
            torch.cuda.set_rng_state(rng['cuda_rng'].cpu(), device)
        cur_nimg, log = state['cur_nimg'], state['log']
        if recorder is not None:
            recorder.h.load_state_dict(state['offset_net'])
            recorder.optimizer.load_state_dict(state['offset_optimizer'])

    ddp = wrap_ddp(net) if wrap_ddp is not None else net
    images_all = dataset.images
    labels_all = dataset.labels
    eye = torch.eye(label_dim, device=device) if label_dim else None
    total_nimg = int(config.total_kimg * 1000)
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm
        bar = tqdm(total=total_nimg, initial=cur_nimg, unit='img', unit_scale=True, desc='train',  # shows k = kimg
                   mininterval=2 if os.isatty(2) else 15)  # log files and Ray's forwarding get few lines

    tick_start_nimg, tick_start_time, tick_losses, tick = cur_nimg, time.time(), [], len(log)
    while cur_nimg < total_nimg:
        idx = batches.next()
        images = data_mod.to_model_range(images_all[idx]).to(device)
        if config.hflip:
            images = data_mod.random_hflip(images, data_gen)
        if config.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = eye[labels_all[idx].to(device)] if label_dim else None

        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16):
            loss, sigma, denoised = loss_fn(ddp, images, labels, generator=noise_gen, return_denoised=True)
        loss.sum().mul(1 / batch_gpu).backward()
        if recorder is not None:
            recorder.update(sigma, denoised, images, labels)
        tick_losses.append(loss.detach().mean())

        for g in optimizer.param_groups:
            g['lr'] = learning_rate(config.lr, cur_nimg, config.lr_rampup_kimg)
        for p in net.parameters():
            if p.grad is not None:
                torch.nan_to_num(p.grad, nan=0, posinf=1e5, neginf=-1e5, out=p.grad)
        optimizer.step()

        beta = ema_beta(config.batch_size, cur_nimg, config.ema_halflife_kimg, config.ema_rampup_ratio)
        with torch.no_grad():
            for p_ema, p_net in zip(ema.parameters(), net.parameters()):
                p_ema.copy_(p_net.detach().lerp(p_ema, beta))

        cur_nimg += config.batch_size
        done = cur_nimg >= total_nimg
        for k in config.snapshots_kimg if rank == 0 else ():
            if cur_nimg - config.batch_size < k * 1000 <= cur_nimg and k * 1000 < total_nimg:  # the last one is NETWORK
                _save_network(run_dir, ema, config, cur_nimg, dataset, label_dim, data_info, recorder, log, snapshot_name(k))
        if bar is not None:
            bar.update(config.batch_size)
        if not done and cur_nimg < tick_start_nimg + config.kimg_per_tick * 1000:
            continue

        # One tick: log, maybe checkpoint.
        elapsed = time.time() - tick_start_time
        record = dict(tick=tick, kimg=cur_nimg / 1000, loss=float(torch.stack(tick_losses).mean()),
                      lr=optimizer.param_groups[0]['lr'], sec_per_kimg=elapsed / max(cur_nimg - tick_start_nimg, 1) * 1000,
                      img_per_sec=(cur_nimg - tick_start_nimg) / max(elapsed, 1e-9), timestamp=time.time())
        check_finite_loss(record, world_size)
        if reference_table is not None:
            record['offset_mse'] = calibration.offset_mse(recorder.h, reference_table)
        log.append(record)
        if bar is not None:
            bar.set_postfix(loss=f'{record["loss"]:.4f}')
        saved = None
        if done or (tick + 1) % config.checkpoint_ticks == 0:
            rng = dict(batches=batches.state_dict(), noise_generator=noise_gen.get_state(), torch_rng=torch.get_rng_state(),
                       cuda_rng=torch.cuda.get_rng_state(device) if device.type == 'cuda' else None)
            rank_states = [rng]
            if world_size > 1:  # every rank's data order and noise, so each resumes its own stream
                rank_states = [None] * world_size
                torch.distributed.all_gather_object(rank_states, rng)
            if rank == 0:
                state = dict(net=net.state_dict(), ema=ema.state_dict(), optimizer=optimizer.state_dict(),
                             rank_states=rank_states, cur_nimg=cur_nimg, log=log, config=dataclasses.asdict(config),
                             image_shape=(dataset.channels, dataset.resolution), label_dim=label_dim, data_info=data_info)
                if recorder is not None:
                    state.update(offset_net=recorder.h.state_dict(), offset_optimizer=recorder.optimizer.state_dict())
                atomic_torch_save(state, ckpt_path)
                if done:
                    _save_network(run_dir, ema, config, cur_nimg, dataset, label_dim, data_info, recorder, log)
                saved = ckpt_path
        if on_tick is not None:
            on_tick(record, saved)
        tick += 1
        tick_start_nimg, tick_start_time, tick_losses = cur_nimg, time.time(), []

    if bar is not None:
        bar.close()
    if rank == 0 and not os.path.exists(os.path.join(run_dir, NETWORK)):  # resumed after the last tick
        _save_network(run_dir, ema, config, cur_nimg, dataset, label_dim, data_info, recorder, log)
    return log


def read_log(path):
    """(resolved config as a dict, tick records) of a NETWORK or checkpoint file."""
    blob = load_torch_file(path)
    return blob['config'], blob.get('log', [])


def _save_network(run_dir, ema, config, cur_nimg, dataset, label_dim, data_info, recorder, log, name=NETWORK):
    """The EMA network with its resolved config and training log (NETWORK at the end, or a snapshot);
    NonFiniteLoss instead when a weight to be saved is not finite."""
    for what, module in (('the EMA network', ema), ('h_phi (dynamic recording)', recorder and recorder.h)):
        bad = [k for k, v in (module.state_dict() if module is not None else {}).items()
               if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise NonFiniteLoss(f'training: {what} holds non-finite weights ({", ".join(bad[:3])}) at {cur_nimg / 1000:g} kimg; '
                                f'{name} is not saved (lower lr, check the data and the network)')
    atomic_torch_save(dict(ema=ema.state_dict(), config=dataclasses.asdict(config), cur_nimg=cur_nimg,
                           image_shape=(dataset.channels, dataset.resolution), label_dim=label_dim, data_info=data_info,
                           offset_net=None if recorder is None else recorder.h.state_dict(), log=log),
                      os.path.join(run_dir, name))
    if name == NETWORK:
        with open(os.path.join(run_dir, 'log.jsonl'), 'w') as f:
            f.writelines(json.dumps(r) + '\n' for r in log)


def main(argv=None):
    """python -m tasks.train: train on a dataset in one process, then save a sample grid."""
    import argparse
    from tasks import samplers
    p = argparse.ArgumentParser(description='Train an EDM-style denoiser in one process and save a PNG grid of samples.')
    p.add_argument('--dataset', default='fashion-mnist', choices=data_mod.DATASETS)
    p.add_argument('--root', default=None, help='dataset directory or file (default for fashion-mnist: %s)' % data_mod.FASHION_MNIST_DIR)
    p.add_argument('--pad-to-32', action='store_true', help='zero-pad 28x28 images to 32x32')
    p.add_argument('--resolution', type=int, default=None, help='resize images to this size')
    p.add_argument('--preset', default='ddpmpp-tiny')
    defaults = TrainConfig()
    p.add_argument('--kimg', type=float, default=defaults.total_kimg, help='training length in thousands of images')
    p.add_argument('--batch', type=int, default=defaults.batch_size)
    p.add_argument('--lr', type=float, default=defaults.lr)
    p.add_argument('--ema-kimg', type=float, default=defaults.ema_halflife_kimg, help='EMA half-life in kimg')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--out', default='runs/train', help='run directory (resumed when it holds a checkpoint)')
    p.add_argument('--samples', type=int, default=64, help='images in the final grid (seeds 0..N-1, EDM sampler, 18 steps)')
    args = p.parse_args(argv)

    dataset = data_mod.load_dataset(args.dataset, args.root, 'train', pad_to_32=args.pad_to_32, resolution=args.resolution)
    config = TrainConfig(preset=args.preset, batch_size=args.batch, total_kimg=args.kimg, lr=args.lr,
                         lr_rampup_kimg=min(defaults.lr_rampup_kimg, args.kimg / 4), ema_halflife_kimg=args.ema_kimg,
                         kimg_per_tick=max(args.kimg / 10, 0.1), seed=args.seed)
    print(f'{args.dataset}: {len(dataset)} images {tuple(dataset.images.shape[1:])}; preset {args.preset}; '
          f'{args.kimg} kimg on {args.device}')
    start = time.time()
    log = train(config, dataset, args.out, device=args.device,
                data_info=dict(name=args.dataset, content_hash=dataset.content_hash()))
    print(f'trained in {time.time() - start:.0f} s; loss {log[0]["loss"]:.4f} (first tick) -> {log[-1]["loss"]:.4f} '
          f'(last tick); {log[-1]["img_per_sec"]:.0f} img/s')
    blob = load_torch_file(os.path.join(args.out, NETWORK))  # what tasks.checkpoints reads, without importing it
    net = build_network(TrainConfig(**blob['config']), blob['image_shape'], blob['label_dim'])
    net.load_state_dict(blob['ema'])
    net = net.to(args.device).eval().requires_grad_(False)
    start = time.time()
    images, nfe = samplers.generate(net, range(args.samples), 'edm', batch_size=64, device=args.device)
    grid = os.path.join(args.out, 'samples.png')
    data_mod.save_image_grid(data_mod.to_uint8(images), grid, upscale=max(1, 128 // dataset.resolution))
    print(f'{args.samples} samples (EDM sampler, NFE {nfe}) in {time.time() - start:.1f} s -> {grid}')


if __name__ == '__main__':
    main()
