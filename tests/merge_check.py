"""Merged against unmerged CLoRA on a DOD whose UNet has SD 2.1's widths (320, 640, 1280) on the
tiny config otherwise, with B and M_theta moved off their initialisation (so every image gets its
own gamma and beta, and the fold is not plain LoRA's).

At 64-pixel images the 320-wide level attends over 64 tokens; at 256 pixels the 640-wide level
over 256 and the 1280-wide mid block over 64: the shapes at which the opt-in YNNPACK dot fusion
computes `x @ (A @ B)` wrongly (dod_jax/__init__.py). Per image, the restoration (encoder LoRA,
UNet CLoRA in its Linear and Conv2d layers, trained conv_in, decoder with DEMs) is compared two
ways:

    unmerged       the adapter branches, a batch of images in one call
    merged         dod_jax.methods.dod.restore.merge_generator in its own compiled call, the merged
                   weights passed to the forward as inputs (what dod-jax does)

(The fold and the forward in one compiled call, what dod-jax did, was 0.87 / 0.43 off at 64 /
256 pixels under the opt-in; test_xla_options.py checks that pattern layer by layer in the
suite's process.)

`python tests/merge_check.py OUT.npz` prints the relative errors as JSON and saves the unmerged
restorations, so that the suite can run the check in a process with other XLA options and hold
its restorations against the default process's (tests/test_xla_options.py).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dod_jax import adapters
from dod_jax.configs import load_config
from dod_jax.methods.dod import GENERATOR, build_dod, random_base
from dod_jax.methods.dod.restore import merge_generator

ROOT = Path(__file__).resolve().parent.parent
SIZES = (64, 256)  # pixels; the latents are 1/8 of that


def randomise_generator_b(model, seed=1, scale=0.05):
    """B is zero at init, which hides every adapter path; give it values as training would."""
    rng = np.random.default_rng(seed)
    for sub in (model.unet, model.vae):
        for lora in loras(sub, GENERATOR):
            b = lora.lora_B.kernel
            b.set_value(jnp.asarray(rng.standard_normal(b.shape) * scale, jnp.float32))
    for _, _, adapter in adapters.adapted(model.unet, GENERATOR):
        if isinstance(adapter, adapters.TrainedCopy):  # the trained conv_in, moved off the base
            k = adapter.copy.kernel
            k.set_value(k[...] + jnp.asarray(rng.standard_normal(k.shape) * scale, jnp.float32))


def randomise_mtheta(model, seed=1):
    """M_theta's weights random at unit fan-in scale: at the authors' initialisation (x 1e-5) every
    image gets gamma = 1, beta = 0 to within 1e-10, and CLoRA is plain LoRA."""
    rng = np.random.default_rng(seed)
    for _, param in nnx.to_flat_state(nnx.state(model.modulator, nnx.Param)):
        value = param[...]
        fan_in = value.shape[0] if value.ndim == 2 else 1
        param.set_value(jnp.asarray(rng.standard_normal(value.shape) / np.sqrt(fan_in), jnp.float32))


def loras(model, name):
    """The (C)LoRA branches of adapter set `name` (the set also holds the trained copy of conv_in)."""
    return [a for _, _, a in adapters.adapted(model, name) if isinstance(a, adapters.LoRA)]


def widened_dod():
    """The tiny DOD with a UNet of SD 2.1-base's widths (one layer per block, 64-dim heads), random
    base weights, the generator's B, the trained conv_in and M_theta off their inits."""
    config = load_config(ROOT / "configs" / "tiny.py")
    config.unet.update({"block_out_channels": [320, 640, 1280], "attention_head_dim": [5, 10, 20],
                        "layers_per_block": 1})
    config.dod.latent = "mode"
    model = build_dod(config, random_base(config, seed=0), seed=0)
    randomise_generator_b(model)
    randomise_mtheta(model)
    return model


def two_images(size: int) -> np.ndarray:
    """Two unlike images (uniform noise; a smooth colour ramp), so M_theta modulates them apart."""
    rng = np.random.default_rng(size)
    ramp = np.linspace(-0.8, 0.8, size)
    smooth = np.stack([ramp[:, None] + 0 * ramp, 0 * ramp[:, None] + ramp, np.outer(ramp, ramp)], axis=-1)
    return np.stack([rng.uniform(-1, 1, (size, size, 3)), smooth + rng.normal(0, 0.02, smooth.shape)])


def restorations(model) -> tuple[dict, dict]:
    """({size: {"merged": e, "film_spread": s}}, {size: unmerged images}): the largest relative
    error of the merged restoration against the unmerged one over two images, how far apart the
    two images' modulations are (max abs difference of M_theta's outputs), and the unmerged
    restorations themselves."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def unmerged(state, lq):
        m = nnx.merge(graphdef, state)
        film = m.film(lq)
        return m.restore(lq, film), film

    merged = jax.jit(lambda g, s, lq: nnx.merge(g, s).restore(lq, None), static_argnums=0)

    errors, images = {}, {}
    for size in SIZES:
        lq = jnp.asarray(two_images(size), jnp.float32)
        want, film = (np.asarray(a, np.float64) for a in unmerged(state, lq))
        scale = np.abs(want).max()
        found = 0.0
        for i in range(2):
            image = lq[i:i + 1]
            restored = merged(*merge_generator(graphdef, state, image), image)
            found = max(found, float(np.abs(np.asarray(restored[0], np.float64) - want[i]).max() / scale))
        errors[size] = {"merged": found, "film_spread": float(np.abs(film[:, 0] - film[:, 1]).max())}
        images[size] = want
    return errors, images


if __name__ == "__main__":
    # python tests/merge_check.py OUT.npz: the errors as JSON on stdout, the unmerged restorations in OUT.npz
    found, restored = restorations(widened_dod())
    np.savez(sys.argv[1], **{str(size): images for size, images in restored.items()})
    print(json.dumps(found))
