"""The authors' DOD against dod-jax at the full SD 2.1-base + ADM-256 config, same weights.

The PyTorch side is the re-statement of the authors' model (tests/dod_reference.py: diffusers,
peft, their module names; eager float32, torch threads = cores) with random non-trivial
weights, saved as their code saves it; dod-jax imports those files with
`python -m dod_jax.weights.official import` and restores jitted. Both restore at the posterior
mode with the MFM at full resolution (as the re-statement), stage 1+2. Per case (size, batch,
CLoRA unmerged or merged into the weights per image, dod-jax only): median wall times, the
ratio `jax_over_torch` (dod-jax time / PyTorch time), XLA's FLOPs, the compile time, and the
max abs difference of the two restorations. Results go to bench/results/official_<backend>.json.

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
from dod_jax.machine import cpu_model  # noqa: E402
from dod_jax.weights.official import main as official_main  # noqa: E402


def jax_restorers(model):
    """(unmerged, merged) jitted restores of a stage-1+2 model at the posterior mode."""
    graphdef, state = nnx.split(model)

    def unmerged(state, lq):
        return nnx.merge(graphdef, state)(lq)

    def merged(state, lq):
        m = nnx.merge(graphdef, state)
        m.merge_generator(m.film(lq))
        return m(lq)

    return jax.jit(unmerged), jax.jit(merged), state


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
    from dod_reference import authors_model, config_file, save_released

    torch.set_num_threads(os.cpu_count())
    with tempfile.TemporaryDirectory(prefix="dod_official_bench.") as scratch:
        folder = Path(scratch)
        config = load_config(config_file(folder, "dod"))
        print("building the authors' model (SD 2.1-base + ADM-256, random weights) ...", flush=True)
        reference = authors_model(config, folder, perturbation=args.perturbation)
        save_released(reference, config, folder)
        assert official_main(["import", "--stage1", str(folder / "stage1.pkl"), "--stage2", str(folder / "stage2.pkl"),
                              "--sd", str(folder / "sd"), "--adm", str(folder / "adm.pt"),
                              "--prompts", str(folder / "prompt_embeds.pt"), "--config", str(folder / "dod_full_mfm.py"),
                              "--out", str(folder / "bundle")]) == 0
        loaded = load_model(folder / "bundle", dtype="float32", dod={"latent": "mode"})
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
    rng = np.random.default_rng(0)
    for size in args.sizes:
        for batch in args.batches:
            lq = rng.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)
            lq_j, lq_t = jnp.asarray(lq), torch.from_numpy(lq.transpose(0, 3, 1, 2).copy())
            with torch.no_grad():
                torch_s, torch_all = median_seconds(lambda: reference(lq_t), args.reps)
                expected = reference(lq_t).numpy().transpose(0, 2, 3, 1)
            cases = [("unmerged", unmerged)] + ([("merged", merged)] if batch == 1 else [])
            for clora, fn in cases:
                start = time.perf_counter()
                compiled = fn.lower(state, lq_j).compile()
                compile_s = time.perf_counter() - start
                flops = (compiled.cost_analysis() or {}).get("flops")
                jax_s, jax_all = median_seconds(lambda: compiled(state, lq_j).block_until_ready(), args.reps)
                got = np.clip(np.asarray(compiled(state, lq_j)), -1, 1)
                run = {"size": size, "batch": batch, "clora": clora, "jax_median_s": jax_s, "torch_median_s": torch_s,
                       "jax_over_torch": jax_s / torch_s, "jax_times_s": jax_all, "torch_times_s": torch_all,
                       "jax_compile_s": compile_s, "xla_flops": flops,
                       "max_abs_diff_vs_torch": float(np.abs(got - expected).max())}
                results["runs"].append(run)
                args.out.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(results, indent=2))  # after every case: a cut run keeps what it measured
                print(f"{size}x{size} batch {batch} CLoRA {clora}: dod-jax {jax_s:.2f}s  PyTorch {torch_s:.2f}s  "
                      f"jax/torch {jax_s / torch_s:.2f}x  XLA flops {flops:.3e}  compile {compile_s:.0f}s  "
                      f"max|diff| {run['max_abs_diff_vs_torch']:.1e}", flush=True)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
