"""The training input pipeline: batches with a fixed number of samples per task (the stage's
task ratio), random crops and flips, images in [-1, 1], task labels kept.

Samples come per task from any indexable source of records: the scanned folder pairs
(`sources_from_pairs`) or the array_record splits prepared by dod_jax.data.tfds_builder
(`tfds_builder.task_sources`). Every batch is a pure function of (seed, step, process): which
records it holds, their crops, flips and denoising noise all follow from them. So the pipeline
is deterministic for a seed, its position is one integer (the grain iterator's state), and a
restored iterator continues with exactly the batches the interrupted run would have seen. Each
process of a multi-host run reads a disjoint shard of every task (indices
process_index::process_count).

grain runs the batch function on reader threads and prefetches.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Mapping, Sequence

import grain
import numpy as np

from dod_jax.data import degradations as deg
from dod_jax.data.layouts import DENOISE_SIGMAS, DataError, Pair
from dod_jax.errors import ConfigError
from dod_jax.image_ops import read_rgb, resize_float

STAGE1_RATIO = {"dehaze": 3, "derain": 2, "denoise": 2}
STAGE2_RATIO = {"dehaze": 1, "derain": 1, "denoise": 1}


def parse_ratio(text: str, setting: str) -> dict[str, int]:
    """A task ratio written 'task:n,task:n' -> {task: n}; `setting` (the config key it came
    from) names it in the error."""
    try:
        return {t.strip(): int(n) for t, n in (item.split(":") for item in text.split(","))}
    except ValueError as e:
        raise ConfigError(f"{setting} {text!r}: expected 'task:n,task:n'") from e


def ratio_text(ratio: dict[str, int]) -> str:
    """parse_ratio's inverse."""
    return ",".join(f"{t}:{n}" for t, n in ratio.items())


def crop_flip(images: list[np.ndarray], size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """The same random size x size crop and flips of equally shaped float images; images with a
    side below `size` are first resized up (bicubic) so that side is `size`."""
    h, w = images[0].shape[:2]
    if min(h, w) < size:
        scale = size / min(h, w)
        new = (max(size, round(h * scale)), max(size, round(w * scale)))
        images = [resize_float(i, new) for i in images]
        h, w = images[0].shape[:2]
    top, left = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
    out = [i[top:top + size, left:left + size] for i in images]
    if rng.uniform() < 0.5:
        out = [i[:, ::-1] for i in out]
    if rng.uniform() < 0.5:
        out = [i[::-1] for i in out]
    return out


@functools.lru_cache(maxsize=64)
def epoch_order(seed: int, task_id: int, epoch: int, size: int) -> np.ndarray:
    """The permutation of a task's shard for one epoch; cached, as every sample of the epoch
    (tens of thousands for RESIDE) needs it."""
    return np.random.default_rng([seed, task_id, epoch]).permutation(size)


def sources_from_pairs(pairs: list[Pair]) -> dict[str, list[Pair]]:
    by_task: dict[str, list[Pair]] = {}
    for pair in pairs:
        by_task.setdefault(pair.task, []).append(pair)
    return by_task


def record_fields(record) -> tuple[object, object | None, float | None]:
    """(gt, lq or None, sigma or None) of a folder Pair or a prepared record (dict of bytes)."""
    if isinstance(record, Pair):
        return record.gt, record.lq, record.sigma
    name = record["name"].decode() if isinstance(record["name"], bytes) else record["name"]
    lq = (record["lq"], f"{name} (lq)") if len(record["lq"]) else None
    sigma = float(record["sigma"])
    return (record["gt"], f"{name} (gt)"), lq, (sigma if sigma > 0 else None)


@dataclasses.dataclass
class TrainBatches:
    """batch(step) -> {"lq", "gt": (n, crop, crop, 3) float32 in [-1, 1], "task": (n,) int32}, with
    n = sum(ratio.values()) * units, tasks in `ratio`'s order (task ids index `tasks`)."""
    sources: Mapping[str, Sequence]
    ratio: Mapping[str, int]
    crop: int = 256
    units: int = 1
    seed: int = 0
    process_index: int = 0
    process_count: int = 1
    sigmas: tuple[float, ...] = DENOISE_SIGMAS

    def __post_init__(self):
        self.tasks = tuple(self.ratio)
        absent = [t for t in self.tasks if t not in self.sources or len(self.sources[t]) == 0]
        if absent:
            raise DataError(f"the task ratio asks for {absent}, which the data has no pairs for")
        self.shards = {t: range(self.process_index, len(self.sources[t]), self.process_count) for t in self.tasks}
        empty = [t for t, indices in self.shards.items() if not indices]
        if empty:
            raise DataError(f"process {self.process_index} of {self.process_count} gets no {empty} pairs: "
                            "fewer images than processes")

    @property
    def batch_size(self) -> int:
        return sum(self.ratio.values()) * self.units

    def _pick(self, task_id: int, position: int) -> int:
        """The source index at a position of the task's endless stream: each epoch is a fresh
        permutation of the process's shard."""
        shard = self.shards[self.tasks[task_id]]
        epoch, offset = divmod(position, len(shard))
        return shard[epoch_order(self.seed, task_id, epoch, len(shard))[offset]]

    def sample(self, task_id: int, position: int) -> tuple[np.ndarray, np.ndarray]:
        record = self.sources[self.tasks[task_id]][self._pick(task_id, position)]
        gt_file, lq_file, sigma = record_fields(record)
        rng = np.random.default_rng([self.seed, task_id, position, 1])
        gt = read_rgb(gt_file)
        if lq_file is None:
            (gt,) = crop_flip([gt], self.crop, rng)
            sigma = sigma if sigma is not None else float(rng.choice(self.sigmas))
            lq = deg.gaussian_noise(np.ascontiguousarray(gt), sigma, seed=[self.seed, task_id, position, 2])
        else:
            lq = read_rgb(lq_file)
            if lq.shape != gt.shape:
                raise DataError(f"{lq_file}: size {lq.shape[:2]} differs from its ground truth {gt_file} {gt.shape[:2]}")
            lq, gt = crop_flip([lq, gt], self.crop, rng)
        return lq, gt

    def batch(self, step: int) -> dict[str, np.ndarray]:
        lqs, gts, labels = [], [], []
        for task_id, task in enumerate(self.tasks):
            count = self.ratio[task] * self.units
            for j in range(count):
                lq, gt = self.sample(task_id, step * count + j)
                lqs.append(lq)
                gts.append(gt)
                labels.append(task_id)
        to_signed = lambda xs: np.stack(xs).astype(np.float32) * 2.0 - 1.0
        return {"lq": to_signed(lqs), "gt": to_signed(gts), "task": np.asarray(labels, np.int32)}

    def iterator(self, num_steps: int, threads: int = 4, prefetch: int = 8) -> grain.DatasetIterator:
        """A grain iterator over batches 0..num_steps-1; get_state()/set_state() save and restore
        its position."""
        dataset = grain.MapDataset.range(num_steps).map(self.batch)
        return iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=prefetch)))
