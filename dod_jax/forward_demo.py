"""Forward demo: the SD-family data path DOD is built on, end to end, with random weights.

Builds a UNet and VAE from a config (the tiny one by default), writes them as a diffusers
pipeline folder (unet/, vae/, scheduler/), loads that folder back through the strict loader,
and runs the one-step path DOD uses -- VAE encode, one UNet step at t=999, x0, VAE decode --
jitted, on a built-in test image. Writes the pipeline folder, input/output/comparison PNGs
and summary.json under --workdir. The weights are random, so the output image shows that
the path runs and keeps shapes, not a restoration.

    python -m dod_jax.forward_demo [--config configs/tiny.py] [--workdir runs/forward_demo]
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx
from ml_collections import config_flags
from PIL import Image

from dod_jax.image_ops import to_uint8
from dod_jax.models.layers import NumpyRngs
from dod_jax.models.unet import UNet2DCondition, UNetConfig
from dod_jax.models.vae import AutoencoderKL, VAEConfig
from dod_jax.schedule import DDPMSchedule
from dod_jax.weights.diffusers import SDPipeline, load_pipeline, save_pipeline

ROOT = Path(__file__).resolve().parent.parent
config_flags.DEFINE_config_file("config", str(ROOT / "configs" / "tiny.py"), "model config file")
flags.DEFINE_string("workdir", "runs/forward_demo", "where the pipeline folder and images are written")
flags.DEFINE_integer("seed", 0, "seed of the random weights and prompt embedding")


def test_image(size: int) -> np.ndarray:
    """A deterministic colour test card in [-1, 1]: gradients, rings and bars."""
    y, x = np.mgrid[0:size, 0:size] / (size - 1)
    r = np.hypot(x - 0.5, y - 0.5)
    red = x
    green = 0.5 + 0.5 * np.cos(40 * r)
    blue = np.where((x * 8).astype(int) % 2 == 0, y, 1 - y)
    return np.stack([red, green, blue], -1).astype(np.float32) * 2 - 1


def param_count(model: nnx.Module) -> int:
    return sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))


def one_step(pipeline: SDPipeline):
    """(run, state): jitted run(state, image (B,H,W,3) in [-1,1], prompt embedding (B,T,D))
    -> decoded x0 after one UNet step, float32."""
    graphdef, state = nnx.split((pipeline.unet, pipeline.vae))
    schedule = pipeline.schedule
    sf = pipeline.vae.config.scaling_factor

    @jax.jit
    def run(state, image, context):
        unet, vae = nnx.merge(graphdef, state)
        z = vae.encode(image).mode() * sf
        t = jnp.full((image.shape[0],), schedule.num_train_timesteps - 1)
        x0 = schedule.eps_to_x0(z, unet(z, t, context).astype(jnp.float32), t)
        return vae.decode(x0 / sf).astype(jnp.float32)

    return run, state


def main(argv):
    del argv
    config, workdir, seed = flags.FLAGS.config, Path(flags.FLAGS.workdir), flags.FLAGS.seed
    workdir.mkdir(parents=True, exist_ok=True)
    timings = {}

    print("[1/4] building a random UNet and VAE from the config", flush=True)
    t0 = time.perf_counter()
    rngs = NumpyRngs(seed)  # host-side init: eager jax.random would compile per parameter shape
    unet = UNet2DCondition(UNetConfig.from_diffusers(config.unet.to_dict()), rngs=rngs)
    vae = AutoencoderKL(VAEConfig.from_diffusers(config.vae.to_dict()), rngs=rngs)
    timings["build_s"] = time.perf_counter() - t0

    print(f"[2/4] writing and re-loading the diffusers pipeline folder {workdir / 'pipeline'}", flush=True)
    t0 = time.perf_counter()
    save_pipeline(SDPipeline(unet, vae, DDPMSchedule.from_config(config.scheduler.to_dict())), workdir / "pipeline",
                  config.scheduler.to_dict())
    pipeline = load_pipeline(workdir / "pipeline")
    timings["save_and_load_s"] = time.perf_counter() - t0

    print("[3/4] one-step forward: encode -> UNet(t=999) -> x0 -> decode (jitted)", flush=True)
    image = test_image(config.image_size)[None]
    context = jax.random.normal(jax.random.key(seed), (1, config.prompt_length, config.unet.cross_attention_dim))
    forward, state = one_step(pipeline)
    t0 = time.perf_counter()
    output = np.asarray(forward(state, image, context))
    timings["first_call_with_compile_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    output = np.asarray(forward(state, image, context))
    timings["forward_s"] = time.perf_counter() - t0

    print(f"[4/4] writing images and summary to {workdir}", flush=True)
    Image.fromarray(to_uint8(image[0])).save(workdir / "input.png")
    Image.fromarray(to_uint8(output[0])).save(workdir / "output.png")
    Image.fromarray(np.concatenate([to_uint8(image[0]), to_uint8(output[0])], axis=1)).save(
        workdir / "comparison.png")
    summary = {
        "config": {"unet": config.unet.to_dict(), "vae": config.vae.to_dict()},
        "parameters": {"unet": param_count(pipeline.unet), "vae": param_count(pipeline.vae)},
        "image_shape": list(image.shape), "output_shape": list(output.shape),
        "output_finite": bool(np.isfinite(output).all()),
        "timings": timings, "device": str(jax.devices()[0]),
        "note": "random weights: the output shows the data path, not a restoration",
    }
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: summary[k] for k in ("parameters", "output_shape", "output_finite", "timings")}, indent=2))
    if not summary["output_finite"]:
        raise SystemExit("the forward pass produced non-finite values")


if __name__ == "__main__":
    app.run(main)
