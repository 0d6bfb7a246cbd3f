"""The authors' DOD against dod-jax at the full SD 2.1-base + ADM-256 config, same weights.

The PyTorch side is the re-statement of the authors' model (tests/dod_reference.py: diffusers,
peft, their module names; eager, torch threads = cores) with random non-trivial weights, saved
as their code saves it; dod-jax imports those files with `python -m dod_jax.methods.dod.convert
import` and restores jitted. Both restore at the posterior mode with the MFM at full resolution
(as the re-statement), stage 1+2. Per case (size, batch, dtype, CLoRA unmerged or merged into
the weights per image, dod-jax only): median wall times, the ratio `jax_over_torch` (dod-jax
time / PyTorch time), XLA's FLOPs and both sides' rate on them (against the rate of one large
float32 matmul, recorded as the ceiling), the compile time, and the max abs difference of the two
restorations. A float32 run more than 1e-3 off PyTorch's float32 restoration is recorded as
failed and gets no ratio. bfloat16 rows run dod-jax's bfloat16 restore (`load_model(dtype=
"bfloat16")`) against PyTorch's model cast to bfloat16 (as the authors run theirs in half
precision), both measured against PyTorch's float32 restoration: a run whose RMS error exceeds
BF16_RMS_RATIO times PyTorch bfloat16's own is recorded as failed. Merged CLoRA folds the weights
for each image in a compiled call of its own (timed with the restore, and alone as
fold_median_s) and restores with them as inputs. The XLA options in force are recorded (dod_jax
sets none; DOD_JAX_CPU_FLAGS=ynn_dot adds one). Results go to
bench/results/official_<backend>.json: a case measured again replaces its row, the others stay
(each row records its CPU and repetitions).

    python bench/official.py [--sizes 256 512] [--batches 1 4] [--dtypes float32 bfloat16] [--reps 3]

Needs the test extra (torch, diffusers, peft), about 20 GB of memory at 512 x 512, batch 4, and
12 GB of disk. `--config tiny` checks the bench itself in a minute (results in the temp folder).
"""

from __future__ import annotations

import argparse
import gc
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
from dod_jax.methods.dod.restore import merge_generator  # noqa: E402
from dod_jax.machine import cpu_model  # noqa: E402
from dod_jax.methods.dod.convert import main as official_main  # noqa: E402

MAX_ABS_DIFF = 1e-3  # a float32 run whose restoration differs from PyTorch's by more is recorded as failed
BF16_RMS_RATIO = 2.0  # a bfloat16 run fails when its error is above this many times PyTorch bfloat16's own


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
            images.append(jax.block_until_ready(restore(merged_graphdef, merged_state, lq[i:i + 1])))
            del merged_state  # the next image's fold must not meet this one's weights (3.3 GB at full size)
        return jnp.concatenate(images), fold_s

    return unmerged, merged, state


def released_model(folder: Path, config_name: str, perturbation: float):
    """The PyTorch re-statement with random non-trivial weights, its files saved as the authors'
    code saves them and imported by dod-jax into folder/bundle (which the caller loads)."""
    from dod_reference import authors_model, config_file, save_released
    config = load_config(config_file(folder, config_name))
    print(f"building the authors' model (configs/{config_name}.py, random weights) ...", flush=True)
    reference = authors_model(config, folder, perturbation=perturbation)
    save_released(reference, folder)
    assert official_main(["import", "--stage1", str(folder / "stage1.pkl"), "--stage2", str(folder / "stage2.pkl"),
                          "--sd", str(folder / "sd"), "--adm", str(folder / "adm.pt"),
                          "--prompts", str(folder / "prompt_embeds.pt"),
                          "--config", str(folder / f"{config_name}_full_mfm.py"), "--out", str(folder / "bundle")]) == 0
    return reference


def matmul_ceiling_gflops(n: int = 4096, reps: int = 5) -> float:
    """The float32 rate of one large jitted matmul (n x n by n x n) on this CPU: the ceiling the
    rows' GFLOP/s are read against (the CPU's nominal peak depends on a clock a VM may not report)."""
    x = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), jnp.float32)
    product = jax.jit(jnp.matmul)
    seconds, _ = median_seconds(lambda: product(x, x).block_until_ready(), reps)
    return 2 * n ** 3 / seconds / 1e9


def case_key(run: dict) -> tuple:
    """A row's case: size, batch, dtype, CLoRA, XLA options."""
    return run["size"], run["batch"], run["dtype"], run["clora"], run["xla_flags"]


def rms(a, b) -> float:
    return float(np.sqrt(np.mean((np.asarray(a, np.float64) - b) ** 2)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--dtypes", nargs="+", default=["float32"], choices=("float32", "bfloat16"),
                        help="bfloat16: dod-jax's bfloat16 restore against PyTorch's model cast to bfloat16")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--perturbation", type=float, default=0.02,
                        help="scale of the random weight offsets (tests/dod_reference.authors_model); at 1 the "
                             "full-size model overflows to NaN")
    parser.add_argument("--config", default="dod", choices=("dod", "tiny"),
                        help="configs/<name>.py; tiny is a quick check of the bench itself (rows not kept)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()

    import torch
    torch.set_num_threads(os.cpu_count())
    device = jax.devices()[0]
    results = {
        "what": "DOD stage 1+2 restore (MFM full resolution, posterior mode), SD 2.1-base + ADM-256 config, "
                "random non-trivial weights: dod-jax jitted vs the PyTorch re-statement of the authors' model",
        "device": f"{device.platform}: {device.device_kind}", "cpu": cpu_model(), "cpu_count": os.cpu_count(),
        "machine": platform.machine(), "torch_threads": torch.get_num_threads(),
        "versions": {"jax": jax.__version__, "torch": torch.__version__},
        "xla_flags": os.environ.get("XLA_FLAGS", ""), "reps": args.reps, "perturbation": args.perturbation,
        "matmul_ceiling_gflops": matmul_ceiling_gflops(), "runs": [],
    }
    path = args.out / f"official_{device.platform}.json"
    if args.config != "dod":
        path = Path(tempfile.gettempdir()) / f"official_{args.config}_{device.platform}.json"
    measured = {(size, batch, dtype, clora, results["xla_flags"]) for size in args.sizes for batch in args.batches
                for dtype in args.dtypes for clora in ("unmerged", "merged")}
    earlier = json.loads(path.read_text())["runs"] if path.exists() else []
    results["runs"] = [run for run in earlier if case_key(run) not in measured]  # cases this run does not measure again
    inputs = {(size, batch): np.random.default_rng(size * 10 + batch).uniform(-1, 1, (batch, size, size, 3))
              .astype(np.float32) for size in args.sizes for batch in args.batches}
    with tempfile.TemporaryDirectory(prefix="dod_official_bench.") as scratch:
        reference = released_model(Path(scratch), args.config, args.perturbation)
        # PyTorch's side first, then its model is freed: at 512 x 512, batch 4 the two models (5 GB
        # each) and either side's activations did not fit 23 GiB together.
        torch_runs = {}  # (size, batch, dtype) -> (median seconds, all seconds, restoration NHWC float32)
        for dtype in ("float32", "bfloat16"):
            if dtype not in args.dtypes and not (dtype == "float32" and "bfloat16" in args.dtypes):
                continue  # float32 restorations are the bfloat16 rows' reference: made, if not timed
            reference.to(getattr(torch, dtype))
            for (size, batch), lq in inputs.items():
                torch_runs[size, batch, dtype] = torch_restore(reference, lq, dtype, args.reps if dtype in args.dtypes
                                                               else 0)
        del reference
        gc.collect()
        for dtype in args.dtypes:
            loaded = load_model(Path(scratch) / "bundle", dtype=dtype, sections={"dod": {"latent": "mode"}})
            unmerged, merged, state = jax_restorers(loaded.model)
            del loaded
            for lq in inputs.values():
                measure_case(results, path, args.reps, unmerged, merged, state, lq, dtype, torch_runs)
            del unmerged, merged, state
    print(f"wrote {path}")


def torch_restore(reference, lq, dtype: str, reps: int):
    """PyTorch's restore of `lq` in `dtype`: (median seconds, each run's seconds, the restoration
    as float32 NHWC); reps 0 restores once, untimed."""
    import torch
    lq_t = torch.from_numpy(lq.transpose(0, 3, 1, 2).copy()).to(getattr(torch, dtype))
    # bfloat16: the weights are cast (as the authors' half-precision inference holds them) and
    # autocast casts what the model makes in float32 itself (the ADM's timestep embedding).
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
        if not reps:
            return None, [], reference(lq_t).float().numpy().transpose(0, 2, 3, 1)
        outputs = []
        median, each = median_seconds(lambda: outputs.append(reference(lq_t)), reps)
        return median, each, outputs[-1].float().numpy().transpose(0, 2, 3, 1)


def measure_case(results, path, reps, unmerged, merged, state, lq, dtype, torch_runs):
    """Time both CLoRA paths of dod-jax on `lq` against PyTorch's run of the case; append the rows
    and write the results. Float32 rows fail above MAX_ABS_DIFF from PyTorch; bfloat16 rows when
    dod-jax's RMS error against PyTorch's float32 restoration exceeds BF16_RMS_RATIO times
    PyTorch's own bfloat16 one."""
    batch, size = lq.shape[:2]
    lq_j = jnp.asarray(lq)  # images come in float32 to either dtype of dod-jax
    torch_s, torch_all, torch_image = torch_runs[size, batch, dtype]
    expected = torch_runs[size, batch, "float32"][2]
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
        jax_s, jax_all = median_seconds(lambda: outputs.append(jax.block_until_ready(call())), reps)
        got = np.clip(np.asarray(outputs[-1][0], np.float32), -1, 1)
        run = {"size": size, "batch": batch, "dtype": dtype, "clora": clora, "xla_flags": results["xla_flags"],
               "cpu": results["cpu"], "reps": reps, "jax_median_s": jax_s, "torch_median_s": torch_s,
               "jax_times_s": jax_all, "torch_times_s": torch_all, "jax_compile_s": compile_s, "xla_flops": flops,
               "max_abs_diff_vs_torch": float(np.abs(got - expected).max())}
        if dtype == "float32":
            run["failed"] = run["max_abs_diff_vs_torch"] > MAX_ABS_DIFF
        else:
            run["rms_vs_torch_float32"] = rms(got, expected)
            run["torch_bfloat16_rms_vs_float32"] = rms(torch_image, expected)
            run["failed"] = run["rms_vs_torch_float32"] > BF16_RMS_RATIO * run["torch_bfloat16_rms_vs_float32"]
        if clora == "merged":
            run["fold_median_s"] = float(np.median([fold_s for _, fold_s in outputs[-reps:]]))
        if not run["failed"]:  # a wrong output has no speed
            run["jax_over_torch"] = jax_s / torch_s
            if flops:  # XLA's count of the work; PyTorch's rate is the same work over its time
                run["jax_gflops_per_s"] = flops / jax_s / 1e9
                run["torch_gflops_per_s"] = flops / torch_s / 1e9
        results["runs"].append(run)
        results["runs"].sort(key=case_key)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2))  # after every case: a cut run keeps what it measured
        verdict = f"jax/torch {jax_s / torch_s:.2f}x" if not run["failed"] else "FAILED (output off PyTorch's)"
        print(f"{size}x{size} batch {batch} {dtype} CLoRA {clora}: dod-jax {jax_s:.2f}s  PyTorch {torch_s:.2f}s  "
              f"{verdict}  compile {compile_s:.0f}s  max|diff| {run['max_abs_diff_vs_torch']:.1e}", flush=True)


if __name__ == "__main__":
    main()
