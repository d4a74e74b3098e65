"""Every check of a spec, in one order for every command, before anything starts Ray.

`validate`, `run --dry-run` and `run` call check() first, so a spec that one of them refuses the
other two refuse with the same line, and none of them starts a cluster for it. In order:

  1. fields and files, sampler domains, every trial on the stand-in (spec.load, when given a path)
  2. the results root answers (an unknown scheme, a missing bucket: Storage.check)
  3. the model against the data and the reference statistics; sigma clamping, said once
     (plan.check_inputs: models and data are read here, never by a stage first)
  4. the MLflow tracking URI against the kind of cluster (nothing is written to the store)

`submit` runs step 1 on the submitting machine (the spec's files may exist only on the cluster);
the job's own `run` then runs all of them on the cluster before any stage. After Ray has started,
check_cluster() checks what needs the cluster: its resources and a results root every node sees.
"""
import importlib.util
import os
import uuid

from orchestrator import plan, spec as spec_mod
from orchestrator.spec import SpecError
from orchestrator.storage import StorageError


def is_embedded(address=None):
    """Whether a run with this --address uses the embedded cluster: no address and no RAY_ADDRESS
    (inside a Ray job RAY_ADDRESS names the job's cluster)."""
    return not address and not os.environ.get('RAY_ADDRESS')


def check(spec, storage, address=None, log=print):
    """Steps 1-4 above for a spec (a path, or a Spec already loaded: step 1 was done then) and a
    results root (orchestrator.storage.Storage). One SpecError (or StorageError, CheckpointError,
    DataError) line on the first problem. Returns (spec, dataset): the data, decoded once, when a
    stage reads them, else None."""
    if not isinstance(spec, spec_mod.Spec):
        spec = spec_mod.load(spec)
    storage.check()
    dataset = plan.check_inputs(spec, log=log)
    check_tracking(spec, is_embedded(address))
    return spec, dataset


def check_tracking(spec, embedded):
    """report.mlflow against the cluster: a store on this machine's disk serves the embedded
    cluster only, and MLflow must be installed. Nothing is opened or written."""
    m = spec.report.mlflow
    if m is None:
        return
    from orchestrator import tracking
    problem = tracking.check_tracking_uri(m['tracking_uri'], embedded)
    if problem:
        raise SpecError(f'{spec.path}: report.mlflow.tracking_uri: {problem}')
    if importlib.util.find_spec('mlflow') is None:
        raise SpecError(f'{spec.path}: report.mlflow: needs MLflow: pip install \'.[mlflow]\' (mlflow-skinny)')


def check_cluster(spec, storage, embedded, log=print):
    """After Ray has started: on a cluster other than the embedded one, the results root must be
    shared by every node; every worker, actor and trial must fit the cluster's resources."""
    import ray
    if not embedded:
        check_shared_storage(storage)
    check_resources(spec, ray.cluster_resources(), fixed_size=embedded, log=log)


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


def check_shared_storage(storage, timeout=120):
    """On a cluster other than the embedded one, a file the driver writes under the results root
    must be visible from every alive node (what Ray Train checks for its own storage, done here
    before any stage): a StorageError line naming the root and the nodes that cannot see it."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    key, token = f'.probe/{uuid.uuid4().hex}', uuid.uuid4().hex.encode()
    storage.write_bytes(key, token)
    try:
        nodes = [n for n in ray.nodes() if n['Alive']]
        probes = [ray.remote(_sees).options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(n['NodeID'], soft=False))
                  .remote(storage, key, token) for n in nodes]
        seen = ray.get(probes, timeout=timeout)
    finally:
        storage.delete(key)
    blind = [f'{n["NodeManagerAddress"]} ({n["NodeID"][:8]}: {why})' for n, why in zip(nodes, seen) if why]
    if blind:
        hint = ('use object storage (--results s3://bucket/prefix, gs://..., abfs://...) or a folder that every node '
                'mounts at the same path (NFS)') if storage.is_local else 'check that every node has the store\'s credentials'
        raise StorageError(f'{storage.root}: the results root is not shared: {len(blind)} of {len(nodes)} node(s) cannot see '
                           f'a file the driver wrote there: {"; ".join(blind)}; {hint}')


def _sees(storage, key, token):
    """On one node (a Ray task): '' when the driver's probe file reads back, else why not."""
    try:
        return '' if storage.read_bytes(key) == token else 'other content'
    except Exception as e:  # noqa: BLE001 (any failure is the answer)
        return f'{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ""}'[:200]
