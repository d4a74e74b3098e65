"""Calibrate stage, and its calibration and likelihood tables: Ray actors estimate partial
calibration tables over dataset chunks; the driver merges them (tasks.calibration). Each actor
holds the model once. Chunks go to actors round-robin; if an actor dies, its chunks are recomputed on a fresh actor, and since noise
depends only on (seed, chunk, grid point), the merged table is the same.

Several image counts (Calib Table 4) cost one pass over the largest: the chunks are cut into
segments at the counts, each actor returns one partial table per segment, and the table for
count n_j merges segments 1..j. The driver merges in group and segment order, so the result
does not depend on which actor finished first.

The images reach the actors through Ray's object store, the network through the results root
(orchestrator.storage): nothing on the driver's disk is read by an actor.
"""
import dataclasses
import math
import time

import ray
import torch
from ray.exceptions import RayActorError, RayError, RayTaskError
from tqdm import tqdm

from orchestrator import results
from orchestrator.plan import NOT_HASHED
from orchestrator.spec import CalibrateSpec, StageFailed, cpus_gpus, stable_hash, table_key
from orchestrator.storage import fetch
from tasks import calibration, checkpoints
from tasks import data as data_mod


@ray.remote(max_concurrency=2)  # a second thread answers progress() while estimate() runs
class CalibrationActor:
    def __init__(self, model, images, labels, num_classes, generation=None):
        self.done = 0  # image x sigma evaluations finished (for the driver's progress bar)
        self.device = 'cuda' if torch.cuda.is_available() else 'cpu'
        self.net = checkpoints.load_denoiser(fetch(model['network'], model.get('sha256')), model['format']).to(self.device)
        self.images, self.labels, self.num_classes = images, labels, num_classes
        self.generation = generation  # source 'generated': image i is the sample of seed i

    def estimate(self, segments, sigmas, kwargs):
        """segments: {segment index: chunk indices}. Returns {segment index: table state}."""
        chunks = data_mod.partition(kwargs['num_images'], kwargs['chunk_size'])
        images, labels = self.images, self.labels
        if self.generation is not None:  # a conditional model's samples carry the class their seed drew
            images = torch.zeros(kwargs['num_images'], *self.generation['shape'], dtype=torch.uint8)
            labels = torch.zeros(kwargs['num_images'], dtype=torch.long)
            for c in (c for group in segments.values() for c in group):
                rows = chunks[c]
                ds = calibration.generated_dataset(self.net, len(rows), seeds=range(rows.start, rows.stop), device=self.device,
                                                   **self.generation['sampler'])
                images[rows.start:rows.stop], labels[rows.start:rows.stop] = ds.images, ds.labels
        return {s: calibration.estimate_table(
                    self.net, images, sigmas, labels=labels, num_classes=self.num_classes, chunk_size=kwargs['chunk_size'],
                    chunk_indices=group, seed=kwargs['seed'], noise_draws=kwargs['noise_draws'], flips=kwargs['flips'],
                    batch_size=kwargs['batch_size'], device=self.device, meta=kwargs['meta'], on_step=self._count).state()
                for s, group in segments.items()}

    def _count(self, images):
        self.done += images

    def progress(self):
        return self.done


def segment_chunks(counts, chunk_size):
    """Chunk indices of each segment: segment j holds the chunks between counts[j-1] and
    counts[j] (sorted). A table over the first counts[j] images merges segments 0..j."""
    chunks = data_mod.partition(counts[-1], chunk_size)
    return [[i for i, rows in enumerate(chunks) if lo <= rows.start < hi] for lo, hi in zip([0] + counts[:-1], counts)]


def run_calibration(model, dataset, spec_calibrate, source, sigmas, meta, log=print, keep=None, stall_timeout=None,
                    label=None):
    """The tables {image count: CalibrationTable} of one source ('data' or 'generated') for
    spec_calibrate.counts(), with spec_calibrate.actors actors. model: the model stage's outputs
    (network path and format). Tables are per class when calibrate.per_class asks for it.
    keep: (storage, key): each finished chunk group's partial tables are kept there (the stage's
    folder, whose hash covers everything that decides them), so a killed run recomputes only the rest.
    stall_timeout: seconds without progress (no image finished anywhere, e.g. a lost node's actors
    waiting for resources the cluster no longer has) after which the stage gives up, saying so.
    label: what the console calls this estimate (default: the source)."""
    label = label or source
    c = spec_calibrate
    counts = c.counts()
    n = counts[-1]
    segments = segment_chunks(counts, c.chunk_size)
    chunk_segment = {chunk: s for s, group in enumerate(segments) for chunk in group}
    groups = [g for g in data_mod.assign_chunks(len(chunk_segment), c.actors) if g]
    work = [{s: [i for i in g if chunk_segment[i] == s] for s in sorted({chunk_segment[i] for i in g})} for g in groups]
    generation = images_ref = labels_ref = None
    if source == 'generated':
        generation = dict(shape=(dataset.channels, dataset.resolution, dataset.resolution), sampler=dict(c.generation))
    else:
        images_ref, labels_ref = ray.put(dataset.images[:n]), ray.put(dataset.labels[:n])
    num_classes = dataset.num_classes if True in c.per_class_options() else 0
    kwargs = dict(chunk_size=c.chunk_size, seed=c.seed, noise_draws=c.noise_draws, flips=c.flips, batch_size=c.batch_size,
                  num_images=n, meta=dict(meta, source=source))
    options = dict(num_cpus=c.cpus_per_actor, num_gpus=c.gpus_per_actor)
    make_actor = lambda: CalibrationActor.options(**options).remote(model, images_ref, labels_ref, num_classes, generation)
    storage, folder = keep or (None, None)
    kept = lambda i, s: f'{folder}/partial-{source}-{stable_hash(work[i])}-{s}.pt'
    partial = {}
    for i in range(len(groups)) if keep else ():
        if all(storage.exists(kept(i, s)) for s in work[i]):
            partial[i] = {s: calibration.CalibrationTable.load(fetch(storage.uri(kept(i, s)))) for s in work[i]}
    if partial:
        log(f'calibrate ({label}): {len(partial)} of {len(groups)} chunk groups finished before and reused')
    todo = [i for i in range(len(groups)) if i not in partial]
    actors = {i: make_actor() for i in todo}
    pending = {actors[i].estimate.remote(work[i], sigmas, kwargs): i for i in todo}
    rows = data_mod.partition(n, c.chunk_size)
    sizes = [sum(len(rows[j]) for j in group) * len(sigmas) for group in groups]
    bar = tqdm(total=sum(sizes), initial=sum(sizes[i] for i in partial), unit=' img', unit_scale=True,
               desc=f'calibrate ({label}, images x sigmas)')
    progressed = time.monotonic()
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
        if not ready:  # nothing finished yet: ask the working actors how far they are
            try:
                running = dict(zip(pending.values(), ray.get([actors[i].progress.remote() for i in pending.values()], timeout=5)))
                done = sum(sizes[i] for i in partial) + sum(running.values())
                if done > bar.n:
                    progressed = time.monotonic()
                bar.n = done
                bar.refresh()
            except RayError:
                pass  # a lost or busy actor (or one not placed yet): ray.wait reports a loss next
            if stall_timeout and time.monotonic() - progressed > stall_timeout:
                bar.close()
                raise StageFailed(
                    f'calibrate ({label}): no progress for {stall_timeout:g} s; {len(pending)} chunk group(s) wait for an '
                    f'actor ({cpus_gpus(dict(CPU=c.cpus_per_actor, GPU=c.gpus_per_actor))} each); the cluster has '
                    f'{cpus_gpus(ray.available_resources())} free of {cpus_gpus(ray.cluster_resources())}. '
                    'The finished groups are kept: run again once it has the resources.')
            continue
        progressed = time.monotonic()
        i = pending.pop(ready[0])
        chunks = len(groups[i])
        try:
            partial[i] = {s: calibration.CalibrationTable.from_state(state) for s, state in ray.get(ready[0]).items()}
            ray.kill(actors.pop(i))  # its CPUs (or GPU share) go back to the cluster now
            for s, table in partial[i].items() if keep else ():
                storage.write_file(kept(i, s), table.save)
            bar.n = max(bar.n, sum(sizes[j] for j in partial))  # the running actors' work still counts
            bar.refresh()
        except RayTaskError as e:  # the estimate itself failed (a non-finite D, ...): deterministic, one line
            bar.close()
            cause = e.cause if e.cause is not None else e
            raise StageFailed(f'calibrate ({label}): {str(cause).strip().splitlines()[0]}') from None
        except RayActorError as e:
            log(f'calibrate ({label}): actor {i} was lost ({type(e).__name__}); recomputing its {chunks} chunks on a new actor')
            bar.n = sum(sizes[j] for j in partial)  # what that actor had done is lost
            bar.refresh()
            actors[i] = make_actor()
            pending[actors[i].estimate.remote(work[i], sigmas, kwargs)] = i
    bar.close()
    tables, merged = {}, None
    for s, count in enumerate(counts):
        for i in sorted(partial):
            if s in partial[i]:
                merged = partial[i][s] if merged is None else merged.merge(partial[i][s])
        merged.meta['image_count'] = count
        tables[count] = merged  # merge() returns a new table, so later merges leave this one as is
    return tables


def run_calibrate_stage(stage, upstream, dataset, opts):
    """One calibration per model snapshot, each on its own sigma grid (the plan's, as hashed).
    Outputs: {table_key: the table's URI (or path) under the stage's storage}."""
    storage = stage.storage
    c = CalibrateSpec(**stage.inputs['calibrate'], **{k: v for k, v in stage.options.items() if k in NOT_HASHED['calibrate']})
    snapshots = (upstream.get('train') or upstream['checkpoint'])['snapshots']
    tables = {}
    for key, model in snapshots.items():
        net = checkpoints.load_denoiser(fetch(model['network'], model.get('sha256')), model['format'])  # fits: plan.check_inputs
        sigmas = torch.tensor(stage.inputs['sigmas'][key], dtype=torch.float64)
        name = f'{key}: ' if len(snapshots) > 1 else ''
        opts.log(f'calibrate: {name}{len(sigmas)} sigmas ' + (
            f'log-spaced over [{sigmas[0]:.4g}, {sigmas[-1]:.4g}], where every sigma the search can query lies (looked up '
            'by interpolation)' if stage.options.get('grid_points') else '(every sigma the calibrated trials will query)'))
        meta = dict(model=calibration.fingerprint(net), dataset=dataset.content_hash(), shape=list(dataset.images.shape[1:]),
                    snapshot_kimg=model['kimg'])
        folder = f'{stage.key}/{key}'  # partial tables, tables and figures of this snapshot
        for source in c.sources():
            by_count = run_calibration(model, dataset, c, source, sigmas, meta, log=opts.log, keep=(storage, folder),
                                       stall_timeout=opts.stall_timeout, label=f'{name}{source}')
            for n, table in by_count.items():
                tables[table_key(model['kimg'], source, n)] = storage.write_file(f'{folder}/table-{source}-{n}.pt', table.save)
            figure = by_count[max(by_count)]
            storage.write_file(f'{folder}/mean_eps-{source}.png', lambda path: calibration.save_mean_eps_figure(figure, path))
    return dict(tables=tables)


def write_calibration_tables(spec, stage, outputs, prov):
    """calibration: one row per table and sigma (Calib Fig. 1 top row and Eq. 27); likelihood:
    one row per table, the gain of the likelihood bound (Calib Eq. 11)."""
    rows, gains = [], []
    for uri in outputs['tables'].values():
        table = calibration.CalibrationTable.load(fetch(uri))
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
    results.write_table(stage.storage, spec.experiment, 'calibration', rows, dict(prov, device=None))
    results.write_table(stage.storage, spec.experiment, 'likelihood', gains, dict(prov, device=None))
