"""The authors' DOD against dod-jax at the full SD 2.1-base + ADM-256 config, same weights.

The PyTorch side is the re-statement of the authors' model (tests/dod_reference.py: diffusers,
peft, their module names; eager float32, torch threads = cores) with random non-trivial
weights, saved as their code saves it; dod-jax imports those files with
`python -m dod_jax.weights.official import` and restores jitted. Both restore at the posterior
mode with the MFM at full resolution (as the re-statement), stage 1+2. Per case (size, batch,
CLoRA unmerged or merged into the weights per image, dod-jax only): median wall times, the
ratio `jax_over_torch` (dod-jax time / PyTorch time), XLA's FLOPs, the compile time, and the
max abs difference of the two restorations: a run more than 1e-3 off PyTorch is recorded as
failed and gets no ratio. Merged CLoRA folds the weights for each image in a compiled call of
its own (timed with the restore, and alone as fold_median_s) and restores with them as inputs.
The XLA options in force are recorded (dod_jax sets none; DOD_JAX_CPU_FLAGS=ynn_dot adds one).
Results go to bench/results/official_<backend>.json: a case measured again replaces its row,
the others stay (each row records its CPU and repetitions).

    python bench/official.py [--sizes 256 512] [--batches 1 4] [--reps 3]

Needs the test extra (torch, diffusers, peft) and about 16 GB of memory and 12 GB of disk.
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

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from bench.forward import median_seconds  # noqa: E402
from dod_jax.configs import load_config  # noqa: E402
from dod_jax.restore.bundle import load_model  # noqa: E402
from dod_jax.restore.engine import merge_generator  # noqa: E402
from dod_jax.machine import cpu_model  # noqa: E402
from dod_jax.weights.official import main as official_main  # noqa: E402

MAX_ABS_DIFF = 1e-3  # a run whose restoration differs from PyTorch's by more is recorded as failed


def jax_restorers(model):
    """(unmerged, merged, state): jitted restores of a stage-1+2 model at the posterior mode.
    `merged(state, lq)` folds CLoRA for each image in one compiled call (engine.merge_generator)
    and restores it with the merged weights as inputs in another; it returns the images and the
    seconds the folds took."""
    graphdef, state = nnx.split(model)
    unmerged = jax.jit(lambda state, lq: nnx.merge(graphdef, state)(lq))
    restore = jax.jit(lambda merged_graphdef, merged_state, lq: nnx.merge(merged_graphdef, merged_state)(lq),
                      static_argnums=0)

    def merged(state, lq):
        images, fold_s = [], 0.0
        for i in range(lq.shape[0]):  # the fold is per image
            start = time.perf_counter()
            merged_graphdef, merged_state = jax.block_until_ready(merge_generator(graphdef, state, lq[i:i + 1]))
            fold_s += time.perf_counter() - start
            images.append(restore(merged_graphdef, merged_state, lq[i:i + 1]))
        return jnp.concatenate(images), fold_s

    return unmerged, merged, state


def both_models(folder: Path, perturbation: float):
    """(the PyTorch re-statement with random non-trivial weights, dod-jax's import of the files
    it saves as the authors' code does, loaded float32 at the posterior mode); `folder` holds
    the files while the import runs."""
    from dod_reference import authors_model, config_file, save_released
    config = load_config(config_file(folder, "dod"))
    print("building the authors' model (SD 2.1-base + ADM-256, random weights) ...", flush=True)
    reference = authors_model(config, folder, perturbation=perturbation)
    save_released(reference, folder)
    assert official_main(["import", "--stage1", str(folder / "stage1.pkl"), "--stage2", str(folder / "stage2.pkl"),
                          "--sd", str(folder / "sd"), "--adm", str(folder / "adm.pt"),
                          "--prompts", str(folder / "prompt_embeds.pt"), "--config", str(folder / "dod_full_mfm.py"),
                          "--out", str(folder / "bundle")]) == 0
    return reference, load_model(folder / "bundle", dtype="float32", dod={"latent": "mode"})


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--perturbation", type=float, default=0.02,
                        help="scale of the random weight offsets (tests/dod_reference.authors_model); at 1 the "
                             "full-size model overflows to NaN")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()

    import torch
    torch.set_num_threads(os.cpu_count())
    with tempfile.TemporaryDirectory(prefix="dod_official_bench.") as scratch:
        reference, loaded = both_models(Path(scratch), args.perturbation)
    unmerged, merged, state = jax_restorers(loaded.model)

    device = jax.devices()[0]
    results = {
        "what": "DOD stage 1+2 restore (MFM full resolution, posterior mode), SD 2.1-base + ADM-256 config, "
                "random non-trivial weights, float32: dod-jax jitted vs the PyTorch re-statement of the authors' model",
        "device": f"{device.platform}: {device.device_kind}", "cpu": cpu_model(), "cpu_count": os.cpu_count(),
        "machine": platform.machine(), "torch_threads": torch.get_num_threads(),
        "versions": {"jax": jax.__version__, "torch": torch.__version__},
        "xla_flags": os.environ.get("XLA_FLAGS", ""), "reps": args.reps, "perturbation": args.perturbation,
        "runs": [],
    }
    path = args.out / f"official_{device.platform}.json"
    case = lambda run: (run["size"], run["batch"], run["clora"], run["xla_flags"])
    measured = {(size, batch, clora, results["xla_flags"]) for size in args.sizes for batch in args.batches
                for clora in ("unmerged", "merged")}
    earlier = json.loads(path.read_text())["runs"] if path.exists() else []
    kept = [run for run in earlier if case(run) not in measured]  # cases this run does not measure again
    results["runs"] = list(kept)
    rng = np.random.default_rng(0)
    for size in args.sizes:
        for batch in args.batches:
            lq = rng.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)
            lq_j, lq_t = jnp.asarray(lq), torch.from_numpy(lq.transpose(0, 3, 1, 2).copy())
            with torch.no_grad():
                torch_out = []
                torch_s, torch_all = median_seconds(lambda: torch_out.append(reference(lq_t)), args.reps)
                expected = torch_out[-1].numpy().transpose(0, 2, 3, 1)
            for clora in ("unmerged", "merged"):
                start = time.perf_counter()
                if clora == "unmerged":
                    compiled = unmerged.lower(state, lq_j).compile()
                    call = lambda: (compiled(state, lq_j), 0.0)
                    flops = (compiled.cost_analysis() or {}).get("flops")
                else:
                    jax.block_until_ready(merged(state, lq_j))  # compiles the fold and the restore
                    call, flops = (lambda: merged(state, lq_j)), None
                compile_s = time.perf_counter() - start
                outputs = []  # (images, fold seconds) of each call
                jax_s, jax_all = median_seconds(lambda: outputs.append(jax.block_until_ready(call())), args.reps)
                got = np.clip(np.asarray(outputs[-1][0]), -1, 1)
                err = float(np.abs(got - expected).max())
                run = {"size": size, "batch": batch, "clora": clora, "xla_flags": results["xla_flags"],
                       "cpu": results["cpu"], "reps": args.reps,
                       "jax_median_s": jax_s, "torch_median_s": torch_s, "jax_times_s": jax_all,
                       "torch_times_s": torch_all, "jax_compile_s": compile_s, "xla_flops": flops,
                       "max_abs_diff_vs_torch": err, "failed": err > MAX_ABS_DIFF}
                if clora == "merged":
                    run["fold_median_s"] = float(np.median([fold_s for _, fold_s in outputs[-args.reps:]]))
                if not run["failed"]:  # a wrong output has no speed
                    run["jax_over_torch"] = jax_s / torch_s
                    if flops:
                        run["jax_gflops_per_s"] = flops / jax_s / 1e9
                results["runs"].append(run)
                results["runs"].sort(key=case)
                args.out.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(results, indent=2))  # after every case: a cut run keeps what it measured
                verdict = (f"jax/torch {jax_s / torch_s:.2f}x" if not run["failed"]
                           else f"FAILED (max|diff| above {MAX_ABS_DIFF})")
                print(f"{size}x{size} batch {batch} CLoRA {clora}: dod-jax {jax_s:.2f}s  PyTorch {torch_s:.2f}s  "
                      f"{verdict}  compile {compile_s:.0f}s  max|diff| {err:.1e}", flush=True)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
