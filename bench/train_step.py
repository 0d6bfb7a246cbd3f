"""The stage-1 training step at the SD 2.1-base config: time, memory, FLOPs.

Random base weights in the real shapes (configs/aio3.py with base.random_seed = 0), the
LPIPS-VGG16 weights `make` writes, a batch of random LQ / GT crops. Measures:
- XLA's FLOP count and memory analysis (arguments, outputs, temporaries) of the compiled step;
- the compile time and the median step time after a warm-up step;
- the process's peak resident memory;
- the bytes of one shared UNet (generator = base + CLoRA + conv_in delta, real score = base,
  fake score = base + fake LoRA) against three separate UNet copies, as the authors' code holds.
Writes bench/results/train_step_<backend>_crop<crop>.json.

    python bench/train_step.py [--crop 64] [--batch 2] [--steps 3] [--remat blocks|dots]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dod_jax import adapters  # noqa: E402
from dod_jax.configs import load_config  # noqa: E402
from dod_jax.methods.dod.build import base_models  # noqa: E402
from dod_jax.methods.dod.model import GENERATOR  # noqa: E402
from dod_jax.losses.lpips import load_lpips  # noqa: E402
from dod_jax.machine import peak_rss_gib  # noqa: E402
from dod_jax.models.layers import REMAT_POLICIES  # noqa: E402
from dod_jax.methods.dod.method import training_model  # noqa: E402
from dod_jax.methods.dod.steps import FAKE, Stage  # noqa: E402


def nbytes(tree) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "aio3.py")
    parser.add_argument("--crop", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--remat", default="none", choices=["none", *REMAT_POLICIES])
    args = parser.parse_args()
    config = load_config(args.config)
    config.base.random_seed = 0
    config.train.stage = "stage1"
    config.train.remat = args.remat
    result = {"config": args.config.stem, "crop": args.crop, "batch": args.batch, "remat": args.remat,
              "device": str(jax.devices()[0]), "backend": jax.default_backend(), "dtype": config.train.dtype}

    start = time.perf_counter()
    model = training_model(config, base_models(config))
    stage, state, frozen = Stage.create(model, config.train, load_lpips(config.train.lpips_weights))
    result["build_seconds"] = time.perf_counter() - start

    unet_base = nbytes(nnx.state(model.unet, nnx.All(nnx.Param, nnx.Not(nnx.PathContains(adapters.ADAPTERS)))))
    generator = nbytes(nnx.state(model.unet, adapters.adapter_filter(GENERATOR)))
    fake = nbytes(nnx.state(model.unet, adapters.adapter_filter(FAKE)))
    result["unet_bytes"] = {"base": unet_base, "generator_adapters": generator, "fake_lora": fake,
                            "shared": unet_base + generator + fake, "three_copies": 3 * unet_base + generator + fake}
    result["trained_state_bytes"] = nbytes(state)
    result["frozen_bytes"] = nbytes(frozen)

    rng = np.random.default_rng(0)
    batch = {k: rng.uniform(-1, 1, (args.batch, args.crop, args.crop, 3)).astype(np.float32) for k in ("lq", "gt")}
    start = time.perf_counter()
    compiled = jax.jit(stage.train_step, donate_argnums=(0,)).lower(state, frozen, batch).compile()
    result["compile_seconds"] = time.perf_counter() - start
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    result["xla_flops"] = float(cost.get("flops", float("nan")))
    memory = compiled.memory_analysis()
    if memory is not None:
        result["xla_memory_bytes"] = {k: int(getattr(memory, f"{k}_size_in_bytes"))
                                      for k in ("argument", "output", "temp", "generated_code")}
    print(json.dumps(result, indent=2), flush=True)

    state, metrics, _ = compiled(state, frozen, batch)
    jax.block_until_ready(metrics)
    seconds = []
    for _ in range(args.steps):
        start = time.perf_counter()
        state, metrics, _ = compiled(state, frozen, batch)
        jax.block_until_ready(metrics)
        seconds.append(time.perf_counter() - start)
    result["step_seconds_median"] = statistics.median(seconds)
    result["step_seconds"] = seconds
    result["metrics"] = {k: float(v) for k, v in jax.device_get(metrics).items()}
    result["peak_rss_gib"] = peak_rss_gib()
    print(json.dumps(result, indent=2))
    out = ROOT / "bench" / "results" / f"train_step_{jax.default_backend()}_crop{args.crop}.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
