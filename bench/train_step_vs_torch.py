"""dod-jax's stage-1 training step against the authors' step re-stated in PyTorch, on this CPU.

The same released weights on both sides (tests/dod_reference.py's random model saved as the
authors' files and imported), the same batch and draws: the whole stage-1 step (generator
update on MSE + LPIPS + DMD, then the fake score's update, fake scope 'official'), in float32.
dod-jax: the jitted `Stage.train_step` (XLA's default flags). PyTorch: `AuthorsTraining` eager,
torch threads = cores. Each side runs `--warmup` steps, then `--steps` timed steps; the first
step's loss terms must agree (else the run is recorded as failed, with no ratio). Appends a row
per case to bench/results/train_step_vs_torch_cpu.json; `jax_over_torch` at the top level is
the largest over the cases.

    python bench/train_step_vs_torch.py [--config tiny] [--crop 32] [--batch 2] [--steps 5]
    python bench/train_step_vs_torch.py --config dod --crop 64 --batch 2 --steps 3
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
# One CPU device, as a user's run has (the tests' conftest, imported below, would make eight).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=1").strip()

import torch  # noqa: E402

from bench.official_profile import jax_operation_times, torch_operation_times  # noqa: E402
from dod_jax.machine import cpu_model, peak_rss_gib  # noqa: E402
from test_training_vs_reference import authors_training, paired, release  # noqa: E402

OUT = ROOT / "bench" / "results" / "train_step_vs_torch_cpu.json"


def crops(rng, batch: int, size: int) -> dict:
    gt = rng.uniform(-0.9, 0.9, (batch, size, size, 3)).astype(np.float32)
    return {"lq": np.clip(gt + rng.normal(0, 0.3, gt.shape), -1, 1).astype(np.float32), "gt": gt}


def timed(fn, warmup: int, steps: int) -> tuple[list, list[float]]:
    """(outputs of every call, seconds of the timed calls)."""
    outputs, seconds = [], []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        outputs.append(fn())
        if i >= warmup:
            seconds.append(time.perf_counter() - t0)
    return outputs, seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="tiny", help="a module of configs/ (tiny; dod for SD 2.1-base)")
    parser.add_argument("--crop", type=int, default=32)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--profile", action="store_true",
                        help="also record where one step's time goes on each side (bench/official_profile.py's "
                             "operation categories: convolution, matrix products, normalisation, the rest)")
    parser.add_argument("--perturbation", type=float, default=None,
                        help="scale of the random weights' offsets (tests/dod_reference.authors_model): 1 for "
                             "tiny, 0.02 otherwise, as the full-size parity test")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count())
    with tempfile.TemporaryDirectory(prefix="train_step_vs_torch_") as scratch:
        row = measure(args, lambda name: Path(tempfile.mkdtemp(prefix=name, dir=scratch)))
    results = json.loads(OUT.read_text()) if OUT.exists() else {"cases": []}
    key = lambda r: (r["config"], r["crop"], r["batch"])
    results["cases"] = [r for r in results["cases"] if key(r) != key(row)] + [row]
    ratios = [r["jax_over_torch"] for r in results["cases"] if "jax_over_torch" in r]
    results["jax_over_torch"] = max(ratios) if ratios else None
    OUT.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps({k: v for k, v in row.items() if not k.endswith("steps_s")}, indent=1))


def measure(args, mktemp) -> dict:
    perturbation = args.perturbation or (1.0 if args.config == "tiny" else 0.02)
    # the decoder's output scaled as the parity test's (restorations inside [-1, 1])
    reference, bundle, folder = release(mktemp, args.config, perturbation=perturbation, decoder_out_scale=0.25)
    # dod-jax's side first, then PyTorch's scores: at the SD 2.1-base config the two sides (dod-jax's
    # model and step, PyTorch's three UNets) do not fit this machine's memory at once
    pair = paired(reference, bundle, folder, "stage1", "official", args.warmup + args.steps, scores=False)
    rng = np.random.default_rng(0)
    batches = [crops(rng, args.batch, args.crop) for _ in range(args.warmup + args.steps)]
    # dod-jax's first draws for every PyTorch step: step 1 is the same step on both sides (the
    # check), the later ones time the same work
    first_draws = pair.draws(batches[0])
    step = jax.jit(pair.stage.train_step)
    calls = iter(batches)
    first_restored = []

    def jax_step():
        pair.state, metrics, restored = step(pair.state, pair.frozen, jax.tree.map(jnp.asarray, next(calls)))
        if not first_restored:
            first_restored.append(np.asarray(restored))
        return {k: float(v) for k, v in jax.device_get(metrics).items()}

    t0 = time.perf_counter()
    jax_metrics, jax_seconds = timed(jax_step, args.warmup, args.steps)
    jax_warmup = time.perf_counter() - t0 - sum(jax_seconds)  # the compile included
    jax_peak = peak_rss_gib()
    if args.profile:
        batch = jax.tree.map(jnp.asarray, batches[-1])
        compiled = step.lower(pair.state, pair.frozen, batch).compile()
        jax_ops = jax_operation_times(compiled, lambda: compiled(pair.state, pair.frozen, batch), mktemp("trace"))
    # what the check compares is not trivial: restorations that vary, few pixels at the clamp
    first = first_restored[0]
    restored = {"std": float(first.std()), "at_clamp": float(np.mean(np.abs(first) >= 1))}
    pair.model = pair.state = pair.frozen = step = None
    jax.clear_caches()
    gc.collect()

    training = authors_training(reference, "stage1", pair.authors_scores(reference, folder))
    torch_steps = iter([{**first_draws, **b} for b in batches])
    torch_terms, torch_seconds = timed(lambda: training.step(next(torch_steps)), args.warmup, args.steps)
    if args.profile:
        torch_ops = torch_operation_times(lambda: training.step({**first_draws, **batches[-1]}))

    differences = {k: abs(jax_metrics[0][k] / v - 1) for k, v in torch_terms[0].items()}
    correct = max(differences.values()) < 2e-4
    row = {"config": args.config, "crop": args.crop, "batch": args.batch, "stage": "stage1", "fake_scope": "official",
           "dtype": "float32", "perturbation": perturbation, "jax_step_s": statistics.median(jax_seconds),
           "torch_step_s": statistics.median(torch_seconds), "jax_steps_s": jax_seconds, "torch_steps_s": torch_seconds,
           "jax_warmup_s": jax_warmup, "first_step_relative_differences": differences, "correct": correct,
           "first_step_restored": restored,
           "peak_rss_gib": {"after_jax": jax_peak, "after_torch": peak_rss_gib()},
           "cpu": cpu_model(), "cores": os.cpu_count(), "machine": platform.machine(),
           "jax": jax.__version__, "torch": torch.__version__, "xla_flags": os.environ.get("XLA_FLAGS", "")}
    if args.profile:
        row["operations_s"] = {"jax": jax_ops, "torch": torch_ops}
    if correct:
        row["jax_over_torch"] = row["jax_step_s"] / row["torch_step_s"]
    return row


if __name__ == "__main__":
    main()
