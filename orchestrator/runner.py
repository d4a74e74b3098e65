"""Runs a spec's stages on Ray: the embedded local cluster by default, or an existing one.

The embedded cluster binds to 127.0.0.1 only (its dashboard too, which Ray Train V2 needs), with
explicit CPU count and object-store memory, and with Ray's token auth disabled (nothing outside
this machine can reach it). An existing cluster (--address) is used as its owner configured it.
"""
import contextlib
import dataclasses
import importlib
import os
import socket
import sys
import time

from orchestrator import checks, figures, plan, results
from orchestrator.spec import SpecError, StageFailed, stable_hash
from orchestrator.storage import Storage

OBJECT_STORE_BYTES = 512 * 1024 ** 2
# What a driver joining a cluster does not ship as its working_dir: results, environments, Git.
RUNTIME_ENV_EXCLUDES = ['results/*/stages', 'results/.trials', 'results/inputs', 'runs', '.venv', '.device', '.git',
                        '__pycache__']


@dataclasses.dataclass
class RunOptions:
    """How a run talks and waits, the same for every stage (nothing here changes a result).
    stall_timeout: seconds a stage may go without progress (work waiting for resources a lost
    node took with it) before it gives up and says so."""
    log: object = print
    verbose: bool = False
    stall_timeout: float = 600.0
    record: object = None                  # results.RunRecord of the run (run.json), or None
    tracker: object = None                 # tracking.Tracker (report.mlflow), or None


def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on now (so the embedded cluster never
    collides with another Ray instance's fixed default ports)."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def init_ray(address=None, num_cpus=None, verbose=False):
    """Connect to `address`, or start the embedded single-node cluster on loopback. Inside a
    Ray job (orchestrator submit), RAY_ADDRESS names the job's cluster: join it. Returns the
    dashboard URL (http://HOST:PORT) of the cluster this process started, else None.
    Worker output (Ray Train's reports, Tune's tables, tqdm from workers) reaches this terminal
    only with `verbose`; otherwise it stays in Ray's session logs and the orchestrator prints
    its own progress."""
    if not address and not os.environ.get('RAY_ADDRESS'):
        _loopback_environment()  # before ray is imported: Ray reads these at import
    import ray
    if ray.is_initialized():
        return None
    if not address and os.environ.get('RAY_ADDRESS'):
        ray.init(log_to_driver=verbose, logging_level='INFO' if verbose else 'WARNING')
        return None
    if address:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        # Ray's own default excludes (.git, ...) are in ours: without this it warns about them on every run.
        os.environ.setdefault('RAY_OVERRIDE_RUNTIME_ENV_DEFAULT_EXCLUDES', '')
        ray.init(address=address, runtime_env=dict(working_dir=root, excludes=RUNTIME_ENV_EXCLUDES), log_to_driver=verbose,
                 logging_level='INFO' if verbose else 'WARNING')  # Ray's connection lines only with --verbose
        return None
    # address='local': always a cluster of our own, even when `ray start` left one on this machine.
    # The dashboard (on 127.0.0.1, a free port) serves the State API that Ray Train V2's controller polls.
    context = ray.init(address='local', num_cpus=num_cpus or os.cpu_count(), object_store_memory=OBJECT_STORE_BYTES,
                       include_dashboard=True, dashboard_host='127.0.0.1', dashboard_port=free_port(),
                       _node_ip_address='127.0.0.1', log_to_driver=verbose, logging_level='WARNING')
    return f'http://{context.dashboard_url}'


def _loopback_environment():
    """The embedded cluster's environment, inherited by every Ray process it starts: the node
    address is 127.0.0.1 (so Ray's servers, and torch's process-group store, listen on loopback
    only), gloo and NCCL use the loopback interface, and token auth is off (nothing else can
    connect). Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER once, at import; without it ray.init
    turns 127.0.0.1 into the machine's outward address. When ray was imported before (a test
    session, a notebook), its constant is re-read from the variable."""
    os.environ.setdefault('RAY_AUTH_MODE', 'disabled')
    os.environ.setdefault('RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER', '0')
    loopback = [name for _, name in socket.if_nameindex() if name.startswith('lo')]  # lo (Linux), lo0 (macOS)
    for variable in ('GLOO_SOCKET_IFNAME', 'NCCL_SOCKET_IFNAME') if loopback else ():  # training's collectives
        os.environ.setdefault(variable, loopback[0])
    constants = sys.modules.get('ray._private.ray_constants')
    if constants is not None:
        constants.ENABLE_RAY_CLUSTER = constants.env_bool(constants.ENABLE_RAY_CLUSTERS_ENV_VAR, not constants.IS_WINDOWS_OR_OSX)


def _no_errors(record):
    return record.levelno < 40  # logging.ERROR


@contextlib.contextmanager
def ray_log_file(path, verbose=False):
    """Ray's driver-side log records (Tune, Train, core) at INFO and above go to `path`; the
    terminal shows warnings but not errors (Tune's traceback of a lost trial: the orchestrator says
    it in one line and raises what ends a stage), or everything with verbose."""
    import logging
    logger = logging.getLogger('ray')
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter('%(asctime)s %(levelname)s %(name)s: %(message)s'))
    consoles = [h for h in logger.handlers if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]
    saved = logger.level, [h.level for h in consoles]
    logger.setLevel(logging.INFO)
    for h in consoles:
        h.setLevel(logging.INFO if verbose else logging.WARNING)
        if not verbose:
            h.addFilter(_no_errors)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        handler.close()
        logger.setLevel(saved[0])
        for h, level in zip(consoles, saved[1]):
            h.setLevel(level)
            h.removeFilter(_no_errors)


def run(spec, results_root='results', address=None, dry_run=False, log=print, verbose=False,
        stall_timeout=RunOptions.stall_timeout):
    """Run (or, with dry_run, only print) the plan of a spec (a path or a loaded Spec).
    results_root: a path or a storage URI (orchestrator.storage). Every check runs first, before
    Ray starts (orchestrator.checks: the same as `validate` and `run --dry-run`). The terminal gets
    one line per stage, progress bars and the results table; Ray's own log lines go to ray.log in
    each stage's folder (and to the terminal too with verbose). Returns the stages."""
    storage = Storage(results_root)
    spec, dataset = checks.check(spec, storage, address, log=log)  # the data, loaded once, when a stage reads them
    stages = plan.make_plan(spec, storage)
    log(f'experiment {spec.experiment} (spec {spec.hash()}) -> {storage.uri(spec.experiment)}')
    log(plan.describe(stages))
    if dry_run:
        return stages
    embedded = checks.is_embedded(address)
    init_ray(address, verbose=verbose)
    checks.check_cluster(spec, storage, embedded, log=log)
    tracker = make_tracker(spec)
    with results.experiment_lease(storage, spec.experiment, log=log):  # nothing is written before the checks above
        record = results.RunRecord(storage, spec.experiment, spec.hash(), stages)
        try:
            done = _run_stages(spec, stages, storage, dataset, RunOptions(log, verbose, stall_timeout, record, tracker))
        except BaseException as e:  # failed or interrupted: said in run.json, then as before
            record.end(e)
            raise
        record.end()
        return done


def _run_stages(spec, stages, storage, dataset, opts):
    """The stages in order (reusing finished ones), their tables, figures and the results table."""
    storage.write_json(f'{spec.experiment}/spec.json', spec.to_dict())
    prov = dict(experiment=spec.experiment, spec_hash=spec.hash(), code_version=results.code_version(), seed=spec.seed)
    state, timings = {}, []
    write_timings = lambda: results.write_table(storage, spec.experiment, 'timings', timings, dict(
        prov, stage='all', stage_hash=stable_hash([s.hash for s in stages]), device=None))
    for stage in stages:
        start, reused = time.time(), stage.done
        opts.log(f'== {stage.name} ({stage.hash}): {"reused" if reused else "running"}')
        if opts.record:
            opts.record.update(stage=dict(name=stage.name, hash=stage.hash, since=results.now_iso()))
        module, body, writer = STAGES[stage.name]
        module = importlib.import_module(f'orchestrator.{module}')  # when first used: they import Ray
        with storage.local_folder(stage.key) as folder, ray_log_file(os.path.join(folder, 'ray.log'), opts.verbose):
            upstream = {name: state[name] for name in stage.depends}
            outputs = stage.outputs() if reused else getattr(module, body)(stage, upstream, dataset, opts)
        failed = outputs.get('failed')
        if not reused and not failed:
            stage.mark_done(outputs)
        state[stage.name] = outputs
        if writer:
            getattr(module, writer)(spec, stage, outputs, dict(prov, stage=stage.name, stage_hash=stage.hash))
        timings.append(dict(stage=stage.name, status='reused' if reused else 'failed' if failed else 'ran',
                            seconds=time.time() - start))
        if opts.record and not failed:
            opts.record.stage_done(stage.name, stage.hash, timings[-1]['status'], timings[-1]['seconds'])
        if opts.tracker:
            track_stage(opts.tracker, spec, stage, reused, failed)
        if failed:  # the rows that finished are in the table; a re-run runs only what is missing
            write_timings()
            raise StageFailed(f'{stage.name}: {len(failed)} trial(s) failed: ' + '; '.join(failed) +
                              f'. The other rows are in {storage.uri(results.table_key(spec.experiment, stage.name))}; '
                              'run the spec again to retry only these (finished trials are reused).')
    write_timings()
    if spec.report.figures:
        for path in figures.render(storage, spec.experiment):
            opts.log(f'wrote {path}')
    if 'sweep' in state:
        sweep = results.read_table(storage, spec.experiment, 'sweep')
        metric = results.metric_column(sweep)
        searched = results.stopped(sweep).any()
        cols = ['label', 'nfe', metric] + [c for c in ('kid_mean', 'precision', 'recall') if c in sweep.columns] + \
            (['images', 'stopped'] if searched else []) + ['wall_time']  # a stopped row's metric is of fewer images
        order = [c for c in ('snapshot_kimg', 'calibrated', 'label') if c in sweep.columns]
        opts.log(sweep.sort_values(order)[cols].to_string(index=False))
    return stages


def make_tracker(spec):
    """The MLflow tracker of report.mlflow (None without), opened once the checks have passed
    (checks.check_tracking: the store against the cluster, MLflow installed); a store MLflow
    cannot open is one line, naming the field, before any stage."""
    m = spec.report.mlflow
    if m is None:
        return None
    from orchestrator import tracking
    try:
        return tracking.Tracker(m, spec.experiment)
    except Exception as e:  # noqa: BLE001 (an unknown scheme, a server that refuses: one line, before any stage)
        first = (str(e).strip().splitlines() or [''])[0]
        raise SpecError(f'{spec.path}: report.mlflow.tracking_uri: cannot open {m["tracking_uri"]}: {type(e).__name__}: {first}') from None


# Each stage's tables, logged as artifacts of its MLflow run.
STAGE_TABLES = dict(train=('train_log',), calibrate=('calibration', 'likelihood'), sweep=('sweep', 'rungs'))


def track_stage(tracker, spec, stage, reused, failed):
    """The stage's MLflow run (the training workers' own, else a new one): its tables as
    artifacts and, for calibration, ||E[eps]||^2 per sigma (Calib Eq. 27) and the likelihood gain
    of each table."""
    storage = stage.storage
    found = tracker.client.search_runs([tracker.experiment_id], f"tags.stage_hash = '{stage.hash}'") if not reused else []
    run_id = found[0].info.run_id if found else tracker.start(stage.name, tags=dict(
        stage=stage.name, stage_hash=stage.hash, status='reused' if reused else 'ran'))
    keys = [results.table_key(spec.experiment, t) for t in STAGE_TABLES.get(stage.name, ())]
    for key in keys:
        if storage.exists(key):
            tracker.log_artifact(run_id, storage, key, 'tables')
    if stage.name == 'calibrate':
        cal = results.read_table(storage, spec.experiment, 'calibration')
        which = [c for c in ('snapshot_kimg', 'source', 'table_images') if c in cal.columns]
        name = lambda values: '_'.join(f'{v:g}kimg' if isinstance(v, float) else str(v) for v in values if v == v and v is not None)
        for values, g in cal.groupby(which, dropna=False):  # per sigma: the step is the sigma's index on the grid
            tracker.log_series(run_id, f'mean_eps_norm2_{name(values)}', g.sort_values('sigma')['mean_eps_norm2'])
            tracker.log_series(run_id, f'sigma_{name(values)}', g.sort_values('sigma')['sigma'])
        for _, row in results.read_table(storage, spec.experiment, 'likelihood').iterrows():
            tracker.client.log_metric(run_id, f'likelihood_gain_nats_{name([row[c] for c in which])}', float(row['likelihood_gain_nats']))
    if stage.name == 'sweep' and storage.exists(results.table_key(spec.experiment, 'sweep')):
        rows = results.read_table(storage, spec.experiment, 'sweep')
        generated = int(rows['images_generated'].fillna(0).sum()) if 'images_generated' in rows else 0
        grid = len(rows) * spec.evaluate.num_images * spec.evaluate.seed_blocks
        tracker.client.log_metric(run_id, 'images_generated', generated)
        tracker.client.log_metric(run_id, 'share_of_grid_images', generated / grid)
    tracker.end(run_id, failed=bool(failed))


# Stage name -> (module, body, writer). Each body runs from its stage (inputs, options) and its
# upstream stages' outputs (`upstream`, by stage name) alone, and returns the outputs recorded in
# DONE.json; its writer turns them into Parquet (rewritten on reuse, so tables always describe the
# last run's stages).
STAGES = dict(train=('train', 'run_train_stage', 'write_train_log'),
              checkpoint=('train', 'run_checkpoint_stage', None),
              calibrate=('calibrate', 'run_calibrate_stage', 'write_calibration_tables'),
              reference=('sweep', 'run_reference_stage', None),
              sweep=('sweep', 'run_sweep_stage', 'write_sweep_table'))
