"""Figures and Markdown tables from the Parquet results (never from anything else).

fid_vs_nfe.png: the sweep's metric against NFE, one colour per solver setting, solid without
calibration, dashed calibrated on data, dotted on generated samples (Calib Table 1 / EDM Fig. 2
style; with several image counts, the largest); fid_vs_calibration_images.png: the metric
against the number of images in the estimate (Calib Table 4), when the sweep has several;
sweep.md: every number as a table; calibration.png: ||E[eps]||^2 per sigma (Calib Fig. 1, left).
"""
import json
import os

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402

from orchestrator import results  # noqa: E402

STEP_KEYS = ('steps', 'num_steps')


def metric_column(df):
    """'fid' when the FID network measured the sweep, else the labelled Frechet distance."""
    return 'fid' if 'fid' in df.columns and df['fid'].notna().any() else 'frechet_distance'


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
    what = 'FID (Inception-v3 2015-12-05)' if metric == 'fid' else f'Frechet distance on {df["feature_extractor"].iloc[0]} (not FID)'
    lines.append(f'\n{what}, {n} generated images (seeds 0..{n - 1}) against {_reference_words(df)}.')
    return '\n'.join(lines)


def calibration_figure(df, path):
    """||E[eps]||^2 per sigma with +-2 standard errors, one line per table (source, images)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    keys = [c for c in ('source', 'table_images') if c in df.columns]
    for key, d in (df.groupby(keys) if keys else [((), df)]):
        d = d.sort_values('sigma')
        what = ', '.join(map(str, key)) + ' images' if keys else f'{int(d["images"].iloc[0])} images'
        line, = ax.loglog(d['sigma'], d['mean_eps_norm2'], marker='.', label=what)
        ax.fill_between(d['sigma'], (d['mean_eps_norm2'] - 2 * d['mean_eps_norm2_se']).clip(lower=1e-12),
                        d['mean_eps_norm2'] + 2 * d['mean_eps_norm2_se'], alpha=0.2, color=line.get_color())
    ax.set_xlabel('sigma')
    ax.set_ylabel('||E_q[eps(x; sigma)]||^2 (Calib Eq. 27 gap)')
    ax.set_title('calibration term (bands: +-2 standard errors)')
    return _save(fig, ax, path)


def render(root, experiment):
    """Write the experiment's figures and tables; returns the paths written."""
    out_dir = os.path.join(root, experiment)
    written = []
    try:
        sweep = results.read_table(root, experiment, 'sweep')
    except FileNotFoundError:
        sweep = None
    if sweep is not None and len(sweep):
        written.append(fid_vs_nfe(sweep, os.path.join(out_dir, 'fid_vs_nfe.png'), title=experiment))
        if 'calibration_images' in sweep.columns and sweep['calibration_images'].nunique() > 1:
            written.append(fid_vs_calibration_images(sweep, os.path.join(out_dir, 'fid_vs_calibration_images.png'),
                                                     title=experiment))
        with open(os.path.join(out_dir, 'sweep.md'), 'w') as f:
            f.write(sweep_markdown(sweep) + '\n')
        written.append(os.path.join(out_dir, 'sweep.md'))
    try:
        cal = results.read_table(root, experiment, 'calibration')
        written.append(calibration_figure(cal, os.path.join(out_dir, 'calibration.png')))
    except FileNotFoundError:
        pass
    return written
