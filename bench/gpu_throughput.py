"""Throughput of every hot path on one device, with each speed option measured separately.

    python bench/gpu_throughput.py [--batch 512 1024] [--compile] [--out bench/results/gpu-h100.json]
    python bench/gpu_throughput.py --smoke      # tiny sizes, any device: checks the script runs

Builds the `ddpmpp-cifar10` preset (EDM's CIFAR-10 DDPM++: 55.7 M parameters) with random weights
(its near-zero init_zero layers scaled up, so the network's output is not ~0) and EDM
preconditioning, and times, after warm-up, the median of repeats (CUDA events on a GPU):
- the raw forward D(x; sigma) in fp32 (TF32 off, as the reference measured), bf16 autocast,
  bf16 + channels_last, and (with --compile) + torch.compile;
- edm_sampler (18 steps, NFE 35) and DPM-Solver-3 (singlestep, NFE 20) through tasks.samplers;
- calibration estimation (tasks.calibration.estimate_table over images x sigmas);
- training (tasks.train.train on random images: the product's own loop, its measured img/s);
- Inception-v3 features (tasks.metrics) for uint8 32x32 images.
Each variant's D is compared with fp32's on the same input (max |dD| / max |D|), so a fast path
that changes the answer shows it. TFLOP/s counts the forward's FLOPs (torch's FlopCounterMode)
and is compared with this device's measured bf16 matmul rate. Prints one Markdown table and
writes the numbers (device, torch version, date) as JSON with --out.
"""
import argparse
import copy
import datetime
import json
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tasks import calibration, data, metrics, precond, samplers  # noqa: E402
from tasks import train as tasks_train  # noqa: E402


def timed(fn, device, repeats, warmup=2):
    """Median seconds of fn() over `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == 'cuda':
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def matmul_tflops(device, n=8192, repeats=10):
    """This device's bf16 matrix rate (TFLOP/s), the ceiling for the forward pass."""
    if device.type != 'cuda':
        return None
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    return 2 * n ** 3 / timed(lambda: a @ b, device, repeats) / 1e12


def forward_flops(net, shape, device):
    from torch.utils.flop_counter import FlopCounterMode
    x = torch.zeros(1, *shape, device=device)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(x, torch.ones(1, device=device))
    return counter.get_total_flops()


def peak_mib(device):
    if device.type != 'cuda':
        return None
    mib = torch.cuda.max_memory_allocated(device) / 2 ** 20
    torch.cuda.reset_peak_memory_stats(device)
    return mib


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--preset', default='ddpmpp-cifar10')
    p.add_argument('--batch', type=int, nargs='+', default=[64, 512, 1024])
    p.add_argument('--compile', action='store_true', help='also time torch.compile variants (minutes of compilation)')
    p.add_argument('--repeats', type=int, default=5)
    p.add_argument('--train-kimg', type=float, default=20)
    p.add_argument('--inception-images', type=int, default=10000)
    p.add_argument('--smoke', action='store_true', help='ddpmpp-tiny at 16x16x1, batch 4, one repeat')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--out', default=None, help='write the rows as JSON here')
    args = p.parse_args(argv)
    if args.smoke:
        args.preset, args.batch, args.repeats, args.train_kimg, args.inception_images = 'ddpmpp-tiny', [4], 1, 0.016, 4
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # fp32 means fp32
    shape = (1, 16, 16) if args.smoke else (3, 32, 32)
    torch.manual_seed(0)
    base = precond.build_denoiser(args.preset, 'edm', img_resolution=shape[-1], img_channels=shape[0]).to(device).eval()
    with torch.no_grad():  # EDM's init_zero layers (weights x 1e-5) would make F ~ 0 and hide any deviation
        for p in base.parameters():
            if p.ndim > 1 and p.abs().max() < 1e-3:
                p.mul_(2e4)
    params = sum(p.numel() for p in base.parameters())
    flops = forward_flops(base, shape, device)
    peak = matmul_tflops(device)
    variants = {'fp32': dict(), 'bf16': dict(bf16=True), 'bf16+channels_last': dict(bf16=True, channels_last=True)}
    if args.compile:
        variants['bf16+channels_last+compile'] = dict(bf16=True, channels_last=True, compile=True)
    rows = []

    def row(path, variant, batch, seconds, evals, images=None, deviation=None):
        evals_per_s = evals / seconds
        tflops = evals_per_s * flops / 1e12
        rows.append(dict(path=path, variant=variant, batch=batch, evals_per_s=evals_per_s,
                         img_per_s=(images or evals) / seconds, tflops=tflops,
                         pct_of_bf16_matmul=None if peak is None else 100 * tflops / peak,
                         peak_mib=peak_mib(device), max_rel_deviation=deviation))
        print(f'  {path:<22} {variant:<28} batch {batch:>5}: {evals_per_s:9.1f} evals/s', flush=True)

    # One network per variant (channels_last converts the module), same weights.
    nets = {name: precond.FastDenoiser(copy.deepcopy(base), **opts) for name, opts in variants.items()}
    with torch.no_grad():
        for batch in args.batch:
            x = torch.randn(batch, *shape, device=device) * 2
            sigma = torch.exp(torch.randn(batch, device=device) * 1.2 - 1.2)
            D_ref = nets['fp32'](x, sigma)
            for name, net in nets.items():
                dev = float((net(x, sigma) - D_ref).abs().max() / D_ref.abs().max())
                row('forward', name, batch, timed(lambda: net(x, sigma), device, args.repeats), batch, deviation=dev)

        best = 'bf16+channels_last+compile' if args.compile else 'bf16+channels_last'
        for batch in args.batch:
            for name in ('fp32', best):
                for sampler, kwargs, nfe in (('edm', dict(num_steps=18), 35),
                                             ('dpm_solver', dict(steps=20, order=3, method='singlestep'), 20)):
                    seconds = timed(lambda: samplers.generate(nets[name], range(batch), sampler, batch_size=batch,
                                                              device=device, **kwargs), device, max(1, args.repeats // 2), 1)
                    row(f'{sampler} (NFE {nfe})', name, batch, seconds, batch * nfe, images=batch)

        n_images, grid = max(args.batch), calibration.queried_sigmas('edm', base, num_steps=18)[:8]
        images = torch.randint(0, 256, (n_images, *shape), dtype=torch.uint8)
        for name in ('fp32', best):
            seconds = timed(lambda: calibration.estimate_table(nets[name], images, grid, chunk_size=n_images,
                                                               batch_size=n_images, device=device), device, 1, 1)
            row('calibration estimate', name, n_images, seconds, n_images * len(grid))

    with tempfile.TemporaryDirectory() as run_dir:
        n = max(args.batch)
        ds = data.ImageDataset(torch.randint(0, 256, (max(4 * n, 64), *shape), dtype=torch.uint8),
                               torch.zeros(max(4 * n, 64), dtype=torch.long), 'random', 1)
        for name, opts in (('fp32', {}), ('bf16+channels_last', dict(bf16=True, channels_last=True))):
            config = tasks_train.TrainConfig(preset=args.preset, batch_size=n, total_kimg=args.train_kimg,
                                             kimg_per_tick=args.train_kimg / 4, checkpoint_ticks=1000, **opts)
            log = tasks_train.train(config, ds, os.path.join(run_dir, name), device=str(device), progress=False)
            rate = statistics.median(r['img_per_sec'] for r in log[1:] or log)  # the first tick holds the warm-up
            rows.append(dict(path='training step', variant=name, batch=n, evals_per_s=None, img_per_s=rate,
                             tflops=3 * rate * flops / 1e12, pct_of_bf16_matmul=None if peak is None else 300 * rate * flops / 1e12 / peak,
                             peak_mib=peak_mib(device), max_rel_deviation=None))
            print(f'  training step          {name:<28} batch {n:>5}: {rate:9.1f} img/s', flush=True)

    extractor = metrics.InceptionFeatures(metrics.resolve_inception_weights(), device=device, batch_size=500)
    fake = torch.randint(0, 256, (args.inception_images, 3, 32, 32), dtype=torch.uint8)
    seconds = timed(lambda: extractor(fake), device, 1, 1)
    rows.append(dict(path='Inception features', variant='fp32', batch=500, evals_per_s=None,
                     img_per_s=args.inception_images / seconds, tflops=None, pct_of_bf16_matmul=None,
                     peak_mib=peak_mib(device), max_rel_deviation=None))

    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'
    header = dict(device=name, torch=torch.__version__, date=datetime.date.today().isoformat(), preset=args.preset,
                  parameters=params, gflop_per_forward=flops / 1e9, bf16_matmul_tflops=peak, smoke=args.smoke)
    print(f'\n{name}, torch {torch.__version__}, {args.preset} ({params / 1e6:.1f} M parameters, '
          f'{flops / 1e9:.2f} GFLOP per forward), bf16 matmul {"n/a" if peak is None else f"{peak:.0f} TFLOP/s"}; '
          f'median of {args.repeats} after warm-up. Training TFLOP/s counts 3 forwards per image.\n')
    print('| path | variant | batch | evals/s | img/s | TFLOP/s | % bf16 matmul | peak MiB | max dD/D |')
    print('|---|---|---|---|---|---|---|---|---|')
    fmt = lambda v, f: '' if v is None else format(v, f)
    for r in rows:
        print(f'| {r["path"]} | {r["variant"]} | {r["batch"]} | {fmt(r["evals_per_s"], ",.0f")} | {fmt(r["img_per_s"], ",.1f")} | '
              f'{fmt(r["tflops"], ".1f")} | {fmt(r["pct_of_bf16_matmul"], ".0f")} | {fmt(r["peak_mib"], ",.0f")} | '
              f'{fmt(r["max_rel_deviation"], ".1e")} |')
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, 'w') as f:
            json.dump(dict(header, rows=rows), f, indent=1)
    return dict(header, rows=rows)


if __name__ == '__main__':
    main()
