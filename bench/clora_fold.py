"""Where merged CLoRA's per-image fold (dod_jax.methods.dod.restore.merge_generator) spends its time.

At the SD 2.1-base + ADM-256 config with random weights (non-zero B and M_theta), one image of
--size pixels, the MFM at full resolution: the modulation alone (ADM features + M_theta), the
merge alone given the modulation, the whole fold, and a plain `x + 1` over the arrays the fold
writes (how long writing that many fresh bytes takes here). Medians of --reps after a warm-up.
Writes bench/results/clora_fold_<backend>.json.

    python bench/clora_fold.py [--size 256] [--reps 5]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from bench.forward import median_seconds  # noqa: E402
from dod_jax.configs import load_config  # noqa: E402
from dod_jax.methods.dod.build import build_dod, random_base  # noqa: E402
from dod_jax.machine import cpu_model  # noqa: E402
from dod_jax.methods.dod.restore import fold_for, merge_generator  # noqa: E402
from merge_check import randomise_generator_b, randomise_mtheta  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    config = load_config(ROOT / "configs" / "dod.py")
    config.dod.update({"mfm_size": 0, "latent": "mode"})
    model = build_dod(config, random_base(config, 0), 0)
    randomise_generator_b(model)
    randomise_mtheta(model)
    graphdef, state = nnx.split(model)
    lq = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (1, args.size, args.size, 3)), jnp.float32)

    film_of = jax.jit(lambda state, lq: nnx.merge(graphdef, state).film(lq))
    film = film_of(state, lq)
    merge_given = jax.jit(fold_for, static_argnums=0)  # the fold's merge, given the modulation
    arrays = jax.tree.leaves(merge_given(graphdef, state, film)[1])
    plus_one = jax.jit(lambda arrays: [a + 1.0 for a in arrays])
    timed = {
        "modulation (MFM + M_theta)": lambda: film_of(state, lq),
        "merge given the modulation": lambda: merge_given(graphdef, state, film),
        "whole fold (merge_generator)": lambda: merge_generator(graphdef, state, lq),
        "x + 1 over the written arrays": lambda: plus_one(arrays),
    }
    results = {"what": f"merged CLoRA's fold for one {args.size}x{args.size} image, SD 2.1-base + ADM-256, float32",
               "cpu": cpu_model(), "cpu_count": os.cpu_count(), "reps": args.reps,
               "written_arrays": len(arrays), "written_mb": sum(a.nbytes for a in arrays) / 1e6, "seconds": {}}
    for name, call in timed.items():
        median, each = median_seconds(lambda: jax.block_until_ready(call()), args.reps)
        results["seconds"][name] = {"median": median, "each": each}
        print(f"{name}: {median:.3f} s  {np.round(each, 3).tolist()}", flush=True)
    path = args.out / f"clora_fold_{jax.default_backend()}.json"
    path.write_text(json.dumps(results, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
