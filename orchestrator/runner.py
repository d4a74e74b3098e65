"""Runs a spec's stages on Ray: the embedded local cluster by default, or an existing one.

The embedded cluster binds to 127.0.0.1 only (its dashboard too, which Ray Train V2 needs), with
explicit CPU count and object-store memory, and with Ray's token auth disabled (nothing outside
this machine can reach it). An existing cluster (--address) is used as its owner configured it.
"""
import contextlib
import dataclasses
import json
import math
import os
import socket
import sys
import time

import torch

from orchestrator import figures, plan, results
from orchestrator.spec import SpecError, StageFailed, snapshot_key, stable_hash, table_key
from tasks import calibration, checkpoints, data, metrics
from tasks import train as tasks_train

OBJECT_STORE_BYTES = 512 * 1024 ** 2
RUNTIME_ENV_EXCLUDES = ['results/*/stages', 'results/.trials', 'runs', '.venv', '.git', '.device']


@dataclasses.dataclass
class RunOptions:
    """How a run talks and waits, the same for every stage (nothing here changes a result).
    stall_timeout: seconds a stage may go without progress (work waiting for resources a lost
    node took with it) before it gives up and says so."""
    log: object = print
    verbose: bool = False
    stall_timeout: float = 600.0


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
        ray.init(log_to_driver=verbose)
        return None
    if address:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        ray.init(address=address, runtime_env=dict(working_dir=root, excludes=RUNTIME_ENV_EXCLUDES), log_to_driver=verbose)
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


def check_resources(spec, total, fixed_size, log=print):
    """Compare what the spec asks of one training worker, calibration actor or sweep trial with
    what the cluster has (`total`: ray.cluster_resources()). On a cluster that cannot grow (the
    embedded one) a request it can never meet is refused, naming the field; on another cluster
    (it may autoscale) the orchestrator says what it will wait for."""
    asks = []
    if not spec.model.checkpoint:
        t = spec.train
        asks += [('train.cpus_per_worker', 'CPU', t.cpus_per_worker, 'training worker'),
                 ('train.use_gpu', 'GPU', 1 if t.use_gpu is True else 0, 'training worker')]
    if spec.calibrate is not None:
        asks += [('calibrate.cpus_per_actor', 'CPU', spec.calibrate.cpus_per_actor, 'calibration actor'),
                 ('calibrate.gpus_per_actor', 'GPU', spec.calibrate.gpus_per_actor, 'calibration actor')]
    if spec.sweep is not None:
        asks += [(f'sweep.resources.{k}', k.upper(), v, 'sweep trial') for k, v in spec.sweep.resources.items()]
    for field, kind, amount, unit in asks:
        have = total.get(kind, 0)
        if amount > have:
            message = f'{field}: asks {amount:g} {kind} per {unit}, the cluster has {have:g} {kind} in all'
            if fixed_size:
                raise SpecError(f'{spec.path}: {message}; lower it, or run on a cluster that has them (--address)')
            log(f'waiting for resources: {message} now; the run waits until the cluster provides them')


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
    """Run (or, with dry_run, only print) the plan. The terminal gets one line per stage,
    progress bars and the results table; Ray's own log lines go to ray.log in each stage's
    folder (and to the terminal too with verbose). Returns the stages."""
    stages = plan.make_plan(spec, results_root)
    exp_dir = os.path.join(results_root, spec.experiment)
    log(f'experiment {spec.experiment} (spec {spec.hash()}) -> {exp_dir}')
    log(plan.describe(stages))
    if dry_run:
        return stages
    init_ray(address, verbose=verbose)
    import ray
    # The data are read only by the stages that need them: training, calibration, and reference
    # statistics not given as a published file (a pretrained model with published statistics needs none).
    needs_data = not spec.model.checkpoint or spec.calibrate is not None or (spec.sweep and not spec.evaluate.reference_stats)
    dataset = data.load_dataset(**dataclasses.asdict(spec.data)) if needs_data else None
    c, e = spec.calibrate, spec.evaluate
    if c is not None and 'data' in c.sources() and c.counts()[-1] > len(dataset):
        raise SpecError(f'{spec.path}: calibrate.images: {c.counts()[-1]} images asked for, but {spec.data.name} '
                        f'{spec.data.split} holds {len(dataset)} (after data.limit)')
    reference = [s for s in stages if s.name == 'reference' and 'data' in s.inputs and not s.done]
    if reference:
        held = len(data.load_dataset(**dict(reference[0].inputs['data'], limit=None)))
        if e.reference_images > held:
            raise SpecError(f'{spec.path}: evaluate.reference_images: {e.reference_images} images asked for, but '
                            f'{spec.data.name} {e.reference_split} holds {held}')
    check_resources(spec, ray.cluster_resources(), fixed_size=not address and not os.environ.get('RAY_ADDRESS'), log=log)
    with results.experiment_lock(results_root, spec.experiment):  # nothing is written before the checks above
        return _run_stages(spec, stages, results_root, dataset, RunOptions(log, verbose, stall_timeout))


def _run_stages(spec, stages, results_root, dataset, opts):
    """The stages in order (reusing finished ones), their tables, figures and the results table."""
    exp_dir = os.path.join(results_root, spec.experiment)
    results.write_json(os.path.join(exp_dir, 'spec.json'), spec.to_dict())
    prov = dict(experiment=spec.experiment, spec_hash=spec.hash(), code_version=results.code_version(), seed=spec.seed)
    state, timings = {}, []
    write_timings = lambda: results.write_table(results_root, spec.experiment, 'timings', timings, dict(
        prov, stage='all', stage_hash=stable_hash([s.hash for s in stages]), device=None))
    for stage in stages:
        start, reused = time.time(), stage.done
        opts.log(f'== {stage.name} ({stage.hash}): {"reused" if reused else "running"}')
        os.makedirs(stage.dir, exist_ok=True)
        with ray_log_file(os.path.join(stage.dir, 'ray.log'), opts.verbose):
            upstream = {name: state[name] for name in stage.depends}
            outputs = stage.outputs() if reused else STAGES[stage.name](stage, upstream, dataset, opts)
        failed = outputs.get('failed')
        if not reused and not failed:
            stage.mark_done(outputs)
        state[stage.name] = outputs
        WRITERS.get(stage.name, lambda *a: None)(spec, stage, state, results_root, dict(prov, stage=stage.name, stage_hash=stage.hash))
        timings.append(dict(stage=stage.name, status='reused' if reused else 'failed' if failed else 'ran',
                            seconds=time.time() - start))
        if failed:  # the rows that finished are in the table; a re-run runs only what is missing
            write_timings()
            raise StageFailed(f'{stage.name}: {len(failed)} trial(s) failed: ' + '; '.join(failed) +
                              f'. The other rows are in {results.table_path(results_root, spec.experiment, stage.name)}; '
                              'run the spec again to retry only these (finished trials are reused).')
    write_timings()
    if spec.report.figures:
        for path in figures.render(results_root, spec.experiment):
            opts.log(f'wrote {path}')
    if 'sweep' in state:
        sweep = results.read_table(results_root, spec.experiment, 'sweep')
        metric = figures.metric_column(sweep)
        cols = ['label', 'nfe', metric] + [c for c in ('kid_mean', 'precision', 'recall') if c in sweep.columns] + ['wall_time']
        order = [c for c in ('snapshot_kimg', 'calibrated', 'label') if c in sweep.columns]
        opts.log(sweep.sort_values(order)[cols].to_string(index=False))
    return stages


# ---------------------------------------------------------------------------------------------
# Stage bodies: each runs from its stage (inputs, options) and its upstream stages' outputs
# (`upstream`, by stage name) alone, and returns the outputs recorded in DONE.json.

def _train(stage, upstream, dataset, opts):
    from orchestrator.train import run_train_stage
    config = tasks_train.TrainConfig(**stage.inputs['config'])
    networks, device = run_train_stage(stage.dir, config, stage.inputs['data'], workers=stage.inputs['workers'],
                                       cpus_per_worker=stage.options['cpus_per_worker'], use_gpu=stage.options['use_gpu'],
                                       max_failures=stage.options['max_failures'])
    snapshots = {snapshot_key(k): dict(network=os.path.abspath(path), format='network.pt', kimg=k)
                 for k, path in sorted(networks.items())}
    return dict(network=snapshots[snapshot_key(config.total_kimg)]['network'], format='network.pt', device=device,
                snapshots=snapshots)


def _checkpoint(stage, upstream, dataset, opts):
    snapshots = {}
    for path, file in zip(stage.options['paths'], stage.inputs['files']):
        fmt = stage.inputs['format'] or checkpoints.detect_format(path)
        net = checkpoints.load_denoiser(path, fmt)  # fails here, before any work, if it cannot load
        kimg = file['kimg']
        opts.log(f'model: {path} ({fmt}, {type(net).__name__}, {net.img_channels}x{net.img_resolution}x'
                 f'{net.img_resolution}, {net.label_dim} classes, sigma {net.sigma_min:g}..{net.sigma_max:g}'
                 f'{"" if kimg is None else f", {kimg:g} kimg"})')
        snapshots[snapshot_key(kimg)] = dict(network=os.path.abspath(path), format=fmt, kimg=kimg, sha256=net.source['sha256'])
    last = list(snapshots.values())[-1]
    return dict(network=last['network'], format=last['format'], device=None, sha256=last['sha256'], snapshots=snapshots)


def _model_outputs(upstream):
    return upstream.get('train') or upstream['checkpoint']


def _calibrate(stage, upstream, dataset, opts):
    """One calibration per model snapshot, each on its own sigma grid (the plan's, as hashed)."""
    from orchestrator.calibrate import run_calibration
    from orchestrator.spec import CalibrateSpec
    where = stage.options['spec_path']
    c = CalibrateSpec(**stage.inputs['calibrate'], **{k: v for k, v in stage.options.items() if k != 'spec_path'})
    snapshots = _model_outputs(upstream)['snapshots']
    tables = {}
    for key, model in snapshots.items():
        net = checkpoints.load_denoiser(model['network'], model['format'])
        if net.img_channels != dataset.channels or net.img_resolution != dataset.resolution:
            raise SpecError(f'{where}: data: the model takes {net.img_channels}x{net.img_resolution}x{net.img_resolution} '
                            f'images, the data are {dataset.channels}x{dataset.resolution}x{dataset.resolution} '
                            '(set data.resolution / data.pad_to_32, or use the data the model was trained on)')
        if True in c.per_class_options() and 'generated' in c.sources() and not net.label_dim:
            raise SpecError(f'{where}: calibrate.per_class: generated images of an unconditional model have no classes')
        if net.label_dim and net.label_dim != dataset.num_classes:
            raise SpecError(f'{where}: data: the model is conditional on {net.label_dim} classes, {dataset.name} has '
                            f'{dataset.num_classes}')
        sigmas = torch.tensor(stage.inputs['sigmas'][key], dtype=torch.float64)
        name = f'{key}: ' if len(snapshots) > 1 else ''
        opts.log(f'calibrate: {name}{len(sigmas)} sigmas (every sigma the calibrated trials will query)')
        meta = dict(model=calibration.fingerprint(net), dataset=dataset.content_hash(), shape=list(dataset.images.shape[1:]),
                    snapshot_kimg=model['kimg'])
        folder = os.path.join(stage.dir, key)  # partial tables, tables and figures of this snapshot
        os.makedirs(folder, exist_ok=True)
        for source in c.sources():
            by_count = run_calibration(model, dataset, c, source, sigmas, meta, log=opts.log, keep_dir=folder,
                                       stall_timeout=opts.stall_timeout, label=f'{name}{source}')
            for n, table in by_count.items():
                path = os.path.join(folder, f'table-{source}-{n}.pt')
                table.save(path)
                tables[table_key(model['kimg'], source, n)] = os.path.abspath(path)
            calibration.save_mean_eps_figure(by_count[max(by_count)], os.path.join(folder, f'mean_eps-{source}.png'))
    return dict(tables=tables)


def _reference(stage, upstream, dataset, opts):
    if 'stats_sha256' in stage.inputs:
        stats = metrics.load_reference_statistics(stage.options['path'])
        opts.log(f'reference: published statistics {stage.options["path"]} (sha256 {stats["sha256"][:16]}...)')
        return dict(stats=stats['source'], count=stats['count'], sha256=stats['sha256'], weights_sha256=None)
    ref = data.load_dataset(**stage.inputs['data'])
    extractor = metrics.InceptionFeatures(metrics.resolve_inception_weights(stage.inputs['weights']),
                                          batch_size=stage.options['batch_size'],
                                          device='cuda' if torch.cuda.is_available() else 'cpu')
    opts.log(f'reference: features of {len(ref)} {ref.name} {stage.inputs["data"]["split"]} images ({extractor.weights.source})')
    # KID and precision/recall compare features, not mean and covariance.
    stats = metrics.reference_statistics(ref, extractor, cache_dir=stage.dir, keep_features=stage.inputs['features'],
                                         progress=True)
    return dict(stats=os.path.abspath(stats['cache']), count=stats['count'], weights_sha256=stats['weights_sha256'])


def _sweep(stage, upstream, dataset, opts):
    import ray
    from orchestrator.sweep import run_sweep
    e = dict(stage.inputs['evaluate'], batch_size=stage.options['batch_size'])
    reference = metrics.load_reference_statistics(upstream['reference']['stats'], features=e['kid'] or e['precision_recall'])
    context = dict(snapshots=_model_outputs(upstream)['snapshots'], tables=upstream.get('calibrate', {}).get('tables', {}),
                   interpolate=stage.inputs['interpolate'], reference=ray.put(reference), trials_dir=stage.trials_dir,
                   **{k: e[k] for k in ('class_idx', 'num_images', 'seed_blocks', 'batch_size', 'kid', 'precision_recall',
                                        'inception_weights')})
    trials = stage.inputs['trials']
    rows, failed = run_sweep(trials, plan.trial_hashes(stage, trials), context, stage.options['trial_resources'], stage.dir,
                             max_failures=stage.options['max_failures'], verbose=opts.verbose, log=opts.log,
                             stall_timeout=opts.stall_timeout)
    path = results.write_json(os.path.join(stage.dir, 'rows.json'), rows)
    return dict(rows=os.path.abspath(path), trials=len(rows), failed=failed)


STAGES = dict(train=_train, checkpoint=_checkpoint, calibrate=_calibrate, reference=_reference, sweep=_sweep)


# ---------------------------------------------------------------------------------------------
# Parquet writers: every stage's outputs as a table (rewritten on reuse, so tables always
# describe the stages of the last run).

def _write_train_log(spec, stage, state, root, prov):
    config, log = tasks_train.read_log(state[stage.name]['network'])
    rows = [dict(r, config=config) for r in log]
    results.write_table(root, spec.experiment, 'train_log', rows, dict(prov, device=state[stage.name]['device']))


def _write_calibration(spec, stage, state, root, prov):
    """calibration: one row per table and sigma (Calib Fig. 1 top row and Eq. 27); likelihood:
    one row per table, the gain of the likelihood bound (Calib Eq. 11)."""
    rows, gains = [], []
    for path in state['calibrate']['tables'].values():
        table = calibration.CalibrationTable.load(path)
        m = table.meta
        which = dict(snapshot_kimg=m.get('snapshot_kimg'), source=m['source'], table_images=m['image_count'])
        gap = calibration.dsm_gap(table)
        rows += [dict(which, sigma=float(s), images=int(n), c_norm2=float(a), mean_eps_norm2=float(e), mean_eps_norm2_se=float(b),
                      config=dataclasses.asdict(spec.calibrate))
                 for s, n, a, e, b in zip(table.sigmas, table.count.sum(0), gap['data'], gap['noise'], gap['noise_se'])]
        gain = calibration.likelihood_gain(table)
        dims = math.prod(table.shape)
        gains.append(dict(which, likelihood_gain_nats=gain['nats'], likelihood_gain_se=gain['se'],
                          likelihood_gain_noise_floor=gain['noise_floor'], likelihood_gain_bpd=gain['nats'] / (dims * math.log(2)),
                          grid_points=gain['grid_points'], sigma_min=float(table.sigmas.min()), sigma_max=float(table.sigmas.max())))
    results.write_table(root, spec.experiment, 'calibration', rows, dict(prov, device=None))
    results.write_table(root, spec.experiment, 'likelihood', gains, dict(prov, device=None))


def _write_sweep(spec, stage, state, root, prov):
    with open(state['sweep']['rows']) as f:
        rows = json.load(f)
    results.write_table(root, spec.experiment, 'sweep', [dict(r, evaluate=dataclasses.asdict(spec.evaluate)) for r in rows],
                        prov)


WRITERS = dict(train=_write_train_log, calibrate=_write_calibration, sweep=_write_sweep)
