"""Figures and Markdown tables come from the Parquet rows alone (no Ray)."""
import os

import pandas as pd

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
            for s, c, f in ((10, False, 30.0), (10, True, 29.0))]
    results.write_table(str(tmp_path), 'old', 'sweep', rows, PROV)
    df = pd.read_parquet(os.path.join(tmp_path, 'old', 'sweep.parquet'))
    md = figures.sweep_markdown(df)
    assert '| no | 30.00 |' in md and '| yes | 29.00 |' in md
    assert [os.path.basename(p) for p in figures.render(str(tmp_path), 'old')] == ['fid_vs_nfe.png', 'sweep.md']
