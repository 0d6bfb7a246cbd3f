"""What the float32 output head buys under a bfloat16 UNet, at the SD 2.1-base config: the one-step
path DOD uses (VAE encode, one UNet step at t = 999, x0, VAE decode; tests/sd_one_step.py) on a
test card, with random weights (PyTorch-style fan-in init), the VAE in float32 throughout, the
UNet computing in float32 (the truth), in bfloat16 with its head (conv_norm_out, conv_out) and
eps in float32 (dod-jax's default), and in bfloat16 throughout. The same float32 weights in all
three. Records the max abs and RMS error of x0 and of the decoded image against float32.

    python bench/bf16_head.py [--size 256] [--out bench/results/bf16_head_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from dod_jax.configs import load_config  # noqa: E402
from dod_jax.machine import cpu_model  # noqa: E402
from dod_jax.models.layers import FixedKeyRngs, NumpyRngs  # noqa: E402
from dod_jax.models.unet import UNet2DCondition, UNetConfig  # noqa: E402
from sd_one_step import colour_card  # noqa: E402
from dod_jax.models.vae import AutoencoderKL, VAEConfig  # noqa: E402
from dod_jax.schedule import DDPMSchedule  # noqa: E402

HEADS = {"float32": (jnp.float32, jnp.float32), "bfloat16, float32 head": (jnp.bfloat16, jnp.float32),
         "bfloat16 throughout": (jnp.bfloat16, None)}  # name -> (UNet compute dtype, head dtype)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "bf16_head_cpu.json")
    args = parser.parse_args()
    config = load_config(ROOT / "configs" / "sd21_base.py")
    unet_config = UNetConfig.from_diffusers(config.unet.to_dict())
    vae = AutoencoderKL(VAEConfig.from_diffusers(config.vae.to_dict()), rngs=NumpyRngs(2))
    weights = nnx.state(UNet2DCondition(unet_config, rngs=NumpyRngs(1)))
    schedule = DDPMSchedule.from_config(config.scheduler.to_dict())
    image = jnp.asarray(colour_card(args.size)[None])
    context = jnp.asarray(np.random.default_rng(0).standard_normal((1, 77, unet_config.cross_attention_dim)),
                          jnp.float32)
    z = jax.jit(lambda v, x: v.encode(x).mode() * v.config.scaling_factor)(vae, image)
    t = jnp.full((1,), 999)
    decode = jax.jit(lambda v, x0: v.decode(x0 / v.config.scaling_factor))

    outputs = {}
    for name, (dtype, head) in HEADS.items():
        graphdef = nnx.graphdef(nnx.eval_shape(lambda: UNet2DCondition(unet_config, dtype=dtype, output_dtype=head,
                                                                       rngs=FixedKeyRngs())))
        step = jax.jit(lambda state, z: schedule.eps_to_x0(
            z, nnx.merge(graphdef, state)(z, t, context).astype(jnp.float32), t))
        start = time.perf_counter()
        x0 = step(weights, z)
        outputs[name] = (np.asarray(x0, np.float64), np.asarray(decode(vae, x0), np.float64))
        print(f"{name}: {time.perf_counter() - start:.0f} s (with compile)", flush=True)

    truth_x0, truth_image = outputs["float32"]
    rows = {}
    for name, (x0, decoded) in outputs.items():
        if name == "float32":
            continue
        rows[name] = {"x0_max_abs": float(np.abs(x0 - truth_x0).max()),
                      "x0_rms": float(np.sqrt(np.mean((x0 - truth_x0) ** 2))),
                      "image_max_abs": float(np.abs(decoded - truth_image).max()),
                      "image_rms": float(np.sqrt(np.mean((decoded - truth_image) ** 2)))}
        print(name, rows[name], flush=True)
    result = {"what": "one-step path (VAE float32; UNet in float32 / bfloat16 with float32 head / bfloat16 "
                      "throughout), SD 2.1-base config, random weights, errors against float32",
              "size": args.size, "x0_std": float(truth_x0.std()), "image_std": float(truth_image.std()),
              "cpu": cpu_model(), "cores": os.cpu_count(), "jax": jax.__version__, "errors": rows}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
