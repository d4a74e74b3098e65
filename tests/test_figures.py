"""Figures and Markdown tables come from the Parquet rows alone (no Ray)."""
import os

import pandas as pd
import pytest

from orchestrator import figures, results

PROV = dict(experiment='fig', spec_hash='0' * 16, stage='sweep', stage_hash='1' * 16, code_version='test', seed=0, device='cpu')


def _row(steps, calibrated, source=None, images=None, fid=0.0):
    return dict(label=f'dpm_solver steps={steps}', sampler='dpm_solver', calibrated=calibrated, calibration_source=source,
                calibration_images=images, params=dict(order=2, steps=steps), nfe=steps, fid=fid, num_samples=100,
                reference_count=500, feature_extractor='inception-v3-compat')


def test_table4_sweep_renders_every_row_and_both_figures(tmp_path):
    rows = []
    for steps in (10, 20):
        rows.append(_row(steps, False, fid=50.0 + steps))
        for source in ('data', 'generated'):
            for n in (500, 2000):
                rows.append(_row(steps, True, source, n, fid=40.0 + steps + n / 1000 + (source == 'generated') / 10))
    root = str(tmp_path)
    results.write_table(root, 'fig', 'sweep', rows, PROV)
    written = figures.render(root, 'fig')
    assert {os.path.basename(p) for p in written} == {'fid_vs_nfe.png', 'fid_vs_calibration_images.png', 'sweep.md'}
    md = open(os.path.join(root, 'fig', 'sweep.md')).read()
    lines = [line for line in md.splitlines() if line.startswith('| dpm_solver')]
    # One line per (solver, calibration): uncalibrated first, then each table, NFE as columns.
    assert [line.split(' | ')[1] for line in lines] == ['no', 'data, 500 images', 'data, 2000 images',
                                                         'generated, 500 images', 'generated, 2000 images']
    for r in rows:
        assert f'{r["fid"]:.2f}' in md
    assert sum(line.startswith('|') for line in md.splitlines()) == 2 + len(lines)  # header, rule, one per solver row


def test_results_without_calibration_columns_still_render(tmp_path):
    """Tables written before the calibration table was a sweep axis have neither column."""
    rows = [{k: v for k, v in _row(s, c, fid=f).items() if not k.startswith('calibration_')}
            for s, c, f in ((10, False, 30.0), (10, True, 29.0), (20, False, 28.0))]
    results.write_table(str(tmp_path), 'old', 'sweep', rows, PROV)
    df = pd.read_parquet(os.path.join(tmp_path, 'old', 'sweep.parquet'))
    md = figures.sweep_markdown(df)
    assert '| no | 30.00 |' in md and '| yes | 29.00 |' in md
    assert [os.path.basename(p) for p in figures.render(str(tmp_path), 'old')] == ['fid_vs_nfe.png', 'sweep.md']


def test_training_progress_from_parquet_rows(tmp_path):
    """Snapshots of one training run: training_progress.png and .md from the sweep, calibration
    and likelihood tables. The comparison is paired per seed block: block b of the calibrated and
    uncalibrated rows used the same seeds. Means, standard deviations and the paired gain are
    checked against hand computations; 'beyond spread' when the mean +- std intervals are apart."""
    blocks = {  # kimg: (uncalibrated blocks, calibrated blocks)
        1.0: ([350.0, 356.0, 353.0], [260.0, 264.0, 262.0]),  # far apart
        20.0: ([100.0, 104.0, 102.0], [101.0, 103.0, 100.5]),  # within the spread
    }
    rows, cal, like = [], [], []
    for kimg, (u, c) in blocks.items():
        for calibrated, values in ((False, u), (True, c)):
            row = _row(10, calibrated, 'data' if calibrated else None, 1000 if calibrated else None, fid=min(values))
            rows.append(dict(row, snapshot_kimg=kimg, fid_blocks=values, fid_mean=sum(values) / 3, seed_blocks=3, num_samples=50))
        for sigma, e2 in ((0.01, 5.0 / kimg), (1.0, 1.0 / kimg), (80.0, 0.1 / kimg)):
            cal.append(dict(snapshot_kimg=kimg, source='data', table_images=1000, sigma=sigma, images=1000, c_norm2=e2 * sigma ** 2,
                            mean_eps_norm2=e2, mean_eps_norm2_se=e2 / 10))
        like.append(dict(snapshot_kimg=kimg, source='data', table_images=1000, likelihood_gain_nats=10.0 / kimg,
                         likelihood_gain_se=0.5 / kimg, likelihood_gain_noise_floor=0.01, likelihood_gain_bpd=0.0, grid_points=3))
    root = str(tmp_path)
    results.write_table(root, 'prog', 'sweep', rows, PROV)
    results.write_table(root, 'prog', 'calibration', cal, PROV)
    results.write_table(root, 'prog', 'likelihood', like, PROV)
    written = {os.path.basename(p) for p in figures.render(root, 'prog')}
    assert {'training_progress.png', 'training_progress.md', 'sweep.md', 'calibration.png'} == written  # one NFE: no NFE plot
    comparison = figures.seed_block_comparison(pd.read_parquet(os.path.join(root, 'prog', 'sweep.parquet')))
    first = comparison[comparison['snapshot_kimg'] == 1.0].iloc[0]
    assert (first['uncalibrated'], first['uncalibrated_std']) == (353.0, 3.0)  # std of 350, 356, 353 (ddof 1)
    assert first['calibrated'] == 262.0 and first['calibrated_std'] == 2.0
    assert first['gain'] == 91.0 and first['gain_std'] == 1.0  # paired: 90, 92, 91
    last = comparison[comparison['snapshot_kimg'] == 20.0].iloc[0]
    assert last['gain'] == pytest.approx(0.5) and bool(first['beyond_spread']) and not bool(last['beyond_spread'])
    md = open(os.path.join(root, 'prog', 'training_progress.md')).read()
    assert '| 1 | dpm_solver order=2 | 10 | data, 1000 images | 353.0 +- 3.0 | 262.0 +- 2.0 | +91.0 +- 1.0 | yes | 10 +- 0.5; 0.01 |' in md
    assert '| 20 | dpm_solver order=2 | 10 | data, 1000 images | 102.0 +- 2.0 | 101.5 +- 1.3 | +0.5 +- 1.3 | no |' in md
    # The NFE table and figure show the last snapshot only.
    sweep_md = open(os.path.join(root, 'prog', 'sweep.md')).read()
    assert '100.00' in sweep_md and '350.00' not in sweep_md


def test_search_figures_from_the_sweep_and_rungs_tables(tmp_path):
    """A search's tables: rungs.png and search.png; the NFE figure and sweep.md hold only the
    trials that reached num_images (a stopped trial's value is of fewer images)."""
    rows, rungs = [], []
    for i, (steps, stopped) in enumerate(((4, True), (6, False), (10, False), (16, True))):
        values = [300.0 - 10 * steps, 280.0 - 10 * steps, 250.0 - 10 * steps][:1 if stopped else 3]
        row = dict(_row(steps, False, fid=values[-1]), trial_hash=f'h{i}', stopped=stopped, images=[32, 96, 256][len(values) - 1])
        rows.append(row)
        rungs += [dict(trial_hash=f'h{i}', label=row['label'], rung=k, images=[32, 96, 256][k], fid=v, nfe=steps, seconds=1.0)
                  for k, v in enumerate(values)]
    root = str(tmp_path)
    results.write_table(root, 'fig', 'sweep', rows, PROV)
    results.write_table(root, 'fig', 'rungs', rungs, PROV)
    written = {os.path.basename(p) for p in figures.render(root, 'fig')}
    assert {'rungs.png', 'search.png', 'fid_vs_nfe.png', 'sweep.md'} <= written
    md = open(os.path.join(root, 'fig', 'sweep.md')).read()
    assert f'{rows[1]["fid"]:.2f}' in md and f'{rows[2]["fid"]:.2f}' in md
    assert f'{rows[0]["fid"]:.2f}' not in md and f'{rows[3]["fid"]:.2f}' not in md


def test_sample_sheet_from_parquet_and_pngs_alone(tmp_path):
    """samples.png from sweep.parquet and samples/<trial_hash>.png only: a row per setting, a
    column per calibration (uncalibrated first), the metric over each cell."""
    import numpy as np
    import PIL.Image
    import torch
    from tasks import data
    root = tmp_path / 'r'
    rows = []
    for i, (steps, calibrated) in enumerate(((4, False), (4, True), (10, False), (10, True))):
        row = dict(_row(steps, calibrated, 'data' if calibrated else None, 500 if calibrated else None, fid=30.0 - i),
                   trial_hash=f'h{i}', samples=f'samples/h{i}.png', stopped=False, images=100)
        os.makedirs(root / 'fig' / 'samples', exist_ok=True)
        data.save_image_grid(torch.full((8, 1, 4, 4), 30 * i, dtype=torch.uint8), str(root / 'fig' / row['samples']), nrow=8)
        rows.append(row)
    results.write_table(str(root), 'fig', 'sweep', rows, PROV)
    written = {os.path.basename(p) for p in figures.render(str(root), 'fig')}
    assert 'samples.png' in written
    sheet = np.array(PIL.Image.open(root / 'fig' / 'samples.png'))
    assert sheet.shape[0] > 200 and sheet.shape[1] > 300
