"""The Parquet store: results/<experiment>/<table>.parquet, one table per kind.

Tables (columns documented in results/README.md): train_log, calibration, sweep, timings.
Every row carries the provenance columns of PROVENANCE. Writes go to a temporary file that is
renamed into place, so a reader never sees a half-written file and two experiments (separate
folders) never touch each other's files. Read them with pandas:

    pd.read_parquet('results/quickstart/sweep.parquet')
"""
import datetime
import json
import os
import subprocess

import pandas as pd

from tasks.files import atomic_write

TABLES = ('train_log', 'calibration', 'sweep', 'timings')
PROVENANCE = ('experiment', 'spec_hash', 'stage', 'stage_hash', 'code_version', 'seed', 'device', 'created_at')


def code_version():
    """git commit of the code (with '+dirty' for uncommitted changes), else the package version."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        sha = subprocess.run(['git', 'rev-parse', '--short=12', 'HEAD'], cwd=here, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'], cwd=here, capture_output=True,
                               text=True, timeout=10).stdout.strip()
        if sha:
            return sha + ('+dirty' if dirty else '')
    except (OSError, subprocess.SubprocessError):
        pass
    from importlib.metadata import PackageNotFoundError, version
    try:
        return 'v' + version('calib-edm-orchestrator')
    except PackageNotFoundError:
        return 'unknown'


def table_path(root, experiment, table):
    if table not in TABLES:
        raise ValueError(f'unknown results table {table!r}; valid: {", ".join(TABLES)}')
    return os.path.join(root, experiment, f'{table}.parquet')


def write_table(root, experiment, table, rows, provenance):
    """Replace results/<experiment>/<table>.parquet by `rows` (dicts) with the provenance columns
    added; config-like values (dicts, lists) are stored as JSON strings. Atomic."""
    records = []
    created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')
    for row in rows:
        rec = {k: provenance.get(k) for k in PROVENANCE}
        rec['created_at'] = provenance.get('created_at', created)
        for k, v in row.items():
            rec[k] = json.dumps(v, sort_keys=True, default=str) if isinstance(v, (dict, list, tuple)) else v
        records.append(rec)
    df = pd.DataFrame.from_records(records, columns=None if records else list(PROVENANCE))
    path = table_path(root, experiment, table)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return atomic_write(path, lambda tmp: df.to_parquet(tmp, index=False))


def write_json(path, obj):
    """Indented JSON (other values as strings), written atomically."""
    def write(tmp):
        with open(tmp, 'w') as f:
            json.dump(obj, f, indent=1, default=str)
    return atomic_write(path, write)


def read_table(root, experiment, table):
    path = table_path(root, experiment, table)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{path}: no {table} table for experiment {experiment!r} (has it run?)')
    return pd.read_parquet(path)


def experiments(root):
    """Experiments under root that have at least one results table."""
    if not os.path.isdir(root):
        return []
    return sorted(d for d in os.listdir(root)
                  if any(os.path.isfile(os.path.join(root, d, f'{t}.parquet')) for t in TABLES))
