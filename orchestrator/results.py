"""The Parquet store: <results root>/<experiment>/<table>.parquet, one table per kind.

Tables (columns documented in results/README.md): train_log, calibration, likelihood, sweep,
rungs, timings. Every row carries the provenance columns of PROVENANCE. The root is a local/NFS path
or an object-store URI (orchestrator.storage); each table is written whole (a temporary name
and a rename on a local root, one upload on an object store), so a reader never sees half a
file. Read them with pandas, from a folder or straight from the bucket (pyarrow takes the
credentials and AWS_ENDPOINT_URL from the environment):

    pd.read_parquet('results/quickstart/sweep.parquet')
    pd.read_parquet('s3://bucket/prefix/quickstart/sweep.parquet')
"""
import contextlib
import datetime
import io
import json
import os
import socket
import subprocess
import threading
import time
import uuid

import pandas as pd

from orchestrator.storage import Storage

TABLES = ('train_log', 'calibration', 'likelihood', 'sweep', 'rungs', 'timings')
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


def table_key(experiment, table):
    if table not in TABLES:
        raise ValueError(f'unknown results table {table!r}; valid: {", ".join(TABLES)}')
    return f'{experiment}/{table}.parquet'


def write_table(storage, experiment, table, rows, provenance):
    """Replace <root>/<experiment>/<table>.parquet by `rows` (dicts) with the provenance columns
    added; config-like values (dicts, lists) are stored as JSON strings. Returns its URI."""
    records = []
    created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')
    for row in rows:
        rec = {k: provenance.get(k) for k in PROVENANCE}
        rec['created_at'] = provenance.get('created_at', created)
        for k, v in row.items():
            rec[k] = json.dumps(v, sort_keys=True, default=str) if isinstance(v, (dict, list, tuple)) else v
        records.append(rec)
    df = pd.DataFrame.from_records(records, columns=None if records else list(PROVENANCE))
    buffer = io.BytesIO()
    df.to_parquet(buffer, index=False)
    return Storage.of(storage).write_bytes(table_key(experiment, table), buffer.getvalue())


def read_table(storage, experiment, table):
    storage = Storage.of(storage)
    key = table_key(experiment, table)
    if not storage.exists(key):
        raise FileNotFoundError(f'{storage.uri(key)}: no {table} table for experiment {experiment!r} (has it run?)')
    return pd.read_parquet(io.BytesIO(storage.read_bytes(key)))


def metric_column(df):
    """'fid' when the FID network measured the sweep, else the labelled Frechet distance."""
    return 'fid' if 'fid' in df.columns and df['fid'].notna().any() else 'frechet_distance'


def stopped(sweep):
    """Which rows of a sweep table a search stopped early (their metric is of fewer images);
    none in tables from before searches."""
    return sweep['stopped'].fillna(False).astype(bool) if 'stopped' in sweep.columns else pd.Series(False, index=sweep.index)


def experiments(storage):
    """Experiments under the root that have at least one results table."""
    storage = Storage.of(storage)
    tables = {f'{t}.parquet' for t in TABLES}
    return [d for d in storage.list() if not d.startswith('.') and tables & set(storage.list(d))]


# ---------------------------------------------------------------------------------------------
# One run per experiment: a lease object under the root that the running driver renews.

LEASE_SECONDS = 30.0   # a lease not renewed this long belongs to a dead driver (hosts' clocks agree to seconds)
RENEW_SECONDS = 5.0


class ExperimentBusy(RuntimeError):
    """Another live process is running the same experiment."""


def lease_key(experiment):
    return f'{experiment}/.lease.json'


@contextlib.contextmanager
def experiment_lease(storage, experiment, log=print):
    """Hold <root>/<experiment>/.lease.json (owner, host, pid, start, expiry) while a run works on
    the experiment, renewing it every RENEW_SECONDS, so that two runs never do the same work in the
    same stage folders, on any root and from any host. A second run is refused naming the owner;
    a lease past its expiry (its driver died, on whatever host) or of a process gone from this
    host is taken over, saying so. An object store has no create-if-absent here, so after writing
    the run reads the lease back: of two runs starting in the same instant, the later writer wins
    and the other is refused."""
    storage, key = Storage.of(storage), lease_key(experiment)
    me = dict(owner=uuid.uuid4().hex, pid=os.getpid(), host=socket.gethostname(),
              started=time.strftime('%Y-%m-%d %H:%M:%S %Z'), expires=time.time() + LEASE_SECONDS)
    if storage.exists(key):
        held = storage.read_json(key)
        gone = held.get('host') == me['host'] and not _alive(held.get('pid'))
        if held.get('expires', 0) > time.time() and not gone:
            raise ExperimentBusy(f'experiment {experiment!r} is being run by pid {held.get("pid")} on {held.get("host")} '
                                 f'since {held.get("started")} ({storage.uri(key)}); wait for it (a lease not renewed '
                                 f'for {LEASE_SECONDS:g} s is taken over)')
        why = 'its process is gone' if gone else f'not renewed since {time.ctime(held.get("expires", 0) - LEASE_SECONDS)}'
        log(f'taking over the lease of experiment {experiment!r} from pid {held.get("pid")} on {held.get("host")} ({why})')
    storage.write_json(key, me)
    time.sleep(0.2)
    if storage.read_json(key).get('owner') != me['owner']:
        held = storage.read_json(key)
        raise ExperimentBusy(f'experiment {experiment!r} was just started by pid {held.get("pid")} on {held.get("host")}')
    stop = threading.Event()

    def renew():
        while not stop.wait(RENEW_SECONDS):
            me['expires'] = time.time() + LEASE_SECONDS
            try:
                storage.write_json(key, me)
            except OSError:
                pass  # a passing storage error: the next renewal tries again, well within the lease
    thread = threading.Thread(target=renew, name='lease', daemon=True)
    thread.start()
    try:
        yield storage.uri(key)
    finally:
        stop.set()
        thread.join()
        storage.delete(key)


def _alive(pid):
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, TypeError, ValueError):
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def run_key(experiment):
    return f'{experiment}/run.json'


class RunRecord:
    """<root>/<experiment>/run.json: what the last run of the experiment did, kept as it goes so
    that `orchestrator show` can tell, from storage alone, a finished, a running and a failed run:
    status (running, done, failed, interrupted), start and end, the stages done (name, hash, ran
    or reused, seconds), the stage at work, the failed stage's one-line error, and a summary of the
    sweep so far (best row, rung counts). Written by the run that holds the experiment's lease."""

    def __init__(self, storage, experiment, spec_hash, stages):
        self.storage, self.key = Storage.of(storage), run_key(experiment)
        self.data = dict(experiment=experiment, spec_hash=spec_hash, status='running', host=socket.gethostname(),
                         pid=os.getpid(), started=now_iso(), ended=None, plan=[dict(name=s.name, hash=s.hash) for s in stages],
                         stages_done=[], stage=None, error=None, sweep=None)
        self.save()

    def save(self):
        self.storage.write_json(self.key, self.data)

    def update(self, **fields):
        self.data.update(fields)
        self.save()

    def stage_done(self, name, hash, status, seconds):
        self.data['stages_done'].append(dict(name=name, hash=hash, status=status, seconds=round(seconds, 3)))
        self.update(stage=None)

    def end(self, error=None):
        """Done, or what stopped the run: an exception (its first line) or Ctrl-C."""
        status = 'done' if error is None else 'interrupted' if isinstance(error, KeyboardInterrupt) else 'failed'
        text = '' if error is None else (str(error).strip().splitlines() or [''])[0]
        self.update(status=status, ended=now_iso(), error=None if error is None else f'{type(error).__name__}: {text}'.rstrip(': '))


def now_iso():
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')


def show(storage, experiment, now=None):
    """What is stored of an experiment, as lines of text (`orchestrator show`): the last run (done,
    running with its owner and since when, failed with the stage and its error, or dead: running
    in run.json but its lease expired), each stage of its plan (done, running, not run), the
    sweep's progress and the best rows of sweep.parquet. Reads storage only: no plan, no Ray."""
    storage, now = Storage.of(storage), now or time.time()
    if not storage.exists(run_key(experiment)) and not storage.exists(f'{experiment}/spec.json'):
        raise FileNotFoundError(f'{storage.uri(experiment)}: no experiment {experiment!r} (has it run?)')
    run = storage.read_json(run_key(experiment)) if storage.exists(run_key(experiment)) else None
    lease = storage.read_json(lease_key(experiment)) if storage.exists(lease_key(experiment)) else None
    lines = [f'experiment {experiment} at {storage.uri(experiment)}' + (f' (spec {run["spec_hash"]})' if run else '')]
    if run is None:
        lines.append('last run: not recorded (results written before run.json existed)')
    elif run['status'] == 'running' and lease and lease.get('expires', 0) > now:
        stage = run.get('stage') or {}
        lines.append(f'last run: running since {run["started"]}, pid {lease.get("pid")} on {lease.get("host")} (lease renewed '
                     f'{max(0, now - (lease["expires"] - LEASE_SECONDS)):.0f} s ago)'
                     + (f'; stage {stage["name"]} since {stage["since"]}' if stage else ''))
    elif run['status'] == 'running':
        lines.append(f'last run: died (started {run["started"]} by pid {run["pid"]} on {run["host"]}; its lease is gone or '
                     'expired without an end being recorded); the same command goes on from what had finished')
    elif run['status'] == 'done':
        lines.append(f'last run: done (started {run["started"]}, ended {run["ended"]})')
    else:
        stage = (run.get('stage') or {}).get('name', '?')
        lines.append(f'last run: {run["status"]} in stage {stage} (started {run["started"]}, ended {run["ended"]}): {run["error"]}')
    plan = run['plan'] if run else [dict(name=n.rsplit('-', 1)[0], hash=n.rsplit('-', 1)[1])
                                    for n in storage.list(f'{experiment}/stages') if '-' in n]
    done = {(d['name'], d['hash']): d for d in (run or {}).get('stages_done', [])}
    current = (run or {}).get('stage') or {}
    lines.append('stages:')
    for s in plan:
        if storage.exists(f'{experiment}/stages/{s["name"]}-{s["hash"]}/DONE.json'):
            d = done.get((s['name'], s['hash']))
            state = 'done' + (f' ({d["status"]} in this run, {d["seconds"]:.0f} s)' if d else '')
        elif current.get('hash') == s['hash'] and run['status'] == 'running':
            state = f'running since {current["since"]}'
        elif current.get('hash') == s['hash']:
            state = run['status']
        else:
            state = 'not run'
        lines.append(f'  {s["name"]:<11} {s["hash"]:<17} {state}')
    sweep = (run or {}).get('sweep')
    if sweep:
        best = sweep.get('best')
        metric = next((k for k in (best or {}) if k != 'label'), 'fid')
        lines.append(f'sweep{" so far" if run["status"] == "running" else ""}: {sweep.get("trials_done")} trial(s) done'
                     + (f'; best {metric} {best[metric]:.2f} (first seed block): {best["label"]}' if best else '')
                     # rung counts only for a search (a grid's one rung is num_images)
                     + ('; rungs ' + ' '.join(f'{k}:{v}' for k, v in sweep['rungs'].items()) if len(sweep.get('rungs') or {}) > 1
                        else ''))
        if sweep.get('grid_images'):
            lines.append(f'images generated: {sweep["images_generated"]} of the grid\'s {sweep["grid_images"]} '
                         f'({100 * sweep["images_generated"] / sweep["grid_images"]:.1f}%)')
    if storage.exists(table_key(experiment, 'sweep')):
        df = read_table(storage, experiment, 'sweep')
        metric = metric_column(df)
        if metric in df.columns and df[metric].notna().any():
            df = df[~stopped(df)]  # a stopped trial's value is of fewer images
            cols = [c for c in ('label', 'nfe', metric, 'images') if c in df.columns]
            lines.append(f'best rows of sweep.parquet (written {df["created_at"].iloc[0]}):')
            lines += ['  ' + line for line in df.nsmallest(5, metric)[cols].to_string(index=False).splitlines()]
    return lines
