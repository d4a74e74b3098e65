"""Calibrate stage: Ray actors estimate partial calibration tables over dataset chunks; the
driver merges them (tasks.calibration). Each actor holds the model once. Chunks go to actors
round-robin; if an actor dies, its chunks are recomputed on a fresh actor, and since noise
depends only on (seed, chunk, grid point), the merged table is the same.
"""
import ray
import torch
from ray.exceptions import RayActorError

from tasks import calibration
from tasks import data as data_mod
from tasks import train as tasks_train


@ray.remote
class CalibrationActor:
    def __init__(self, network_path, images, labels, num_classes, generation=None):
        self.device = 'cuda' if torch.cuda.is_available() else 'cpu'
        self.net = tasks_train.load_denoiser(network_path).to(self.device)
        self.images, self.labels, self.num_classes = images, labels, num_classes
        self.generation = generation  # source 'generated': image i is the sample of seed i

    def estimate(self, chunk_indices, sigmas, kwargs):
        images = self.images
        if self.generation is not None:
            chunks = data_mod.partition(kwargs['num_images'], kwargs['chunk_size'])
            images = torch.zeros(kwargs['num_images'], *self.generation['shape'], dtype=torch.uint8)
            for c in chunk_indices:
                rows = chunks[c]
                ds = calibration.generated_dataset(self.net, len(rows), seeds=range(rows.start, rows.stop), device=self.device,
                                                   **self.generation['sampler'])
                images[rows.start:rows.stop] = ds.images
        table = calibration.estimate_table(
            self.net, images, sigmas, labels=self.labels, num_classes=self.num_classes, chunk_size=kwargs['chunk_size'],
            chunk_indices=chunk_indices, seed=kwargs['seed'], noise_draws=kwargs['noise_draws'], flips=kwargs['flips'],
            batch_size=kwargs['batch_size'], device=self.device, meta=kwargs['meta'])
        return table.state()


def run_calibration(network_path, dataset, spec_calibrate, sigmas, meta, kill_actor_for_test=None, log=print):
    """Estimate the table over spec_calibrate.images images with spec_calibrate.actors actors.
    kill_actor_for_test: index of an actor to kill right after its work was submitted (tests
    the recomputation path)."""
    c = spec_calibrate
    n = min(c.images, len(dataset)) if c.source == 'data' else c.images
    chunks = data_mod.partition(n, c.chunk_size)
    groups = [g for g in data_mod.assign_chunks(len(chunks), c.actors) if g]
    generation = None
    images_ref = labels_ref = None
    if c.source == 'generated':
        generation = dict(shape=(dataset.channels, dataset.resolution, dataset.resolution), sampler=dict(c.generation))
    else:
        images_ref = ray.put(dataset.images[:n])
    kwargs = dict(chunk_size=c.chunk_size, seed=c.seed, noise_draws=c.noise_draws, flips=c.flips, batch_size=c.batch_size,
                  num_images=n, meta=dict(meta, source=c.source))
    options = dict(num_cpus=c.cpus_per_actor, num_gpus=c.gpus_per_actor)
    make_actor = lambda: CalibrationActor.options(**options).remote(network_path, images_ref, labels_ref, 0, generation)
    actors = [make_actor() for _ in groups]
    pending = {actor.estimate.remote(g, sigmas, kwargs): (i, g) for i, (actor, g) in enumerate(zip(actors, groups))}
    if kill_actor_for_test is not None:
        ray.kill(actors[kill_actor_for_test])
    tables, done = [], 0
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        i, group = pending.pop(ready[0])
        try:
            tables.append(calibration.CalibrationTable.from_state(ray.get(ready[0])))
            done += 1
            log(f'calibrate: actor {i} done ({len(group)} chunks); {done}/{len(groups)} groups')
        except RayActorError as e:
            log(f'calibrate: actor {i} was lost ({type(e).__name__}); recomputing its {len(group)} chunks on a new actor')
            actors[i] = make_actor()
            pending[actors[i].estimate.remote(group, sigmas, kwargs)] = (i, group)
    merged = tables[0]
    for t in tables[1:]:
        merged = merged.merge(t)
    merged.meta['image_count'] = n
    return merged
