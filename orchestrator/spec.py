"""The experiment spec: a YAML file, validated in full before anything runs.

Every section maps onto keyword arguments of tasks/ functions. Errors name the file, the field
path and what was expected; unknown keys are errors with a "did you mean".

    experiment: quickstart          # name: results go to <results>/<experiment>/
    seed: 0
    data:      {name, root, split, pad_to_32, resolution, limit, transform}
    model:     {preset, precond, network_overrides, precond_kwargs, checkpoint, format}
    train:     {total_kimg, batch_size, lr, lr_rampup_kimg, ema_halflife_kimg, ..., workers, use_gpu}  # = tasks.train.TrainConfig
    calibrate: {images, chunk_size, actors, gpus_per_actor, noise_draws, flips, source, batch_size, per_class, grid}
    sweep:     {samplers: [{sampler: ..., <param>: value, [values] or {low, high, log, step}}], calibrated: [false, true],
                resources, search: {scheduler, metric, min_images, reduction_factor, algorithm, num_samples}}
    evaluate:  {num_images, reference_images, seed_blocks, batch_size, kid, precision_recall, inception_weights,
                reference_stats, class}
    report:    {figures, mlflow: {tracking_uri, experiment}}
"""
import dataclasses
import difflib
import hashlib
import itertools
import json
import math
import os
from dataclasses import dataclass, field
from typing import Optional

import yaml

from orchestrator.storage import StorageError, fetch, local_path
from tasks import data as data_mod
from tasks import checkpoints, metrics, networks, precond, samplers
from tasks import train as tasks_train


class SpecError(ValueError):
    """A spec that cannot run; the message names the file and the field."""


class StageFailed(RuntimeError):
    """A stage that finished with some of its work failed, or could not make progress (named in
    the message)."""


@dataclass
class DataSpec:
    name: str = 'fashion-mnist'
    root: Optional[str] = None
    split: str = 'train'
    pad_to_32: bool = False
    resolution: Optional[int] = None
    limit: Optional[int] = None
    transform: Optional[str] = None        # center-crop: image files of any shape -> resolution x resolution (EDM dataset_tool)


@dataclass
class ModelSpec:
    preset: str = 'ddpmpp-tiny'            # tasks.networks.PRESETS
    precond: str = 'edm'                   # tasks.precond.PRECONDS
    network_overrides: dict = field(default_factory=dict)
    precond_kwargs: dict = field(default_factory=dict)
    # An existing model (no training stage): network.pt, EDM .pkl or diffusers dir; or a list of
    # snapshots of one training run (each file's kimg read from it), calibrated and swept each.
    checkpoint: object = None
    format: Optional[str] = None           # tasks.checkpoints.FORMATS; detected from the file when not given

    def checkpoints(self):
        return [] if self.checkpoint is None else list(self.checkpoint) if isinstance(self.checkpoint, list) else [self.checkpoint]


# The train section is tasks.train.TrainConfig (same names, same defaults) less what the model
# section and the top-level seed give, plus how Ray runs it.
_FROM_ELSEWHERE = ('preset', 'precond', 'network_overrides', 'precond_kwargs', 'seed')
_RAY_TRAIN_FIELDS = [
    ('workers', int, field(default=1)),
    ('cpus_per_worker', float, field(default=1.0)),        # also torch's thread count in the worker
    ('use_gpu', object, field(default='auto')),            # auto | true | false
    ('max_failures', int, field(default=2)),               # Ray Train restarts from the last checkpoint
]
_TRAIN_CONFIG_FIELDS = [f for f in dataclasses.fields(tasks_train.TrainConfig) if f.name not in _FROM_ELSEWHERE]
TrainSpec = dataclasses.make_dataclass('TrainSpec', [
    (f.name, f.type, field(default=f.default) if f.default is not dataclasses.MISSING else field(default_factory=f.default_factory))
    for f in _TRAIN_CONFIG_FIELDS] + _RAY_TRAIN_FIELDS)


def train_config(spec):
    """The tasks.train.TrainConfig a spec's model, train and seed resolve to."""
    m, t = spec.model, spec.train
    return tasks_train.TrainConfig(preset=m.preset, precond=m.precond, network_overrides=m.network_overrides,
                                   precond_kwargs=m.precond_kwargs, seed=spec.seed,
                                   **{f.name: getattr(t, f.name) for f in _TRAIN_CONFIG_FIELDS})


@dataclass
class CalibrateSpec:
    # images: N, or a list of counts (Calib Table 4): one table per count, each over the first N
    # images (or the samples of seeds 0..N-1), estimated in one pass over the largest count.
    images: object = 2000
    chunk_size: int = 500
    actors: int = 2
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    noise_draws: int = 1
    flips: bool = False
    source: object = 'data'                # data | generated, or a list of both
    generation: dict = field(default_factory=lambda: dict(sampler='edm', num_steps=18))
    batch_size: int = 500
    seed: int = 0
    # Per-class terms E_{q_t}[eps | y] (Calib Sec. 3.2): true, false, or [false, true] to compare
    # pooled with per-class calibration in the sweep (one estimate serves both).
    per_class: object = False
    # Log-sigma interpolation between grid points for sigmas off the grid (never extrapolated);
    # off, a sigma the plan did not foresee is an error naming it.
    interpolate: bool = False
    # {points: N}: a log-spaced grid of N sigmas spanning every sigma the sweep's search space can
    # query, used with interpolation (implied); the default for searches over continuous ranges,
    # whose trials query sigmas no list of trials foresees. None: the exact sigmas of the trials.
    grid: Optional[dict] = None

    def counts(self):
        return sorted(set(self.images)) if isinstance(self.images, list) else [self.images]

    def sources(self):
        return list(dict.fromkeys(self.source)) if isinstance(self.source, list) else [self.source]

    def tables(self):
        """(source, image count) of every table the stage estimates."""
        return [(source, n) for source in self.sources() for n in self.counts()]

    def per_class_options(self):
        return list(dict.fromkeys(self.per_class)) if isinstance(self.per_class, list) else [self.per_class]


@dataclass
class SearchSpec:
    """How a sweep searches (sweep.search; absent: every trial of the grid at full cost)."""
    # sha: synchronous successive halving on sample count (every trial measures a rung, the best
    # 1/reduction_factor go on; the default over a grid); asha: asynchronous (Tune's ASHAScheduler,
    # promotes whatever reaches a rung first; the default with an algorithm); fifo: every rung, none stopped.
    scheduler: Optional[str] = None
    metric: str = 'fid'                    # lower is better; KID and precision/recall at the last rung
    min_images: int = 500                  # the first rung; rungs grow by reduction_factor up to evaluate.num_images
    reduction_factor: float = 3
    algorithm: Optional[str] = None        # optuna: TPE over ranges and categories instead of the grid
    num_samples: Optional[int] = None      # trials the algorithm proposes

    def rungs(self, num_images):
        """The image counts at which trials report: min_images * reduction_factor^k below
        num_images (rounded up, as Tune's ASHAScheduler compares `images >= milestone`), then
        num_images itself, whatever the factor."""
        out, k = [], 0
        while (n := math.ceil(self.min_images * self.reduction_factor ** k - 1e-9)) < num_images:
            out.append(n)
            k += 1
        return out + [num_images]


@dataclass
class SweepSpec:
    samplers: list = field(default_factory=list)
    calibrated: list = field(default_factory=lambda: [False, True])
    resources: dict = field(default_factory=lambda: dict(cpu=1, gpu=0))
    max_failures: int = 1                  # Tune retries of a trial whose worker failed or died
    search: Optional[SearchSpec] = None


@dataclass
class EvaluateSpec:
    num_images: int = 200
    reference_images: int = 1000
    reference_split: str = 'train'
    seed_blocks: int = 1
    batch_size: int = 100
    kid: bool = False
    precision_recall: bool = False
    inception_weights: Optional[str] = None
    # Published FID statistics (.npz with mu [2048], sigma [2048, 2048]: EDM's fid-refs, pytorch-fid,
    # ADM) used instead of statistics of `data`.
    reference_stats: Optional[str] = None
    class_idx: Optional[int] = None        # conditional models: this class for every image (YAML key `class` too)


@dataclass
class ReportSpec:
    figures: bool = True
    # {tracking_uri, experiment}: MLflow runs of the stages and sweep trials (orchestrator.tracking).
    mlflow: Optional[dict] = None


@dataclass
class Spec:
    experiment: str
    seed: int = 0
    data: DataSpec = field(default_factory=DataSpec)
    model: ModelSpec = field(default_factory=ModelSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    calibrate: Optional[CalibrateSpec] = None
    sweep: Optional[SweepSpec] = None
    evaluate: EvaluateSpec = field(default_factory=EvaluateSpec)
    report: ReportSpec = field(default_factory=ReportSpec)
    path: Optional[str] = None             # where it was read from (not part of the hash)

    def to_dict(self):
        d = dataclasses.asdict(self)
        d.pop('path')
        return d

    def hash(self):
        return stable_hash(self.to_dict())

    def trials(self):
        """The sweep's grid as a list of trial configs: each sampler entry's list-valued
        parameters are crossed, then crossed with `calibrated`; calibrated trials are crossed
        with every calibration table (source x image count) and name theirs. A range
        ({low, high}: searched by sweep.search.algorithm, never a grid axis) counts as its two
        ends: the corners of the search space, where its extreme settings and sigmas lie, so
        checking the corners checks every point (the samplers' constraints are monotone)."""
        if self.sweep is None:
            return []
        out = []
        for entry in self.sweep.samplers:
            keys = list(entry)
            axes = [[v['low'], range_high(v)] if is_range(v) else v if isinstance(v, list) else [v] for v in entry.values()]
            for values in itertools.product(*axes):
                for calibration in self.calibrations():
                    out.append(dict(zip(keys, values), **calibration))
        return out

    def calibrations(self):
        """What a trial can be calibrated with: {calibrated: false} and, when calibrated trials are
        asked for, one entry per calibration table (source x image count x per class)."""
        c = self.calibrate
        out = [dict(calibrated=False)] if False in self.sweep.calibrated else []
        if True in self.sweep.calibrated:
            out += [dict(calibrated=True, calibration_source=source, calibration_images=n, calibration_per_class=pc)
                    for (source, n), pc in itertools.product(c.tables(), c.per_class_options())]
        return out

    def has_ranges(self):
        return self.sweep is not None and any(is_range(v) for entry in self.sweep.samplers for v in entry.values())


def is_range(value):
    """A sampler parameter given as a range to search ({low, high[, log][, step]})."""
    return isinstance(value, dict)


def range_high(r):
    """The largest value a range can take: high, or the last step at or below it."""
    step = r.get('step')
    return r['high'] if not step else r['low'] + math.floor((r['high'] - r['low']) / step + 1e-9) * step


# Sampler settings that take integers: their ranges are searched over integers.
INTEGER_SETTINGS = ('num_steps', 'steps', 'M', 'order')


TRIAL_KEYS = ('sampler', 'calibrated', 'calibration_source', 'calibration_images', 'calibration_per_class', 'snapshot_kimg')


def sampler_kwargs(trial):
    """A trial's keyword arguments for its sampler (everything but what selects it)."""
    return {k: v for k, v in trial.items() if k not in TRIAL_KEYS}


def describe_trial(trial):
    """A short label, e.g. 'dpm_solver order=3 steps=10 calibrated (data, 1000 images) @ 5 kimg'
    (the snapshot named when the model has a training kimg)."""
    # Floats a search proposes print to 6 significant digits (the row's `params` keeps them whole).
    params = ' '.join(f'{k}={v:.6g}' if isinstance(v, float) else f'{k}={v}' for k, v in sampler_kwargs(trial).items())
    per_class = ', per class' if trial.get('calibration_per_class') else ''
    calibrated = (f' calibrated ({trial["calibration_source"]}, {trial["calibration_images"]} images{per_class})'
                  if trial['calibrated'] else '')
    kimg = trial.get('snapshot_kimg')
    return f'{trial["sampler"]} {params}{calibrated}' + ('' if kimg is None else f' @ {kimg:g} kimg')


def cpus_gpus(resources):
    """'2 CPU, 0 GPU' of a Ray resource mapping (ray.cluster_resources(), an actor's request)."""
    return f'{resources.get("CPU", 0):g} CPU, {resources.get("GPU", 0):g} GPU'


def snapshot_key(kimg):
    """How stages name a model snapshot: its kimg of training, or 'model' for a lone checkpoint
    whose kimg is not known."""
    return 'model' if kimg is None else f'{kimg:g}kimg'


def table_key(snapshot_kimg, source, images):
    """How calibrate-stage outputs and sweep trials name a calibration table."""
    return f'{snapshot_key(snapshot_kimg)}/{source}/{images}'


SECTIONS = {'data': DataSpec, 'model': ModelSpec, 'train': TrainSpec, 'calibrate': CalibrateSpec,
            'sweep': SweepSpec, 'evaluate': EvaluateSpec, 'report': ReportSpec}
SAMPLER_PARAMS = {
    'edm': {'num_steps', 'sigma_min', 'sigma_max', 'rho', 'S_churn', 'S_min', 'S_max', 'S_noise'},
    'ablation': {'num_steps', 'sigma_min', 'sigma_max', 'rho', 'solver', 'discretization', 'schedule', 'scaling',
                 'epsilon_s', 'C_1', 'C_2', 'M', 'alpha', 'S_churn', 'S_min', 'S_max', 'S_noise'},
    'dpm_solver': {'steps', 'order', 'method', 'algorithm_type', 'skip_type', 't_start', 't_end', 'denoise_to_zero'},
}


def stable_hash(obj):
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _fail(path, where, message):
    raise SpecError(f'{path}: {where}: {message}')


def _did_you_mean(key, valid):
    close = difflib.get_close_matches(key, valid, n=1)
    return f' (did you mean {close[0]!r}?)' if close else ''


def _check_type(path, where, value, annotation):
    """Coerce/validate a scalar against the dataclass field type."""
    base = annotation
    optional = False
    if getattr(annotation, '__origin__', None) is not None and type(None) in getattr(annotation, '__args__', ()):
        optional, base = True, [a for a in annotation.__args__ if a is not type(None)][0]
    if value is None:
        if optional:
            return None
        _fail(path, where, f'expected {base.__name__}, got null')
    if base is bool:
        if not isinstance(value, bool):
            _fail(path, where, f'expected true or false, got {value!r}')
        return value
    if base is int:
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(path, where, f'expected an integer, got {value!r}')
        return value
    if base is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail(path, where, f'expected a number, got {value!r}')
        return float(value)
    if base is str:
        if not isinstance(value, str):
            _fail(path, where, f'expected a string, got {value!r}')
        return value
    if base in (dict, list):
        if not isinstance(value, base):
            _fail(path, where, f'expected a {"mapping" if base is dict else "list"}, got {value!r}')
        return value
    return value


# YAML keys that are Python keywords (EDM generate.py's --class).
ALIASES = {'evaluate': {'class': 'class_idx'}}


def _section(path, name, raw, cls):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        _fail(path, name, f'expected a mapping of settings, got {raw!r}')
    for alias, key in ALIASES.get(name, {}).items():
        if alias in raw:
            if key in raw:
                _fail(path, f'{name}.{alias}', f'give either {alias} or {key}, not both')
            raw = {(key if k == alias else k): v for k, v in raw.items()}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        if key not in fields:
            _fail(path, f'{name}.{key}', f'unknown key{_did_you_mean(key, fields)}; valid: {", ".join(fields)}')
        kwargs[key] = _check_type(path, f'{name}.{key}', value, cls.__annotations__[key])
    return cls(**kwargs)


def _positive(path, where, value, allow_zero=False):
    if value is not None and (value < 0 or (value == 0 and not allow_zero)):
        _fail(path, where, f'must be {"non-negative" if allow_zero else "positive"}, got {value}')


def _choice(path, where, value, valid):
    if value not in valid:
        _fail(path, where, f'{value!r} is not one of: {", ".join(map(str, valid))}{_did_you_mean(str(value), list(map(str, valid)))}')


def parse(raw, path='<spec>'):
    """A Spec from a parsed YAML mapping; SpecError on the first problem."""
    if not isinstance(raw, dict):
        _fail(path, 'top level', f'expected a mapping with at least `experiment:`, got {type(raw).__name__}')
    valid_top = ['experiment', 'seed', *SECTIONS]
    for key in raw:
        if key not in valid_top:
            _fail(path, str(key), f'unknown section{_did_you_mean(str(key), valid_top)}; valid: {", ".join(valid_top)}')
    if 'experiment' not in raw:
        _fail(path, 'experiment', 'missing: give the experiment a name (results go to <results>/<experiment>/)')
    name = raw['experiment']
    # One plain folder name under the results root: not '.', '..' or hidden (.trials lives there).
    if not isinstance(name, str) or not name or not all(c.isalnum() or c in '-_.' for c in name) or name.startswith('.'):
        _fail(path, 'experiment', f'expected a name of letters, digits, "-", "_" or "." that does not start with ".", '
                                  f'got {name!r}')
    for required, example in (('data', '{name: fashion-mnist}'), ('model', '{preset: ddpmpp-tiny} or {checkpoint: FILE}')):
        if required not in raw:
            _fail(path, required, f'missing: say which {required} the experiment uses, e.g. {required}: {example}')
    seed = _check_type(path, 'seed', raw.get('seed', 0), int)
    _positive(path, 'seed', seed, allow_zero=True)  # numpy's seed sequences take non-negative integers
    sections = {k: _section(path, k, raw.get(k), cls) for k, cls in SECTIONS.items() if k in raw or k not in ('calibrate', 'sweep')}
    sweep = sections.get('sweep')
    if sweep is not None and sweep.search is not None:
        sweep.search = _section(path, 'sweep.search', sweep.search, SearchSpec)
    spec = Spec(experiment=name, seed=seed, path=path, **sections)
    _check_file_types(spec, path)
    _resolve_files(spec)
    _validate(spec, path)
    return spec


def _check_file_types(spec, path):
    c = spec.model.checkpoint
    if isinstance(c, list) and (not c or not all(isinstance(f, str) for f in c)) or \
            not isinstance(c, list) and c is not None and not isinstance(c, str):
        _fail(path, 'model.checkpoint', f'expected a path or a non-empty list of paths, got {c!r}')


def _resolve_files(spec):
    """Every file a spec names, resolved once where the command was started: a relative path
    becomes absolute (training workers and trials run in other folders); a URI stays a URI."""
    d, m, t, e = spec.data, spec.model, spec.train, spec.evaluate
    d.root = local_path(d.root)
    m.checkpoint = [local_path(f) for f in m.checkpoint] if isinstance(m.checkpoint, list) else local_path(m.checkpoint)
    e.inception_weights, e.reference_stats = local_path(e.inception_weights), local_path(e.reference_stats)
    t.recording_table = local_path(t.recording_table)


def _local(path, where, ref):
    """A local copy of a file reference (a URI is downloaded once into this node's cache), or the
    spec error naming the field."""
    try:
        return fetch(ref)
    except (FileNotFoundError, StorageError) as e:
        _fail(path, where, str(e))


def _validate(spec, path):
    d, m, t, e = spec.data, spec.model, spec.train, spec.evaluate
    for where, ref in (('data.root', d.root), ('train.recording_table', t.recording_table)):
        if ref is not None:
            _local(path, where, ref)
    _choice(path, 'data.name', d.name, data_mod.DATASETS)
    _choice(path, 'data.split', d.split, ('train', 'test'))
    _positive(path, 'data.resolution', d.resolution)
    if d.transform is not None:
        _choice(path, 'data.transform', d.transform, data_mod.TRANSFORMS)
        if d.name not in ('image-folder', 'edm-dataset'):
            _fail(path, 'data.transform', f'applies to image files (data.name: image-folder or edm-dataset), not {d.name}')
        if d.resolution is None:
            _fail(path, 'data.transform', f'{d.transform} needs data.resolution (the size every image is made), as EDM\'s '
                                          'dataset_tool does')
    _positive(path, 'data.limit', d.limit)
    _choice(path, 'model.preset', m.preset, sorted(networks.PRESETS))
    _choice(path, 'model.precond', m.precond, list(precond.PRECONDS))
    if m.format is not None:
        _choice(path, 'model.format', m.format, checkpoints.FORMATS)
        if m.checkpoint is None:
            _fail(path, 'model.format', 'says the format of model.checkpoint, which is not given')
    listed = isinstance(m.checkpoint, list)
    kimgs = []
    for i, file in enumerate(m.checkpoints()):
        where = f'model.checkpoint[{i}]' if listed else 'model.checkpoint'
        local = _local(path, where, file)
        try:
            detected = checkpoints.detect_format(local)
            # A network.pt is opened here (weights_only, its tensors left on disk): a foreign one fails now.
            kimgs.append(checkpoints.snapshot_kimg(local, m.format or detected))
        except checkpoints.CheckpointError as e:
            _fail(path, where, str(e))
        if m.format is not None and m.format != detected:
            _fail(path, 'model.format', f'{m.format!r}, but {file} is a {detected} file')
        if listed and kimgs[-1] is None:
            _fail(path, where, f'{file}: cannot tell at which kimg of training it was taken (a network.pt says so; an '
                               'EDM snapshot is named network-snapshot-KIMG.pkl); a list of checkpoints is a training axis')
    if listed and len(set(kimgs)) < len(kimgs):
        _fail(path, 'model.checkpoint', f'two snapshots of the same kimg ({", ".join(f"{k:g}" for k in kimgs)})')
    for key in ('total_kimg', 'batch_size', 'lr', 'workers', 'cpus_per_worker', 'kimg_per_tick', 'checkpoint_ticks'):
        _positive(path, f'train.{key}', getattr(t, key))
    _positive(path, 'train.max_failures', t.max_failures, allow_zero=True)
    if not all(isinstance(k, (int, float)) and not isinstance(k, bool) and 0 < k <= t.total_kimg for k in t.snapshots_kimg):
        _fail(path, 'train.snapshots_kimg', f'expected numbers in (0, total_kimg = {t.total_kimg:g}], got {t.snapshots_kimg!r}')
    if t.use_gpu not in ('auto', True, False) or isinstance(t.use_gpu, int) and not isinstance(t.use_gpu, bool):
        _fail(path, 'train.use_gpu', f'expected auto, true or false, got {t.use_gpu!r}')
    _choice(path, 'train.loss', t.loss, ('vp', 've', 'edm'))
    if t.batch_size % t.workers:
        _fail(path, 'train.batch_size', f'{t.batch_size} is not divisible by train.workers = {t.workers}')
    c = spec.calibrate
    if c is not None:
        for key in ('chunk_size', 'actors', 'noise_draws', 'batch_size'):
            _positive(path, f'calibrate.{key}', getattr(c, key))
        _positive(path, 'calibrate.gpus_per_actor', c.gpus_per_actor, allow_zero=True)
        _positive(path, 'calibrate.seed', c.seed, allow_zero=True)
        _positive(path, 'calibrate.cpus_per_actor', c.cpus_per_actor, allow_zero=True)
        for i, source in enumerate(c.source if isinstance(c.source, list) else [c.source]):
            _choice(path, 'calibrate.source' + (f'[{i}]' if isinstance(c.source, list) else ''), source, ('data', 'generated'))
        for i, value in enumerate(c.per_class_options()):
            if not isinstance(value, bool):
                _fail(path, 'calibrate.per_class' + (f'[{i}]' if isinstance(c.per_class, list) else ''),
                      f'expected true or false, got {value!r}')
        if c.grid is not None:
            if set(c.grid) != {'points'} or isinstance(c.grid['points'], bool) or not isinstance(c.grid['points'], int) \
                    or c.grid['points'] < 2:
                _fail(path, 'calibrate.grid', f'expected {{points: N}} with an integer N >= 2, got {c.grid!r}')
        counts = c.images if isinstance(c.images, list) else [c.images]
        if not counts:
            _fail(path, 'calibrate.images', 'empty list: give at least one image count')
        for i, n in enumerate(counts):
            where = 'calibrate.images' + (f'[{i}]' if isinstance(c.images, list) else '')
            if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
                _fail(path, where, f'expected a positive integer, got {n!r}')
            # Smaller tables are prefixes of the largest, so their boundaries must fall on chunks.
            if len(counts) > 1 and n % c.chunk_size:
                _fail(path, where, f'{n} is not a multiple of calibrate.chunk_size = {c.chunk_size} '
                                   '(with several counts each table is a whole number of chunks)')
    s = spec.sweep
    if s is not None:
        if not s.samplers:
            _fail(path, 'sweep.samplers', 'empty: list at least one sampler, e.g. {sampler: edm, num_steps: [8, 18]}')
        for i, entry in enumerate(s.samplers):
            where = f'sweep.samplers[{i}]'
            if not isinstance(entry, dict) or 'sampler' not in entry:
                _fail(path, where, 'expected a mapping with `sampler:` (edm, ablation or dpm_solver)')
            _choice(path, f'{where}.sampler', entry['sampler'], list(SAMPLER_PARAMS))
            for key, value in entry.items():
                if key == 'sampler':
                    continue
                if key not in SAMPLER_PARAMS[entry['sampler']]:
                    valid = sorted(SAMPLER_PARAMS[entry['sampler']])
                    _fail(path, f'{where}.{key}', f'not a parameter of {entry["sampler"]}{_did_you_mean(key, valid)}; valid: {", ".join(valid)}')
                if isinstance(value, list) and not value:
                    _fail(path, f'{where}.{key}', 'empty list: give at least one value')
                if is_range(value):
                    _check_range(path, f'{where}.{key}', key, value, s.search)
                    continue
                for j, v in enumerate(value if isinstance(value, list) else [value]):
                    problem = samplers.check_setting(key, v)
                    if problem:
                        _fail(path, f'{where}.{key}' + (f'[{j}]' if isinstance(value, list) else ''), problem)
        for i, value in enumerate(s.calibrated):
            if not isinstance(value, bool):
                _fail(path, f'sweep.calibrated[{i}]', f'expected true or false, got {value!r}')
        if True in s.calibrated and spec.calibrate is None:
            _fail(path, 'sweep.calibrated', 'calibrated trials need a `calibrate:` section')
        _positive(path, 'sweep.max_failures', s.max_failures, allow_zero=True)
        for key, value in s.resources.items():
            _choice(path, f'sweep.resources.{key}', key, ('cpu', 'gpu'))
            if not isinstance(value, (int, float)) or value < 0:
                _fail(path, f'sweep.resources.{key}', f'expected a non-negative number, got {value!r}')
        if s.search is not None:
            _check_search(path, s.search, e.num_images)
        _check_trials(spec, path)
    for key in ('num_images', 'reference_images', 'seed_blocks', 'batch_size'):
        _positive(path, f'evaluate.{key}', getattr(e, key))
    if e.num_images < 2 or e.reference_images < 2:
        _fail(path, 'evaluate.num_images', 'FID needs at least 2 images on each side')
    if e.inception_weights is not None and not os.path.isfile(_local(path, 'evaluate.inception_weights', e.inception_weights)):
        _fail(path, 'evaluate.inception_weights', f'{e.inception_weights} is a folder, not a weights file')
    if e.reference_stats is not None:
        try:
            metrics.load_reference_statistics(_local(path, 'evaluate.reference_stats', e.reference_stats))
        except metrics.MetricsError as err:
            _fail(path, 'evaluate.reference_stats', str(err))
        if e.kid or e.precision_recall:
            _fail(path, 'evaluate.reference_stats', 'KID and precision/recall compare features, which a statistics file '
                                                    'does not hold: set kid and precision_recall to false')
    _positive(path, 'evaluate.class_idx', e.class_idx, allow_zero=True)
    m = spec.report.mlflow
    if m is not None:
        for key in m:
            _choice(path, f'report.mlflow.{key}', key, ('tracking_uri', 'experiment'))
        if not isinstance(m.get('tracking_uri'), str) or not m['tracking_uri']:
            _fail(path, 'report.mlflow.tracking_uri', 'missing: the MLflow tracking store, e.g. http://mlflow:5000 or '
                                                      'sqlite:///mlruns.db (the embedded cluster only)')
        if not isinstance(m.get('experiment', ''), str):
            _fail(path, 'report.mlflow.experiment', f'expected a name, got {m["experiment"]!r}')


def _check_range(path, where, name, r, search):
    """A range of a sampler parameter: numbers in the parameter's domain, low < high, integer
    ends and steps for integer settings, log only over positive values; searched by an algorithm."""
    for key in r:
        if key not in ('low', 'high', 'log', 'step'):
            _fail(path, f'{where}.{key}', f'unknown key{_did_you_mean(key, ["low", "high", "log", "step"])}; a range has '
                                          'low, high, log (true/false) and step')
    integer = name in INTEGER_SETTINGS
    for key in ('low', 'high'):
        if key not in r:
            _fail(path, where, 'a range needs `low` and `high`, e.g. {low: 0, high: 80}')
        v = r[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or integer and not isinstance(v, int):
            _fail(path, f'{where}.{key}', f'expected {"an integer" if integer else "a number"} ({name} is searched over '
                                          f'{"integers" if integer else "numbers"}), got {v!r}')
        problem = samplers.check_setting(name, v)
        if problem:
            _fail(path, f'{where}.{key}', problem)
    if not r['low'] < r['high']:
        _fail(path, where, f'low ({r["low"]:g}) must be below high ({r["high"]:g}); a single value needs no range')
    if not isinstance(r.get('log', False), bool):
        _fail(path, f'{where}.log', f'expected true or false, got {r["log"]!r}')
    step = r.get('step')
    if step is not None:
        if isinstance(step, bool) or not isinstance(step, (int, float)) or step <= 0 or integer and not isinstance(step, int):
            _fail(path, f'{where}.step', f'expected a positive {"integer" if integer else "number"}, got {step!r}')
        if r.get('log') and step != 1:
            _fail(path, f'{where}', 'give either log or step: a log-scaled range has no fixed step (Optuna)')
        if abs(range_high(r) - r['high']) > 1e-9 * max(1, abs(r['high'])):
            _fail(path, f'{where}.step', f'high - low = {r["high"] - r["low"]:g} is not a multiple of step {step:g}')
    if r.get('log') and r['low'] <= 0:
        _fail(path, f'{where}.log', f'a log-scaled range needs low > 0, got {r["low"]:g}')
    if search is None or search.algorithm is None:
        _fail(path, where, 'a range is searched by an algorithm: set sweep.search.algorithm: optuna (a grid takes a list '
                           'of values)')


def _check_search(path, search, num_images):
    w = 'sweep.search'
    if search.scheduler is None:
        search.scheduler = 'asha' if search.algorithm else 'sha'
    _choice(path, f'{w}.scheduler', search.scheduler, SCHEDULERS)
    if search.scheduler == 'sha' and search.algorithm is not None:
        _fail(path, f'{w}.scheduler', f'sha halves a fixed set of trials, rung by rung; {search.algorithm} proposes them one '
                                      'by one: use asha or fifo with an algorithm')
    _choice(path, f'{w}.metric', search.metric, ('fid',))
    _positive(path, f'{w}.min_images', search.min_images)
    if search.min_images > num_images:
        _fail(path, f'{w}.min_images', f'{search.min_images}: the first rung is above evaluate.num_images = {num_images}')
    if search.min_images < 2:
        _fail(path, f'{w}.min_images', 'a Frechet distance needs at least 2 images at the first rung')
    if not search.reduction_factor > 1:
        _fail(path, f'{w}.reduction_factor', f'must be above 1 (rungs grow by it), got {search.reduction_factor:g}')
    if search.algorithm is not None:
        _choice(path, f'{w}.algorithm', search.algorithm, ALGORITHMS)
        if search.num_samples is None:
            _fail(path, f'{w}.num_samples', f'missing: how many trials {search.algorithm} proposes')
        _positive(path, f'{w}.num_samples', search.num_samples)
    elif search.num_samples is not None:
        _fail(path, f'{w}.num_samples', 'only with an algorithm (a grid runs each of its trials once)')


SCHEDULERS = ('sha', 'asha', 'fifo')
ALGORITHMS = ('optuna',)


def _check_trials(spec, path):
    """Run each trial's sampler settings through the sampler's own validation on a stand-in."""
    from tasks import calibration, oracles
    stand_in = oracles.GaussianMixtureDenoiser([1.0], [[0.0]], [1.0])
    if spec.model.precond == 'edm':
        stand_in.sigma_min, stand_in.sigma_max = 0.0, float('inf')
    for i, trial in enumerate(spec.trials()):
        try:
            samplers.check_settings(trial['sampler'], **sampler_kwargs(trial))  # each setting against the others
            calibration.queried_sigmas(trial['sampler'], stand_in, **sampler_kwargs(trial))
        except (ValueError, TypeError) as e:
            _fail(path, f'sweep.samplers: trial {i} ({describe_trial(trial)})', str(e))


def json_schema():
    """JSON Schema of a spec file (`orchestrator schema`), for editors that complete and check
    YAML: every section and key with its type and default, the choices of the named settings,
    unknown keys refused. The checks that need values together (and files) stay in parse()."""
    import pydantic
    schema = pydantic.TypeAdapter(Spec).json_schema()
    schema['properties'].pop('path', None)
    schema.update(required=['experiment', 'data', 'model'], additionalProperties=False,
                  title='calib-edm-orchestrator experiment spec')
    schema['properties']['seed']['minimum'] = 0
    defs = schema['$defs']
    for section in defs.values():
        section['additionalProperties'] = False
    choices = {('DataSpec', 'name'): data_mod.DATASETS, ('DataSpec', 'split'): ('train', 'test'),
               ('ModelSpec', 'preset'): sorted(networks.PRESETS), ('ModelSpec', 'precond'): list(precond.PRECONDS),
               ('ModelSpec', 'format'): (*checkpoints.FORMATS, None), ('TrainSpec', 'loss'): ('vp', 've', 'edm'),
               ('TrainSpec', 'use_gpu'): ('auto', True, False), ('SearchSpec', 'scheduler'): (*SCHEDULERS, None)}
    for (section, key), values in choices.items():
        defs[section]['properties'][key]['enum'] = list(values)
    for section, aliases in ALIASES.items():
        props = defs[f'{section.capitalize()}Spec']['properties']
        props.update({alias: dict(props[key], title=alias) for alias, key in aliases.items()})
    samplers = {'type': 'object', 'required': ['sampler'], 'properties': {'sampler': {'enum': list(SAMPLER_PARAMS)}}}
    defs['SweepSpec']['properties']['samplers']['items'] = samplers
    return schema


def load(path):
    """Read and validate a spec file (safe YAML loader)."""
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except FileNotFoundError:
        raise SpecError(f'{path}: no such spec file') from None
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError(f'{path}: cannot read ({e})') from None
    except yaml.YAMLError as e:
        mark = getattr(e, 'problem_mark', None)
        where = f'line {mark.line + 1}, column {mark.column + 1}' if mark else 'YAML'
        raise SpecError(f'{path}: {where}: invalid YAML ({getattr(e, "problem", None) or e})') from None
    return parse(raw, path)
