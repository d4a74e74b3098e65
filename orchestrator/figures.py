"""Figures and Markdown tables from the Parquet results (never from anything else).

fid_vs_nfe.png (when the sweep has several NFEs): the sweep's metric against NFE, one colour per solver setting, solid without
calibration, dashed calibrated on data, dotted on generated samples (Calib Table 1 / EDM Fig. 2
style; with several image counts, the largest); fid_vs_calibration_images.png: the metric
against the number of images in the estimate (Calib Table 4), when the sweep has several;
sweep.md: every number as a table; calibration.png: ||E[eps]||^2 per sigma (Calib Fig. 1, left).
With several training snapshots (train.snapshots_kimg, or a list of checkpoints): the figures
above show the last snapshot, and training_progress.png / .md show calibration across training
(the term per snapshot, the likelihood-bound gain, the metric with and without calibration with
seed-block spread). The NFE figures and sweep.md show the last snapshot. A sweep that searched
(sweep.search) adds rungs.png (each trial's metric against the images it had at each rung: the
pruning) and search.png (the metric at the first rung, which every trial reached, over each
searched parameter); its NFE figures and sweep.md show the trials that reached num_images.
"""
import io
import json
import os

import matplotlib
import numpy as np
import pandas as pd

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402

from orchestrator import results  # noqa: E402
from orchestrator.results import metric_column  # noqa: E402
from orchestrator.storage import Storage  # noqa: E402

STEP_KEYS = ('steps', 'num_steps')


def solver_label(row):
    params = json.loads(row['params']) if isinstance(row['params'], str) else dict(row['params'])
    rest = ' '.join(f'{k}={v}' for k, v in sorted(params.items()) if k not in STEP_KEYS)
    return f'{row["sampler"]} {rest}'.strip()


def calibration_label(row):
    """'no', or the table a calibrated trial used, e.g. 'data, 1000 images'."""
    if not row['calibrated']:
        return 'no'
    source, n = row.get('calibration_source'), row.get('calibration_images')
    per_class = ', per class' if row.get('calibration_per_class') is True else ''
    return f'yes{per_class}' if source is None or n is None or n != n else f'{source}, {int(n)} images{per_class}'


SOURCE_STYLE = {None: '--', 'data': '--', 'generated': ':'}


def _with_labels(df):
    for col in ('calibration_source', 'calibration_images'):
        if col not in df.columns:  # results written before tables were a sweep axis
            df = df.assign(**{col: None})
    return df.assign(solver=df.apply(solver_label, axis=1), calibration=df.apply(calibration_label, axis=1))


def _axis_label(df, metric):
    label = 'FID' if metric == 'fid' else 'Frechet distance (NOT FID: other features)'
    return f'{label}, {int(df["num_samples"].iloc[0])} samples vs {_reference_words(df)}'


def _reference_words(df):
    """'500 reference images', or the published statistics file's (which need not say a count)."""
    count = df['reference_count'].iloc[0]
    return 'published reference statistics' if count is None or count != count else f'{int(count)} reference images'


def _save(fig, ax, path):
    ax.grid(alpha=0.3, which='both')
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def fid_vs_nfe(df, path, title=''):
    metric = metric_column(df)
    df = _with_labels(df)
    # With several image counts per source, the curve of the largest (the others: fid_vs_calibration_images).
    largest = df.groupby('calibration_source', dropna=False)['calibration_images'].transform('max')
    df = df[~df['calibrated'] | df['calibration_images'].isna() | (df['calibration_images'] == largest)]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = plt.rcParams['axes.prop_cycle'].by_key()['color']
    for i, (solver, group) in enumerate(sorted(df.groupby('solver'), key=lambda g: g[0])):
        for calibration, g in sorted(group.groupby('calibration'), key=lambda g: g[0] != 'no'):
            g = g.sort_values('nfe')
            style = '-' if calibration == 'no' else SOURCE_STYLE.get(g['calibration_source'].iloc[0], '--')
            ax.plot(g['nfe'], g[metric], style, marker='o', color=colors[i % len(colors)],
                    label=solver + ('' if calibration == 'no' else f' + calibration ({calibration})'))
    ax.set_xlabel('NFE (denoiser evaluations)')
    ax.set_ylabel(_axis_label(df, metric))
    ax.set_title(title or 'sample quality vs NFE (dashed: calibrated)')
    return _save(fig, ax, path)


def fid_vs_calibration_images(df, path, title=''):
    """The metric against the images in the calibration estimate (Calib Table 4), one line per
    solver setting, NFE and source; the uncalibrated value as a flat line of the same colour."""
    metric = metric_column(df)
    df = _with_labels(df)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = plt.rcParams['axes.prop_cycle'].by_key()['color']
    calibrated = df[df['calibrated']]
    for i, ((solver, nfe), g) in enumerate(sorted(calibrated.groupby(['solver', 'nfe']))):
        color = colors[i % len(colors)]
        for source, s in g.groupby('calibration_source'):
            s = s.sort_values('calibration_images')
            ax.plot(s['calibration_images'], s[metric], SOURCE_STYLE.get(source, '--'), marker='o', color=color,
                    label=f'{solver} NFE {int(nfe)}, {source}')
        base = df[~df['calibrated'] & (df['solver'] == solver) & (df['nfe'] == nfe)]
        if len(base):
            ax.axhline(base[metric].iloc[0], color=color, linewidth=0.8, label=f'{solver} NFE {int(nfe)}, uncalibrated')
    ax.set_xscale('log')
    ax.set_xlabel('images in the calibration estimate')
    ax.set_ylabel(_axis_label(df, metric))
    ax.set_title(title or 'sample quality vs calibration images (dashed: data, dotted: generated)')
    return _save(fig, ax, path)


def sweep_markdown(df):
    """Rows: solver settings and calibration; columns: NFE; cells: the metric."""
    metric = metric_column(df)
    df = _with_labels(df)
    nfes = sorted(df['nfe'].unique())
    lines = ['| solver | calibration | ' + ' | '.join(f'NFE {int(n)}' for n in nfes) + ' |',
             '|---|---|' + '---|' * len(nfes)]
    def order(item):  # uncalibrated first, then by source and image count
        (solver, calibration), g = item
        return solver, calibration != 'no', str(g['calibration_source'].iloc[0]), g['calibration_images'].fillna(0).iloc[0]
    for (solver, calibration), g in sorted(df.groupby(['solver', 'calibration']), key=order):
        cells = [f'{g[g["nfe"] == n][metric].iloc[0]:.2f}' if (g['nfe'] == n).any() else '' for n in nfes]
        lines.append(f'| {solver} | {calibration} | ' + ' | '.join(cells) + ' |')
    n = int(df['num_samples'].iloc[0])
    blocks = int(df['seed_blocks'].iloc[0]) if 'seed_blocks' in df.columns and df['seed_blocks'].notna().all() else 1
    what = 'FID (Inception-v3 2015-12-05)' if metric == 'fid' else f'Frechet distance on {df["feature_extractor"].iloc[0]} (not FID)'
    images = (f'{n} generated images (seeds 0..{n - 1})' if blocks == 1 else
              f'the minimum over {blocks} seed blocks of {n} generated images (block b: seeds b*{n}..(b+1)*{n}-1; EDM\'s protocol)')
    lines.append(f'\n{what}, {images} against {_reference_words(df)}.')
    return '\n'.join(lines)


def calibration_figure(df, path):
    """||E[eps]||^2 per sigma with +-2 standard errors, one line per table (source, images)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    keys = [c for c in ('source', 'table_images') if c in df.columns]
    snapshots = 'snapshot_kimg' in df.columns and df['snapshot_kimg'].nunique() > 1
    for key, d in (df.groupby(keys + ['snapshot_kimg'] * snapshots) if keys else [((), df)]):
        d = d.sort_values('sigma')
        what = (f'{key[0]}, {key[1]} images' + (f', {key[2]:g} kimg' if snapshots else '') if keys
                else f'{int(d["images"].iloc[0])} images')
        line, = ax.loglog(d['sigma'], d['mean_eps_norm2'], marker='.', label=what)
        ax.fill_between(d['sigma'], (d['mean_eps_norm2'] - 2 * d['mean_eps_norm2_se']).clip(lower=1e-12),
                        d['mean_eps_norm2'] + 2 * d['mean_eps_norm2_se'], alpha=0.2, color=line.get_color())
    ax.set_xlabel('sigma')
    ax.set_ylabel('||E_q[eps(x; sigma)]||^2 (Calib Eq. 27 gap)')
    ax.set_title('calibration term (bands: +-2 standard errors)')
    return _save(fig, ax, path)


def rungs_figure(rungs, sweep, path, title=''):
    """Each trial's metric against its images at each rung (log x): stopped trials grey,
    finished ones in colour, the best finished one labelled."""
    metric = metric_column(rungs)
    stopped = dict(zip(sweep['trial_hash'], results.stopped(sweep)))
    final = sweep[~sweep['trial_hash'].map(stopped)].dropna(subset=[metric])
    best = final.loc[final[metric].idxmin(), 'trial_hash'] if len(final) else None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for h, g in rungs.groupby('trial_hash'):
        g = g.sort_values('images')
        if stopped.get(h, False):
            ax.plot(g['images'], g[metric], '-', marker='.', color='0.7', lw=0.8)
        else:
            ax.plot(g['images'], g[metric], '-', marker='o', lw=2 if h == best else 1,
                    label=g['label'].iloc[0] + (' (best)' if h == best else ''))
    ax.plot([], [], '-', marker='.', color='0.7', label=f'stopped early ({sum(stopped.values())} trials)')
    ax.set_xscale('log')
    ax.set_xlabel('generated images (first seed block; the same seeds in every trial)')
    ax.set_ylabel(('FID' if metric == 'fid' else 'Frechet distance (NOT FID: other features)') + ' at the rung')
    ax.set_title(title or 'successive halving: the metric at each rung')
    return _save(fig, ax, path)


def search_figure(rungs, sweep, path, title=''):
    """The metric at the first rung (every trial reached it: comparable values) over each
    numeric parameter that differs between trials, one panel each; stopped trials hollow."""
    metric = metric_column(rungs)
    first = rungs[rungs['images'] == rungs['images'].min()].set_index('trial_hash')[metric]
    params = sweep.set_index('trial_hash')['params'].map(lambda p: json.loads(p) if isinstance(p, str) else dict(p))
    table = pd.DataFrame(list(params), index=params.index)
    numeric = [c for c in table.columns if pd.to_numeric(table[c], errors='coerce').notna().all() and table[c].nunique() > 1]
    if not numeric:
        return None
    stopped = results.stopped(sweep).set_axis(sweep['trial_hash'])
    fig, axes = plt.subplots(1, len(numeric), figsize=(3.2 * len(numeric), 3.4), squeeze=False, sharey=True)
    for ax, name in zip(axes[0], numeric):
        x = pd.to_numeric(table[name]).reindex(first.index)
        done = ~stopped.reindex(first.index)
        ax.scatter(x[done], first[done], label='reached num_images')
        ax.scatter(x[~done], first[~done], facecolors='none', edgecolors='0.5', label='stopped early')
        ax.set_xlabel(name)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f'{"FID" if metric == "fid" else "Frechet distance (NOT FID)"} at {int(rungs["images"].min())} images')
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title or 'the metric over each searched parameter (first rung)')
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


SHEET_ROWS = 16


def samples_sheet(sweep, storage, experiment, path, title=''):
    """samples.png: each trial's sample grid (the first images it measured; the same seeds in
    every trial), rows = snapshot and sampler setting, columns = uncalibrated and each calibration
    table, the metric under each. Made from sweep.parquet and the grids' PNGs alone; with more
    than SHEET_ROWS settings, the SHEET_ROWS whose best cell is lowest. A grid that is not in
    the store (tables copied without their samples/) is a cell that says so, not an error."""
    import PIL.Image
    metric = metric_column(sweep)
    df = _with_labels(sweep[sweep['samples'].notna()])
    kimg = df['snapshot_kimg'] if 'snapshot_kimg' in df.columns else pd.Series(None, index=df.index)
    df = df.assign(setting=df['sampler'] + ' ' + df['params'].astype(str), kimg=kimg.fillna(-1))
    columns = sorted(df['calibration'].unique(), key=lambda c: (c != 'no', c))
    best = df.groupby(['kimg', 'setting'])[metric].min().sort_values()
    rows = sorted(best.index[:SHEET_ROWS])
    solvers = dict(zip(df['setting'], df['solver'] + df['nfe'].map(lambda n: f' (NFE {int(n)})')))

    def row_name(k, setting):  # only what differs between rows: the setting, the snapshot
        parts = [solvers[setting]] if len({s for _, s in rows}) > 1 else []
        return ', '.join(parts + ([] if k < 0 or len({k for k, _ in rows}) == 1 else [f'{k:g} kimg'])) or solvers[setting]
    fig, axes = plt.subplots(len(rows), len(columns), figsize=(2.6 * len(columns), 2.9 * len(rows)), squeeze=False)
    for i, (k, setting) in enumerate(rows):
        for j, calibration in enumerate(columns):
            ax = axes[i][j]
            ax.axis('off')
            cell = df[(df['kimg'] == k) & (df['setting'] == setting) & (df['calibration'] == calibration)]
            if not len(cell):
                continue
            r = cell.iloc[0]
            grid = f'{experiment}/{r["samples"]}'
            if storage.exists(grid):
                ax.imshow(np.array(PIL.Image.open(io.BytesIO(storage.read_bytes(grid)))),
                          cmap='gray', vmin=0, vmax=255, interpolation='nearest')
            else:  # e.g. tables copied without their samples/: the cell says so
                ax.text(0.5, 0.5, f'sample grid missing:\n{r["samples"]}', ha='center', va='center', fontsize=7,
                        transform=ax.transAxes)
            stopped = results.stopped(cell).iloc[0]
            value = f'{metric} {r[metric]:.2f}' if r[metric] == r[metric] else 'failed'
            head = ('uncalibrated' if calibration == 'no' else f'calibrated: {calibration}') + '\n' if i == 0 else ''
            ax.set_title(head + (row_name(k, setting) + ': ' if j == 0 else '') + value
                         + (f' ({int(r["images"])} img, stopped)' if stopped else ''), fontsize=8)
    fig.suptitle(title or 'samples: the same seeds in every cell', fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _last_snapshot(df):
    """The rows of the last training snapshot (figures over NFE or image count show one model)."""
    if 'snapshot_kimg' in df.columns and df['snapshot_kimg'].nunique() > 1:
        return df[df['snapshot_kimg'] == df['snapshot_kimg'].max()]
    return df


def seed_block_comparison(sweep):
    """Per snapshot and solver setting (and calibration table): the metric without and with
    calibration over the same seed blocks: mean and standard deviation over blocks of each, and of
    the per-block gain (uncalibrated minus calibrated, paired: block b uses the same seeds in both).
    `beyond_spread`: the two mean +- std intervals do not overlap."""
    metric = metric_column(sweep)
    df = _with_labels(sweep)
    df = df.assign(blocks=df[f'{metric}_blocks'].map(lambda v: np.array(json.loads(v) if isinstance(v, str) else v, float)))
    rows = []
    for (kimg, solver, nfe), g in df.groupby(['snapshot_kimg', 'solver', 'nfe'], dropna=False):
        base = g[~g['calibrated']]
        for _, cal in g[g['calibrated']].iterrows():
            if not len(base):
                continue
            a, b = base['blocks'].iloc[0], cal['blocks']
            gain = a - b
            spread = lambda x: float(x.std(ddof=1)) if len(x) > 1 else float('nan')
            rows.append(dict(snapshot_kimg=kimg, solver=solver, nfe=int(nfe), calibration=cal['calibration'], seed_blocks=len(a),
                             uncalibrated=float(a.mean()), uncalibrated_std=spread(a), calibrated=float(b.mean()),
                             calibrated_std=spread(b), gain=float(gain.mean()), gain_std=spread(gain),
                             beyond_spread=bool(abs(a.mean() - b.mean()) > spread(a) + spread(b))))
    return pd.DataFrame(rows)


def training_progress(sweep, calibration, likelihood, path, title=''):
    """Calibration across training (one figure, four panels, from the Parquet rows): ||E[eps]||^2
    per sigma for each snapshot (Calib Fig. 1 top row); the likelihood-bound gain (Calib Eq. 11)
    against kimg, +-1 SE, with its Monte Carlo noise floor; the metric without and with calibration
    against kimg, mean +-1 std over seed blocks; the paired gain per seed block, mean +-1 std."""
    metric = metric_column(sweep)
    comparison = seed_block_comparison(sweep)
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    (ax_eps, ax_gain), (ax_fid, ax_delta) = axes
    cmap = plt.get_cmap('viridis')
    kimgs = sorted(calibration['snapshot_kimg'].dropna().unique())
    for i, (kimg, d) in enumerate(calibration[calibration['table_images'] == calibration['table_images'].max()]
                                  .groupby('snapshot_kimg')):
        for source, e in d.groupby('source'):
            e = e.sort_values('sigma')
            ax_eps.loglog(e['sigma'], e['mean_eps_norm2'], SOURCE_STYLE.get(source, '-').replace('--', '-'), marker='.',
                          color=cmap(i / max(len(kimgs) - 1, 1)), label=f'{kimg:g} kimg ({source})')
    ax_eps.set_xlabel('sigma')
    ax_eps.set_ylabel('||E_q[eps(x; sigma)]||^2')
    ax_eps.set_title('calibration term per snapshot (Calib Fig. 1)')
    for (source, n), d in likelihood.groupby(['source', 'table_images']):
        d = d.sort_values('snapshot_kimg')
        line = ax_gain.errorbar(d['snapshot_kimg'], d['likelihood_gain_nats'], yerr=d['likelihood_gain_se'], marker='o',
                                capsize=3, label=f'{source}, {n} images (+-1 SE)')
        ax_gain.plot(d['snapshot_kimg'], d['likelihood_gain_noise_floor'], ':', color=line[0].get_color(),
                     label='Monte Carlo noise floor')
    ax_gain.set_yscale('log')
    ax_gain.set_xlabel('training kimg')
    ax_gain.set_ylabel('likelihood-bound gain, nats per image')
    ax_gain.set_title('Calib Eq. 11: gain of the likelihood bound')
    colors = plt.rcParams['axes.prop_cycle'].by_key()['color']
    several = comparison['solver'].nunique() > 1  # name the solver only when there are several (sweep.md names them)
    for i, ((solver, nfe, calibration_label), d) in enumerate(comparison.groupby(['solver', 'nfe', 'calibration'])):
        d = d.sort_values('snapshot_kimg')
        color, name = colors[i % len(colors)], f'{solver + " " if several else ""}NFE {nfe}'
        ax_fid.errorbar(d['snapshot_kimg'], d['uncalibrated'], yerr=d['uncalibrated_std'], marker='o', capsize=3,
                        color=color, label=f'{name}, uncalibrated')
        ax_fid.errorbar(d['snapshot_kimg'], d['calibrated'], yerr=d['calibrated_std'], marker='s', capsize=3, linestyle='--',
                        color=color, label=f'{name}, calibrated ({calibration_label})')
        ax_delta.errorbar(d['snapshot_kimg'], d['gain'], yerr=d['gain_std'], marker='o', capsize=3, color=color,
                          label=f'{name} ({calibration_label})')
    blocks = int(comparison['seed_blocks'].max()) if len(comparison) else 0
    ax_fid.set_xlabel('training kimg')
    ax_fid.set_ylabel(_axis_label(sweep, metric))
    ax_fid.set_title(f'mean +-1 std over {blocks} seed blocks')
    ax_delta.axhline(0, color='k', linewidth=0.8)
    ax_delta.set_xlabel('training kimg')
    ax_delta.set_ylabel(f'{"FID" if metric == "fid" else "Frechet distance"} gain (uncalibrated - calibrated)')
    ax_delta.set_title('gain from calibration, paired per seed block (+-1 std)')
    for ax in axes.flat:
        ax.grid(alpha=0.3, which='both')
        ax.legend(fontsize=7)
    for ax in (ax_gain, ax_fid, ax_delta):
        ax.set_xscale('log')
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def training_progress_markdown(sweep, likelihood):
    """One row per snapshot and setting: the metric without and with calibration (mean +- std over
    seed blocks), the paired gain, whether it is beyond the spread, and the likelihood-bound gain."""
    metric = metric_column(sweep)
    comparison = seed_block_comparison(sweep)
    gains = {(r.snapshot_kimg, r.source, r.table_images): r for r in likelihood.itertuples()}
    name = 'FID' if metric == 'fid' else 'Frechet distance'
    lines = [f'| kimg | solver | NFE | calibration | {name} uncalibrated | {name} calibrated | gain (paired) | beyond spread '
             '| likelihood gain, nats/image (+-SE; noise floor) |', '|---|---|---|---|---|---|---|---|---|']
    for r in comparison.sort_values(['solver', 'nfe', 'snapshot_kimg']).itertuples():
        source, _, images = r.calibration.partition(', ')
        g = gains.get((r.snapshot_kimg, source, int(images.split()[0]) if images else None))
        like = f'{g.likelihood_gain_nats:.3g} +- {g.likelihood_gain_se:.2g}; {g.likelihood_gain_noise_floor:.2g}' if g else ''
        lines.append(f'| {r.snapshot_kimg:g} | {r.solver} | {r.nfe} | {r.calibration} | {r.uncalibrated:.1f} +- '
                     f'{r.uncalibrated_std:.1f} | {r.calibrated:.1f} +- {r.calibrated_std:.1f} | {r.gain:+.1f} +- {r.gain_std:.1f} '
                     f'| {"yes" if r.beyond_spread else "no"} | {like} |')
    n, blocks = int(sweep['num_samples'].iloc[0]), int(comparison['seed_blocks'].max())
    lines.append(f'\n{name}: mean +- std over {blocks} seed blocks of {n} images each (block b: seeds b*{n}..(b+1)*{n}-1, the '
                 f'same with and without calibration) against {_reference_words(sweep)}; gain = uncalibrated - calibrated '
                 'per block; beyond spread: the two mean +- std intervals do not overlap.')
    return '\n'.join(lines)


def render(storage, experiment):
    """Write the experiment's figures and tables under <root>/<experiment>/ of `storage`
    (orchestrator.storage, or a root path or URI); returns the URIs (or paths) written."""
    storage = Storage.of(storage)
    if not any(storage.exists(results.table_key(experiment, t)) for t in results.TABLES):
        raise FileNotFoundError(f'{storage.uri(experiment)}: no results tables for experiment {experiment!r} (has it run?)')
    with storage.local_folder(experiment) as out_dir:
        names = [os.path.basename(path) for path in _render(storage, experiment, out_dir)]
    return [storage.uri(experiment, name) for name in names]


def _render(storage, experiment, out_dir):
    written = []
    try:
        sweep = results.read_table(storage, experiment, 'sweep')
    except FileNotFoundError:
        sweep = None
    if sweep is not None and len(sweep):
        everything = sweep
        rungs = results.read_table(storage, experiment, 'rungs') if storage.exists(results.table_key(experiment, 'rungs')) else None
        if rungs is not None and 'images' in rungs.columns and rungs['images'].nunique() > 1:  # the sweep searched
            written.append(rungs_figure(rungs, sweep, os.path.join(out_dir, 'rungs.png'), title=f'{experiment}: rungs'))
            written.append(search_figure(rungs, sweep, os.path.join(out_dir, 'search.png'), title=f'{experiment}: search'))
            written = [w for w in written if w]
            sweep = sweep[~results.stopped(sweep)]  # metrics of num_images samples only below
        last = _last_snapshot(sweep)
        kimg = last['snapshot_kimg'].iloc[0] if 'snapshot_kimg' in last.columns and len(last) < len(sweep) else None
        if last['nfe'].nunique() > 1:  # a line needs two NFEs (one NFE: sweep.md and training_progress say it all)
            written.append(fid_vs_nfe(last, os.path.join(out_dir, 'fid_vs_nfe.png'),
                                      title=experiment + ('' if kimg is None else f' ({kimg:g} kimg)')))
        if 'calibration_images' in sweep.columns and sweep['calibration_images'].nunique() > 1:
            written.append(fid_vs_calibration_images(last, os.path.join(out_dir, 'fid_vs_calibration_images.png'),
                                                     title=experiment))
        with open(os.path.join(out_dir, 'sweep.md'), 'w') as f:
            f.write(sweep_markdown(last) + '\n')
        written.append(os.path.join(out_dir, 'sweep.md'))
        if 'samples' in everything.columns and everything['samples'].notna().any():
            written.append(samples_sheet(everything, storage, experiment, os.path.join(out_dir, 'samples.png'),
                                         title=f'{experiment}: samples (seeds 0.., the same in every cell)'))
    try:
        cal = results.read_table(storage, experiment, 'calibration')
        written.append(calibration_figure(cal, os.path.join(out_dir, 'calibration.png')))
    except FileNotFoundError:
        cal = None
    if sweep is not None and cal is not None and 'snapshot_kimg' in sweep.columns and sweep['snapshot_kimg'].nunique() > 1 \
            and sweep['calibrated'].any() and not sweep['calibrated'].all():
        likelihood = results.read_table(storage, experiment, 'likelihood')
        written.append(training_progress(sweep, cal, likelihood, os.path.join(out_dir, 'training_progress.png'),
                                         title=f'{experiment}: calibration across training'))
        with open(os.path.join(out_dir, 'training_progress.md'), 'w') as f:
            f.write(training_progress_markdown(sweep, likelihood) + '\n')
        written.append(os.path.join(out_dir, 'training_progress.md'))
    return written
