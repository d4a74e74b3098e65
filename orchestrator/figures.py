"""Figures and Markdown tables from the Parquet results (never from anything else).

fid_vs_nfe.png: the sweep's metric against NFE, one colour per solver setting, solid without
and dashed with calibration (Calib Table 1 / EDM Fig. 2 style); sweep.md: the same numbers as a
table; calibration.png: ||E[eps]||^2 per sigma (Calib Fig. 1, left).
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


def fid_vs_nfe(df, path, title=''):
    metric = metric_column(df)
    df = df.assign(solver=df.apply(solver_label, axis=1))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = plt.rcParams['axes.prop_cycle'].by_key()['color']
    for i, (solver, group) in enumerate(sorted(df.groupby('solver'), key=lambda g: g[0])):
        for calibrated, style in ((False, '-'), (True, '--')):
            g = group[group['calibrated'] == calibrated].sort_values('nfe')
            if len(g):
                ax.plot(g['nfe'], g[metric], style, marker='o', color=colors[i % len(colors)],
                        label=f'{solver}{" + calibration" if calibrated else ""}')
    n = int(df['num_samples'].iloc[0])
    label = 'FID' if metric == 'fid' else 'Frechet distance (NOT FID: other features)'
    ax.set_xlabel('NFE (denoiser evaluations)')
    ax.set_ylabel(f'{label}, {n} samples vs {int(df["reference_count"].iloc[0])} reference')
    ax.set_title(title or 'sample quality vs NFE (dashed: calibrated)')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def sweep_markdown(df):
    """Rows: solver settings (and calibrated); columns: NFE; cells: the metric."""
    metric = metric_column(df)
    df = df.assign(solver=df.apply(solver_label, axis=1))
    nfes = sorted(df['nfe'].unique())
    lines = ['| solver | calibrated | ' + ' | '.join(f'NFE {int(n)}' for n in nfes) + ' |',
             '|---|---|' + '---|' * len(nfes)]
    for (solver, calibrated), g in sorted(df.groupby(['solver', 'calibrated'])):
        cells = [f'{g[g["nfe"] == n][metric].iloc[0]:.2f}' if (g['nfe'] == n).any() else '' for n in nfes]
        lines.append(f'| {solver} | {"yes" if calibrated else "no"} | ' + ' | '.join(cells) + ' |')
    n, ref = int(df['num_samples'].iloc[0]), int(df['reference_count'].iloc[0])
    what = 'FID (Inception-v3 2015-12-05)' if metric == 'fid' else f'Frechet distance on {df["feature_extractor"].iloc[0]} (not FID)'
    lines.append(f'\n{what}, {n} generated images (seeds 0..{n - 1}) against {ref} reference images.')
    return '\n'.join(lines)


def calibration_figure(df, path):
    fig, ax = plt.subplots(figsize=(6, 4))
    d = df.sort_values('sigma')
    ax.loglog(d['sigma'], d['mean_eps_norm2'], marker='.', label='||E[eps]||^2 (Calib Eq. 27 gap)')
    ax.fill_between(d['sigma'], (d['mean_eps_norm2'] - 2 * d['mean_eps_norm2_se']).clip(lower=1e-12),
                    d['mean_eps_norm2'] + 2 * d['mean_eps_norm2_se'], alpha=0.2, label='+-2 standard errors')
    ax.set_xlabel('sigma')
    ax.set_ylabel('||E_q[eps(x; sigma)]||^2')
    ax.set_title(f'calibration term, {int(d["images"].iloc[0])} images')
    ax.grid(alpha=0.3, which='both')
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


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
        with open(os.path.join(out_dir, 'sweep.md'), 'w') as f:
            f.write(sweep_markdown(sweep) + '\n')
        written.append(os.path.join(out_dir, 'sweep.md'))
    try:
        cal = results.read_table(root, experiment, 'calibration')
        written.append(calibration_figure(cal, os.path.join(out_dir, 'calibration.png')))
    except FileNotFoundError:
        pass
    return written
