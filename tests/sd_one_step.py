"""SD's one-step path, the computation DOD reduces to at initialisation (no adapter selected,
DEMs off): VAE encode (posterior mode), one UNet step at t = 999, x0 from eps, VAE decode.
Written here from the pipeline's parts, apart from dod_jax.methods.dod, for the tests and benches that
hold DOD or a bfloat16 UNet against it; and a deterministic colour card to run it on."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dod_jax.weights.diffusers import SDPipeline


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


def colour_card(size: int) -> np.ndarray:
    """A deterministic colour card in [-1, 1]: gradients, rings and bars."""
    y, x = np.mgrid[0:size, 0:size] / (size - 1)
    r = np.hypot(x - 0.5, y - 0.5)
    red = x
    green = 0.5 + 0.5 * np.cos(40 * r)
    blue = np.where((x * 8).astype(int) % 2 == 0, y, 1 - y)
    return np.stack([red, green, blue], -1).astype(np.float32) * 2 - 1
