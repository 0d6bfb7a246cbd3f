"""Pretraining a small SD-family base on the built-in demo photos: the main job's frozen base.

    python -m dod_jax.methods.dod.pretrain_base --config configs/demo.py --out DIR [--compare SHIPPED]

No Stable Diffusion weights can be downloaded here, and DOD on a random base makes photos
worse. So the demo's base is pretrained by this module, on the training photos of the
built-in demo set (dod_jax.data.demo), in the config's `vae` / `unet` / `adm` shapes and by its
`pretrain` recipe (configs/demo.py documents it):

1. the VAE (AutoencoderKL) as an autoencoder on LQ and GT crops: the recipe's weighted L1,
   MSE, LPIPS-VGG and KL;
2. its scaling factor, 1 / std of the posterior samples of training crops (SD's 0.18215 was
   found the same way for its VAE), written into its config.json;
3. the UNet (UNet2DConditionModel) as an epsilon-prediction denoiser on the frozen VAE's
   scaled latents, t ~ U{0..999}, the prompt embedding on GT latents and the negative prompt
   on LQ latents (so that DMD's guided real score points from degraded towards clean);
4. the ADM encoder stays at its random initialisation (the demo's MFM: mean-pooled random
   convolutional features already tell the degradations apart; README "The demo's base"
   gives the measurement), and the prompt embeddings are fixed random arrays (no text encoder
   exists offline).

DIR receives sd/ (unet/, vae/, scheduler/ in diffusers' layout), adm.safetensors and
prompts.safetensors (the files dod_jax.methods.dod.build.load_base reads), and manifest.json: the
recipe, the losses, the VAE's PSNR and LPIPS on the held-out demo photos, and every file's size and
sha256. The folder is written whole or not at all. Every random draw follows the seed and the
step, so a run on the same machine kind and jax version writes the same bytes; `--compare`
checks the written files against another base folder's manifest (the shipped one by default).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import platform
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from dod_jax.configs import load_config
from dod_jax.data import layouts
from dod_jax.data.demo import TEST_PHOTOS, demo_photos, write_demo_set
from dod_jax.data.pipeline import TrainBatches, parse_ratio, sources_from_pairs
from dod_jax.methods.dod.build import base_networks
from dod_jax.methods.dod.prompts import save_prompt_embeddings
from dod_jax.errors import ConfigError, reported
from dod_jax.losses.metrics import psnr
from dod_jax.files import atomic_folder, atomic_write, sha256
from dod_jax.machine import cpu_model
from dod_jax.image_ops import to_uint8
from dod_jax.losses.lpips import load_lpips
from dod_jax.models.layers import NumpyRngs
from dod_jax.schedule import DDPMSchedule
from dod_jax.optim import learning_rate, optimizer
from dod_jax.weights.adm import save_adm
from dod_jax.weights.diffusers import SDPipeline, save_pipeline

MANIFEST = "manifest.json"
SHIPPED = Path(__file__).resolve().parents[2] / "assets" / "demo_base"  # dod_jax/assets/demo_base


def demo_batches(root: Path, recipe, crop: int, units: int) -> TrainBatches:
    ratio = parse_ratio(recipe.ratio, "pretrain.ratio")
    pairs = layouts.checked_pairs(root, "aio5", "train", tuple(ratio))
    return TrainBatches(sources_from_pairs(pairs), ratio, crop=crop, units=units, seed=recipe.seed)


def adamw(recipe, lr: float, steps: int):
    schedule = learning_rate(lr, steps, "cosine", recipe.warmup, recipe.final_lr_fraction)
    return optimizer(schedule, recipe.weight_decay, recipe.clip)


def kl_divergence(posterior) -> jax.Array:
    """KL(q(z|x) || N(0, I)) per latent position, summed over channels, averaged."""
    terms = posterior.mean ** 2 + jnp.exp(posterior.logvar) - 1.0 - posterior.logvar
    return 0.5 * jnp.mean(jnp.sum(terms, axis=-1))


def side_by_side(crops: jax.Array, width: int = 128) -> jax.Array:
    """Crops narrower than `width` joined side by side into strips about that wide, in order.
    LPIPS-VGG of 32 crops of 32 pixels took 3.8 s forward and backward on XLA:CPU, and 0.6 s as
    8 strips of 32 x 128 (the same pixels); the strips' scores are the crops' except for VGG's
    receptive fields reaching across a seam into the neighbouring crop."""
    n, h, w, c = crops.shape
    k = max(1, width // w)
    while n % k:
        k -= 1
    return crops.reshape(n // k, k, h, w, c).swapaxes(1, 2).reshape(n // k, h, k * w, c)


def vae_step(vae, optimizer, lpips, images, key, weights: tuple[tuple[str, float], ...]):
    """One AdamW step on the weighted sum of the terms named in `weights` (l1, mse, lpips, kl;
    `vae_terms` leaves out those weighted 0, so an L1/MSE-only step skips VGG's passes, half
    a step); `lpips` is the LPIPS network, used when `weights` names it. Updates `vae` and
    `optimizer`; returns the terms and the loss."""
    (graphdef, state), (lpips_graphdef, lpips_state) = nnx.split((vae, optimizer)), nnx.split(lpips)
    state, terms = _vae_update(graphdef, lpips_graphdef, weights, state, lpips_state, images, key)
    nnx.update((vae, optimizer), state)
    return terms


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _vae_update(graphdef, lpips_graphdef, weights, state, lpips_state, images, key):
    vae, optimizer = nnx.merge(graphdef, state)
    lpips = nnx.merge(lpips_graphdef, lpips_state)

    def loss_fn(vae):
        posterior = vae.encode(images)
        restored = vae.decode(posterior.sample(key)).astype(jnp.float32)
        term = {"l1": lambda: jnp.mean(jnp.abs(restored - images)),
                "mse": lambda: jnp.mean((restored - images) ** 2),
                "lpips": lambda: lpips(side_by_side(restored), side_by_side(images)).mean(),
                "kl": lambda: kl_divergence(posterior)}
        terms = {name: term[name]() for name, _ in weights}
        return sum(w * terms[name] for name, w in weights), terms

    (loss, terms), grads = nnx.value_and_grad(loss_fn, has_aux=True)(vae)
    optimizer.update(vae, grads)
    return nnx.state((vae, optimizer)), dict(terms, loss=loss)


def vae_terms(recipe) -> tuple[tuple[str, float], ...]:
    """The recipe's VAE loss weights with nonzero weight, as vae_step takes them."""
    return tuple((name, float(recipe[name])) for name in ("l1", "mse", "lpips", "kl") if recipe[name])


def unet_step(unet, optimizer, vae, schedule, images, context, key, scaling_factor):
    """One AdamW step of the UNet's epsilon loss on the VAE's latents of `images`; updates
    `unet` and `optimizer`, returns the loss."""
    (graphdef, state), (vae_graphdef, vae_state) = nnx.split((unet, optimizer)), nnx.split(vae)
    state, metrics = _unet_update(graphdef, vae_graphdef, schedule, state, vae_state, images, context, key,
                                  scaling_factor)
    nnx.update((unet, optimizer), state)
    return metrics


@functools.partial(jax.jit, static_argnums=(0, 1))
def _unet_update(graphdef, vae_graphdef, schedule, state, vae_state, images, context, key, scaling_factor):
    unet, optimizer = nnx.merge(graphdef, state)
    vae = nnx.merge(vae_graphdef, vae_state)
    k_latent, k_t, k_noise = jax.random.split(key, 3)
    z = jax.lax.stop_gradient(vae.encode(images).sample(k_latent)) * scaling_factor
    t = jax.random.randint(k_t, (z.shape[0],), 0, schedule.num_train_timesteps)
    noise = jax.random.normal(k_noise, z.shape, z.dtype)
    noisy = schedule.add_noise(z, noise, t)

    def loss_fn(unet):
        return jnp.mean((unet(noisy, t, context).astype(jnp.float32) - noise) ** 2)

    loss, grads = nnx.value_and_grad(loss_fn)(unet)
    optimizer.update(unet, grads)
    return nnx.state((unet, optimizer)), {"loss": loss}


@functools.partial(jax.jit, static_argnums=(0, 1))
def _on_vae(fn, graphdef, state, *args):
    """fn(the VAE of (graphdef, state), *args), compiled once per fn and VAE structure."""
    return fn(nnx.merge(graphdef, state), *args)


def _posterior_sample(vae, images, key):
    return vae.encode(images).sample(key)


def _reconstruction(vae, images):
    return vae.decode(vae.encode(images).mode()).astype(jnp.float32)


def train(name: str, steps: int, step_fn, batches: TrainBatches, seed: int) -> list[dict]:
    """Run `step_fn(batch, key)` for `steps` steps with progress; returns the logged losses."""
    log, iterator = [], batches.iterator(steps)
    progress = tqdm(range(steps), desc=f"{name} [compiling]", dynamic_ncols=True)
    for step in progress:
        values = step_fn(next(iterator), jax.random.fold_in(jax.random.key(seed), step))
        if step == 0:
            jax.block_until_ready(values)
            progress.set_description(name)
        if (step + 1) % 50 == 0 or step + 1 == steps:
            values = {k: float(v) for k, v in jax.device_get(values).items()}
            log.append(dict(step=step + 1, **values))
            progress.set_postfix({k: f"{v:.4g}" for k, v in values.items()})
    return log


def scaling_factor(vae, batches: TrainBatches, seed: int, batches_used: int = 16) -> float:
    """1 / std of the posterior samples of training crops (LQ and GT), to 5 significant digits."""
    graphdef, state = nnx.split(vae)
    samples = [np.asarray(_on_vae(_posterior_sample, graphdef, state, np.concatenate([b["lq"], b["gt"]]),
                                  jax.random.fold_in(jax.random.key(seed + 1), i)))
               for i, b in ((i, batches.batch(i)) for i in range(batches_used))]
    return float(f"{1.0 / float(np.std(np.concatenate(samples))):.5g}")


def held_out_reconstruction(vae, lpips, crop: int) -> dict[str, dict[str, float]]:
    """The VAE's reconstruction PSNR (8-bit RGB) and LPIPS-VGG on each held-out demo photo, cut
    into crops of the training size that are each encoded and decoded on their own."""
    out, (graphdef, state) = {}, nnx.split(vae)
    for name, photo in demo_photos().items():
        if name not in TEST_PHOTOS:
            continue
        h, w = (s // crop * crop for s in photo.shape[:2])
        crops = photo[:h, :w].reshape(h // crop, crop, w // crop, crop, 3).swapaxes(1, 2).reshape(-1, crop, crop, 3)
        inputs = jnp.asarray(crops.astype(np.float32) / 127.5 - 1.0)
        restored = to_uint8(np.asarray(_on_vae(_reconstruction, graphdef, state, inputs)))
        stacked = lambda images: images.reshape(-1, crop, 3).astype(np.float32) / 255.0  # all crops as one image
        perceptual = lpips(jnp.asarray(restored / 127.5 - 1.0), jnp.asarray(crops / 127.5 - 1.0))
        out[name] = {"psnr": round(psnr(stacked(restored), stacked(crops)), 4),
                     "lpips": round(float(jnp.mean(perceptual)), 4)}
    return out


def file_table(folder: Path) -> dict[str, dict]:
    return {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": sha256(p)}
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}


def pretrain(config, out: Path) -> dict:
    """Pretrain the base of `config` by `config.pretrain` and write it to `out` (a new folder)."""
    recipe = config.pretrain
    if out.exists():
        raise ConfigError(f"{out} exists; write the base to a new folder")
    started = time.time()
    unet, vae, adm = base_networks(config, NumpyRngs(recipe.seed), jnp.float32)
    schedule_config = config.scheduler.to_dict()
    schedule = DDPMSchedule.from_config(schedule_config)
    generator = np.random.default_rng(recipe.seed)
    shape = (config.prompt_length, unet.config.cross_attention_dim)
    prompts = {k: generator.standard_normal(shape).astype(np.float32) for k in ("prompt", "negative_prompt")}
    lpips = load_lpips(config.train.lpips_weights)

    with tempfile.TemporaryDirectory(prefix="demo_photos.") as data:
        root = write_demo_set(Path(data) / "demo")
        vae_batches = demo_batches(root, recipe, recipe.vae_crop, recipe.vae_units)
        optimizer = nnx.Optimizer(vae, adamw(recipe, recipe.vae_lr, recipe.vae_steps), wrt=nnx.Param)
        weights = vae_terms(recipe)
        vae_log = train("vae", recipe.vae_steps, lambda b, key: vae_step(
            vae, optimizer, lpips, jnp.concatenate([b["lq"], b["gt"]]), key, weights), vae_batches, recipe.seed)
        vae.config = dataclasses.replace(vae.config, scaling_factor=scaling_factor(vae, vae_batches, recipe.seed))

        unet_batches = demo_batches(root, recipe, recipe.unet_crop, recipe.unet_units)
        n = unet_batches.batch_size
        context = jnp.concatenate([jnp.broadcast_to(prompts["prompt"], (n,) + shape),
                                   jnp.broadcast_to(prompts["negative_prompt"], (n,) + shape)])
        optimizer = nnx.Optimizer(unet, adamw(recipe, recipe.unet_lr, recipe.unet_steps), wrt=nnx.Param)
        unet_log = train("unet", recipe.unet_steps, lambda b, key: unet_step(
            unet, optimizer, vae, schedule, jnp.concatenate([b["gt"], b["lq"]]), context, key,
            vae.config.scaling_factor), unet_batches, recipe.seed + 2)

    manifest = {
        "what": "the demo's SD-family base, pretrained on the built-in demo photos (dod_jax.methods.dod.pretrain_base)",
        "command": "python -m dod_jax.methods.dod.pretrain_base --config configs/demo.py --out DIR",
        "recipe": recipe.to_dict(), "scaling_factor": vae.config.scaling_factor,
        "vae_held_out": held_out_reconstruction(vae, lpips, config.restore.tile), "vae_log": vae_log, "unet_log": unet_log,
        "made_with": {"jax": jax.__version__, "backend": jax.default_backend(), "machine": platform.machine(),
                      "cpu": cpu_model(), "seconds": round(time.time() - started, 1)},
    }

    def fill(folder: Path):
        save_pipeline(SDPipeline(unet, vae, schedule), folder / "sd", schedule_config)
        save_adm(adm, folder / "adm.safetensors")
        save_prompt_embeddings(folder / "prompts.safetensors", prompts["prompt"], prompts["negative_prompt"],
                               ("random embedding (no text encoder offline)",) * 2)
        manifest["files"] = file_table(folder)
        atomic_write(folder / MANIFEST, lambda p: Path(p).write_text(json.dumps(manifest, indent=2)))

    atomic_folder(out, fill)
    return manifest


def differences(written: dict, reference_folder: Path) -> list[str]:
    """The files whose size or sha256 differ from (or are absent in) another base's manifest."""
    reference = json.loads((reference_folder / MANIFEST).read_text())["files"]
    return sorted(k for k in set(written) | set(reference) if written.get(k) != reference.get(k))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="pretrain_base", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=Path(__file__).resolve().parents[2] / "configs" / "demo.py")
    parser.add_argument("--out", type=Path, required=True, help="the base folder to create")
    parser.add_argument("--compare", type=Path, default=SHIPPED,
                        help="a base folder whose manifest the written files are checked against")
    parser.add_argument("--vae-steps", type=int, help="instead of the recipe's (a quick check; not the shipped base)")
    parser.add_argument("--unet-steps", type=int, help="instead of the recipe's (a quick check; not the shipped base)")
    args = parser.parse_args(argv)
    with reported(parser.prog):
        config = load_config(args.config)
        for key in ("vae_steps", "unet_steps"):
            if getattr(args, key) is not None:
                config.pretrain[key] = getattr(args, key)
        manifest = pretrain(config, args.out)
        print(json.dumps({k: manifest[k] for k in ("scaling_factor", "vae_held_out", "made_with")}, indent=2))
        if (args.compare / MANIFEST).is_file():
            differ = differences(manifest["files"], args.compare)
            print(f"{'identical to' if not differ else 'differs from'} {args.compare}"
                  + (f": {', '.join(differ)}" if differ else ""))
            return 1 if differ else 0
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
