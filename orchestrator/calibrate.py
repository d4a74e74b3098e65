"""Calibrate stage: Ray actors estimate partial calibration tables over dataset chunks; the
driver merges them (tasks.calibration). Each actor holds the model once. Chunks go to actors
round-robin; if an actor dies, its chunks are recomputed on a fresh actor, and since noise
depends only on (seed, chunk, grid point), the merged table is the same.

Several image counts (Calib Table 4) cost one pass over the largest: the chunks are cut into
segments at the counts, each actor returns one partial table per segment, and the table for
count n_j merges segments 1..j. The driver merges in group and segment order, so the result
does not depend on which actor finished first.
"""
import os
import time

import ray
import torch
from ray.exceptions import RayActorError, RayError
from tqdm import tqdm

from orchestrator.spec import StageFailed, cpus_gpus, stable_hash
from tasks import calibration, checkpoints
from tasks import data as data_mod


@ray.remote(max_concurrency=2)  # a second thread answers progress() while estimate() runs
class CalibrationActor:
    def __init__(self, model, images, labels, num_classes, generation=None):
        self.done = 0  # image x sigma evaluations finished (for the driver's progress bar)
        self.device = 'cuda' if torch.cuda.is_available() else 'cpu'
        self.net = checkpoints.load_denoiser(model['network'], model['format']).to(self.device)
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


def run_calibration(model, dataset, spec_calibrate, source, sigmas, meta, log=print, keep_dir=None, stall_timeout=None,
                    label=None):
    """The tables {image count: CalibrationTable} of one source ('data' or 'generated') for
    spec_calibrate.counts(), with spec_calibrate.actors actors. model: the model stage's outputs
    (network path and format). Tables are per class when calibrate.per_class asks for it.
    keep_dir: each finished chunk group's partial tables are kept there (the stage's folder, whose
    hash covers everything that decides them), so a killed run recomputes only the rest.
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
    kept = lambda i, s: os.path.join(keep_dir, f'partial-{source}-{stable_hash(work[i])}-{s}.pt')
    partial = {}
    for i in range(len(groups)) if keep_dir else ():
        if all(os.path.isfile(kept(i, s)) for s in work[i]):
            partial[i] = {s: calibration.CalibrationTable.load(kept(i, s)) for s in work[i]}
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
            for s, table in partial[i].items() if keep_dir else ():
                table.save(kept(i, s))
            bar.n = max(bar.n, sum(sizes[j] for j in partial))  # the running actors' work still counts
            bar.refresh()
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
