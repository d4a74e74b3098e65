"""The Parquet store: results/<experiment>/<table>.parquet, one table per kind.

Tables (columns documented in results/README.md): train_log, calibration, sweep, timings.
Every row carries the provenance columns of PROVENANCE. Writes go to a temporary file that is
renamed into place, so a reader never sees a half-written file and two experiments (separate
folders) never touch each other's files. Read them with pandas:

    pd.read_parquet('results/quickstart/sweep.parquet')
"""
import contextlib
import datetime
import json
import os
import socket
import subprocess
import time

import pandas as pd

from tasks.files import atomic_write

TABLES = ('train_log', 'calibration', 'likelihood', 'sweep', 'timings')
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


class ExperimentBusy(RuntimeError):
    """Another live process is running the same experiment."""


@contextlib.contextmanager
def experiment_lock(root, experiment):
    """Hold <root>/<experiment>/.lock while a run works in that folder, so that two runs of one
    experiment never do the same work in the same stage folders. A second run is refused with
    the first one's pid, host and start time; the lock of a process that is gone (same host, no
    such pid) is taken over."""
    path = os.path.join(root, experiment, '.lock')
    os.makedirs(os.path.dirname(path), exist_ok=True)
    me = dict(pid=os.getpid(), host=socket.gethostname(), started=time.strftime('%Y-%m-%d %H:%M:%S %Z'))
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                with open(path) as f:
                    owner = json.load(f)
            except (OSError, ValueError):
                owner = None  # being written or removed right now: look again
            if owner is not None and not (owner.get('host') == me['host'] and not _alive(owner.get('pid'))):
                raise ExperimentBusy(f'experiment {experiment!r} is being run by pid {owner.get("pid")} on '
                                     f'{owner.get("host")} since {owner.get("started")} ({path}); wait for it, or remove '
                                     'the lock file if that run is gone') from None
            if owner is not None:  # a dead process's lock: take it over
                os.remove(path)
            time.sleep(0.05)
            continue
        with os.fdopen(fd, 'w') as f:
            json.dump(me, f)
        break
    try:
        yield path
    finally:
        os.remove(path)


def _alive(pid):
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, TypeError, ValueError):
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True
