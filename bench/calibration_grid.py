"""How many log-spaced sigma points a calibration table needs so that log-sigma interpolation
(CalibrationTable.lookup(..., interpolate=True)) stays within 1% of the exactly estimated offset
c(sigma) between grid points.

    .venv/bin/python bench/calibration_grid.py --checkpoint ../shared/data/edm-snapshots/ddpmpp-edm-uncond.pkl \
        --dataset cifar10-npz --data-root ../shared/data/cifar10/derived/cifar10_batch_prefixes_subset.npz --images 512
    .venv/bin/python bench/calibration_grid.py --closed-form

For each N, a grid of N log-spaced sigmas in [lo, hi] (hi = 80 sqrt(2): EDM's sigma_max lifted by
the largest stochastic churn, gamma = sqrt(2) - 1) is interpolated at the log-midpoints between its
points (where linear interpolation is worst) and at random log-uniform sigmas, against c estimated
at those sigmas directly. Errors: ||c_interp - c_exact|| / ||c_exact|| (vector, pooled table) and
| ||c_interp|| - ||c_exact|| | / ||c_exact|| (norm).

Common random numbers: tasks.calibration.chunk_noise draws different noise for each grid index k,
so every sigma is estimated as its own one-sigma table (k = 0): every sigma sees the same images
and the same noise, and what is measured is interpolation error, not Monte Carlo noise. The images
are split in two halves (chunks 0 and 1, different noise): their disagreement is the MC error
of c itself, and each half's interpolation error shows the answer does not depend on the sample.

--closed-form: data N(m, v) in 1-D and the exact denoiser of N(m', v') give
c(sigma) = (m' - m) sigma^2 / (sigma^2 + v'), which is checked against estimate_table with a
one-component GaussianMixtureDenoiser, then interpolated the same way.
"""
import argparse
import math
import sys
import time

import numpy as np
import torch

from tasks import calibration, checkpoints, data, oracles

DEFAULT_NS = '9,13,17,25,33,41,49,65,81,97,129'  # N - 1 divides 768 or 960: the union of all midpoints stays small
TOLERANCE = 0.01


def log_grid(lo, hi, n):
    return torch.logspace(math.log10(lo), math.log10(hi), n, dtype=torch.float64)


def eval_points(lo, hi, ns, num_random, seed):
    """Per N: its grid and the log-midpoints between its points; random log-uniform sigmas shared by all N."""
    g = torch.Generator().manual_seed(seed)
    random = (math.log(lo) + torch.rand(num_random, generator=g, dtype=torch.float64) * math.log(hi / lo)).exp()
    grids = {n: log_grid(lo, hi, n) for n in ns}
    mids = {n: (grid[:-1].log() + grid[1:].log()).div(2).exp() for n, grid in grids.items()}
    return grids, mids, random.sort().values


def load_images(name, root, count, net):
    """count images shaped for the net: 28x28 sets are zero-padded to 32 first (as the quickstart
    trains them), then resized to the net's resolution."""
    ds = data.load_dataset(name, root, 'train', limit=count)
    ds = data.prepare(ds, pad_to_32=ds.resolution == 28, resolution=net.img_resolution)
    if ds.channels != net.img_channels or len(ds) < count:
        sys.exit(f'{name}: {len(ds)} images with {ds.channels} channels; the net wants {count} with {net.img_channels}')
    return ds.images


def stack(tables, sigmas, chunk):
    """One-sigma tables (all estimated at grid index 0, hence with identical noise) as one table over all sigmas."""
    out = calibration.CalibrationTable(sigmas, tables[0].shape, 0, tables[0].meta)
    for name in ('sum_D', 'sum_y', 'sum_r2', 'count'):
        setattr(out, name, torch.cat([getattr(t, name) for t in tables], 1))
    out.chunks = {chunk}
    return out


def estimate_exact(net, images, sigmas, seed, batch_size):
    """Tables over `sigmas` for the two halves of the images (chunks 0 and 1) and their merge."""
    half = len(images) // 2
    halves = [[], []]
    start = time.time()
    for i, sigma in enumerate(sigmas.tolist()):
        for h in (0, 1):
            halves[h].append(calibration.estimate_table(net, images[:2 * half], [sigma], chunk_size=half, chunk_indices=[h],
                                                        seed=seed, batch_size=batch_size))
        if (i + 1) % max(1, len(sigmas) // 10) == 0:
            print(f'  {i + 1}/{len(sigmas)} sigmas, {time.time() - start:.0f} s', file=sys.stderr, flush=True)
    a, b = stack(halves[0], sigmas, 0), stack(halves[1], sigmas, 1)
    return a, b, a.merge(b)


def subtable(fine, sigmas):
    """The table a grid of `sigmas` would hold: fine's estimates at those sigmas (same images, same noise)."""
    idx = fine.index_of(sigmas)
    out = calibration.CalibrationTable(sigmas, fine.shape, 0, fine.meta)
    for name in ('sum_D', 'sum_y', 'sum_r2', 'count'):
        setattr(out, name, getattr(fine, name)[:, idx])
    return out


def interpolation_errors(fine, grid, points):
    """Relative errors (vector, norm) [P] of the interpolated grid table against fine at `points`."""
    c_int = subtable(fine, grid).lookup(points, interpolate=True).flatten(1)
    c_ex = fine.offset()[0, fine.index_of(points)].flatten(1)
    norm = c_ex.norm(dim=1)
    return (c_int - c_ex).norm(dim=1) / norm, (c_int.norm(dim=1) - norm).abs() / norm


def report(tables, grids, mids, random, labels):
    """Table of errors per N against tables[0]; the max vector error against each further table (the halves)."""
    extra = ''.join(f' max vector, {label} |' for label in labels[1:])
    print('\n| N | max rel err (vector) | mean (vector) | at sigma | max over random sigmas | max rel err (norm) |' + extra)
    print('|---' * (6 + len(labels) - 1) + '|')
    chosen = None
    for n, grid in grids.items():
        points = torch.cat([mids[n], random])
        vec, nrm = interpolation_errors(tables[0], grid, points)
        others = ''.join(f' {100 * interpolation_errors(t, grid, points)[0].max():.3f}% |' for t in tables[1:])
        worst = int(vec.argmax())
        print(f'| {n} | {100 * vec.max():.3f}% | {100 * vec.mean():.3f}% | {float(points[worst]):.4g} | '
              f'{100 * vec[len(mids[n]):].max():.3f}% | {100 * nrm.max():.3f}% |' + others)
        if chosen is None and vec.max() < TOLERANCE:
            chosen = n
    return chosen


def profile(a, b, full, at):
    """||c|| (RMS per pixel) and the MC error of c (halves' disagreement) at a few sigmas, to show the curve."""
    print('\n| sigma | RMS c per pixel | ||c_A - c_B|| / ||c|| (MC, two halves) | est. rel. SE of full c |\n|---|---|---|---|')
    ratios = []
    for s in full.sigmas.tolist():
        i = full.index_of(s)
        c, ca, cb = (t.offset()[0, i].flatten() for t in (full, a, b))
        ratios.append(float((ca - cb).norm() / c.norm()))
        if any(abs(math.log(s / x)) < 1e-9 for x in at):
            d = c.numel()
            # c = (c_A + c_B) / 2 with independent halves: its error is about half their difference.
            print(f'| {s:.4g} | {float(c.norm()) / math.sqrt(d):.4g} | {100 * ratios[-1]:.2f}% | {50 * ratios[-1]:.2f}% |')
    r = np.array(ratios)
    print(f'MC disagreement of the halves over all {len(r)} sigmas: median {100 * np.median(r):.2f}%, max {100 * r.max():.2f}%')


def network(args, ns):
    net = checkpoints.load_denoiser(args.checkpoint)
    images = load_images(args.dataset, args.data_root, args.images, net)
    grids, mids, random = eval_points(args.lo, args.hi, ns, args.random, args.seed)
    sigmas = calibration.union_sigmas(*grids.values(), *mids.values(), random)
    print(f'{type(net).__name__} from {args.checkpoint} ({sum(p.numel() for p in net.parameters()):,} parameters); '
          f'{len(images)} {args.dataset} images {tuple(images.shape[1:])}; {len(sigmas)} distinct sigmas to estimate')
    start = time.time()
    a, b, full = estimate_exact(net, images, sigmas, args.seed, args.batch)
    print(f'estimated in {time.time() - start:.0f} s ({len(sigmas) * len(images) / (time.time() - start):.0f} forward evals/s)')
    profile(a, b, full, grids[ns[0]].tolist())
    chosen = report([full, a, b], grids, mids, random, ['full', 'half A', 'half B'])
    print(f'\nsmallest N with max vector error < {100 * TOLERANCE:g}%: {chosen if chosen else f"none up to {ns[-1]}"}')


def gaussian_offset(sigma, m, v_model, m_model):
    """c(sigma) = E[D(y + sigma n)] - E[y] for y ~ N(m, v) and D the exact denoiser of N(m_model, v_model):
    D(x) = m' + v' / (v' + sigma^2) (x - m'), linear, so E[D] = m' + v' / (v' + sigma^2) (m - m') and
    c = (m' - m) sigma^2 / (sigma^2 + v') (independent of the data variance v)."""
    return (m_model - m) * sigma ** 2 / (sigma ** 2 + v_model)


def closed_form(args, ns):
    # 1. The formula against estimate_table: data drawn from N(m, v), denoised by the exact denoiser of N(m', v').
    m, v, m_model, v_model, count = 0.0, 1.0, -1.0, 0.5, 100_000  # |y| <= 5 (check_images) holds for these draws
    net = oracles.GaussianMixtureDenoiser([1.0], [[m_model]], [v_model])
    y = m + math.sqrt(v) * torch.randn(count, 1, generator=torch.Generator().manual_seed(args.seed), dtype=torch.float64)
    sigmas = torch.tensor([0.002, 0.05, 0.5, 1.0, 5.0, 80 * math.sqrt(2)], dtype=torch.float64)
    table = calibration.estimate_table(net, y, sigmas, chunk_size=count, seed=args.seed, batch_size=count)
    c_hat, se = table.offset()[0, :, 0], table.standard_error()[0, :, 0]
    print(f'closed form c(sigma) = (m\' - m) sigma^2 / (sigma^2 + v\'), E[eps] = -c / sigma = (m - m\') sigma / (sigma^2 + v\')\n'
          f'check: y ~ N({m}, {v}), exact denoiser of N({m_model}, {v_model}), {count} draws, estimate_table\n'
          '| sigma | c formula | c estimate_table | z = (est - formula) / SE | mean_eps | -c/sigma formula |\n|---|---|---|---|---|---|')
    for k, s in enumerate(sigmas.tolist()):
        c = gaussian_offset(s, m, v_model, m_model)
        print(f'| {s:.4g} | {c:.6g} | {float(c_hat[k]):.6g} | {float((c_hat[k] - c) / se[k]):+.2f} | '
              f'{float(table.mean_eps()[0, k, 0]):.6g} | {-c / s:.6g} |')
    # 2. How many grid points its log-sigma interpolation needs (the table holds the formula's values exactly).
    grids, mids, random = eval_points(args.lo, args.hi, ns, args.random, args.seed)
    dense = calibration.union_sigmas(*grids.values(), *mids.values(), random)
    for m_diff, v_model in ((1.0, 0.5), (1.0, 1.0), (-2.0, 4.0), (1.0, 1e-2), (1.0, 1e-6)):
        fine = calibration.CalibrationTable(dense, (1,))
        fine.sum_D[0, :, 0], fine.count[:] = gaussian_offset(dense, 0.0, v_model, -m_diff), 1
        print(f'\nm - m\' = {m_diff:g}, v\' = {v_model:g} (any v)')
        chosen = report([fine], grids, mids, random, ['exact'])
        print(f'smallest N with max vector error < {100 * TOLERANCE:g}%: {chosen if chosen else f"none up to {ns[-1]}"}')
    # Where c ~ sigma^2 (sigma^2 << v'), linear interpolation in ln sigma of exp(2 ln sigma) is off by cosh(h) - 1 at the
    # midpoint of a step h: 1% needs h <= arccosh(1.01).
    h = math.acosh(1 + TOLERANCE)
    print(f'\nsigma^2 tail bound: step h = arccosh(1.01) = {h:.4f} in ln sigma, N >= 1 + ln(hi/lo)/h = '
          f'{1 + math.log(args.hi / args.lo) / h:.1f}; a c ~ sigma tail needs half the step: {1 + math.log(args.hi / args.lo) / (2 * h):.1f}')


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--checkpoint', default='../shared/data/edm-snapshots/ddpmpp-edm-uncond.pkl')
    p.add_argument('--dataset', default='cifar10-npz', choices=data.DATASETS)
    p.add_argument('--data-root', default='../shared/data/cifar10/derived/cifar10_batch_prefixes_subset.npz')
    p.add_argument('--images', type=int, default=512, help='images (split into two halves for the MC check)')
    p.add_argument('--lo', type=float, default=0.002)
    p.add_argument('--hi', type=float, default=80 * math.sqrt(2), help='default 80 (1 + gamma), gamma = sqrt(2) - 1')
    p.add_argument('--ns', default=DEFAULT_NS, help='grid sizes N (points), comma-separated')
    p.add_argument('--random', type=int, default=16, help='random log-uniform sigmas evaluated for every N')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--batch', type=int, default=256)
    p.add_argument('--closed-form', action='store_true', help='the 1-D Gaussian closed form instead of a network')
    args = p.parse_args()
    torch.set_grad_enabled(False)
    print(' '.join([sys.executable, *sys.argv]))
    print(f'device: cpu, {torch.get_num_threads()} threads, torch {torch.__version__}; sigma in [{args.lo:g}, {args.hi:g}]')
    ns = sorted(int(n) for n in args.ns.split(','))
    start = time.time()
    (closed_form if args.closed_form else network)(args, ns)
    print(f'\nwall time {time.time() - start:.0f} s')


if __name__ == '__main__':
    main()
