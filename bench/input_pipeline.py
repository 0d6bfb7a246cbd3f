"""Input pipeline throughput: stage-1 batches (dehaze:derain:denoise = 3:2:2, 256 crops) from
the built-in demo set, through dod_jax.data.pipeline (grain reader threads) against a naive
loop that opens, converts and crops the same files with PIL one sample at a time.

    python bench/input_pipeline.py [--batches 30] [--threads 4] [--units 1]

Writes bench/results/input_pipeline_<machine>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dod_jax.data.demo import write_demo_set  # noqa: E402
from dod_jax.data.layouts import checked_pairs  # noqa: E402
from dod_jax.data.pipeline import STAGE1_RATIO, TrainBatches, sources_from_pairs  # noqa: E402


def naive_batches(pairs, ratio, crop, count, seed=0):
    """What a first training script does: per sample, PIL open + convert + numpy crop."""
    rng = np.random.default_rng(seed)
    by_task = {t: [p for p in pairs if p.task == t] for t in ratio}
    for _ in range(count):
        lqs, gts = [], []
        for task, n in ratio.items():
            for _ in range(n):
                pair = by_task[task][rng.integers(len(by_task[task]))]
                gt = np.asarray(Image.open(pair.gt).convert("RGB"), np.float32) / 255.0
                lq = gt + rng.standard_normal(gt.shape).astype(np.float32) * 25 / 255 if pair.lq is None else \
                    np.asarray(Image.open(pair.lq).convert("RGB"), np.float32) / 255.0
                top, left = rng.integers(0, gt.shape[0] - crop + 1), rng.integers(0, gt.shape[1] - crop + 1)
                lqs.append(lq[top:top + crop, left:left + crop])
                gts.append(gt[top:top + crop, left:left + crop])
        yield np.stack(lqs) * 2 - 1, np.stack(gts) * 2 - 1


def rate(iterator, count) -> float:
    next(iterator)  # warm-up: thread start, first reads
    t0 = time.perf_counter()
    for _ in range(count):
        next(iterator)
    return count / (time.perf_counter() - t0)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--units", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        pairs = checked_pairs(write_demo_set(Path(tmp) / "demo"), "aio3", "train")
        ratio = {t: n * args.units for t, n in STAGE1_RATIO.items()}
        batches = TrainBatches(sources_from_pairs(pairs), STAGE1_RATIO, crop=256, units=args.units)
        ours = rate(batches.iterator(args.batches + 1, threads=args.threads), args.batches)
        naive = rate(naive_batches(pairs, ratio, 256, args.batches + 1), args.batches)
    result = {"what": f"stage-1 batches of {batches.batch_size} (3:2:2), 256 crops, demo set",
              "machine": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
              "threads": args.threads, "batches": args.batches,
              "dod_jax_batches_per_s": ours, "naive_pil_batches_per_s": naive, "speedup": ours / naive}
    print(f"dod_jax pipeline {ours:.2f} batches/s ({ours * batches.batch_size:.1f} samples/s), naive PIL loop "
          f"{naive:.2f} batches/s: {ours / naive:.2f}x")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"input_pipeline_{platform.machine()}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
