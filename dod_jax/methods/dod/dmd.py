"""Distribution matching (DMD, as in OSEDiff) and the fake score's diffusion loss.

For the generator's latent z (scaled, as the UNet sees it):
    t ~ U{t_min..t_max},  z_t = sqrt(abar_t) z + sqrt(1 - abar_t) noise
    x0_real = x0 of the frozen base UNet with classifier-free guidance g between the negative
              and the positive prompt embedding
    x0_fake = x0 of the base UNet with the fake score's LoRA set, positive prompt
    grad    = (x0_fake - x0_real) / mean(|z - x0_real|)       (mean per sample over C, H, W)
    L_dmd   = MSE(z, stopgrad(z - grad))
so dL/dz = 2 grad / N. Everything here is float32 whatever the UNet's compute dtype; the score
networks get no gradient from this loss (their outputs are stopped). `keys` hold one PRNG key per
sample: sample i's t and noise follow from keys[i] alone, so a batch split into micro-batches
or over devices draws the same values.

The fake score learns with the plain epsilon-MSE on the detached generator latent:
    L_fake = MSE(eps_fake(z_t, t), noise),  t ~ U{0..999}.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dod_jax import adapters
from dod_jax.models.layers import computing_in, is_key_batch, normal_per_sample
from dod_jax.schedule import DDPMSchedule

T_MIN, T_MAX = 20, 979  # inclusive: the authors' randint(20, 980)
GUIDANCE = 7.5


def dmd_gradient(z, x0_real, x0_fake):
    """(x0_fake - x0_real) / mean(|z - x0_real|) per sample, float32."""
    z, x0_real, x0_fake = (a.astype(jnp.float32) for a in (z, x0_real, x0_fake))
    weight = jnp.mean(jnp.abs(z - x0_real), axis=tuple(range(1, z.ndim)), keepdims=True)
    return (x0_fake - x0_real) / weight


def dmd_loss_from_predictions(z, x0_real, x0_fake):
    grad = jax.lax.stop_gradient(dmd_gradient(z, x0_real, x0_fake))
    z = z.astype(jnp.float32)
    return jnp.mean((z - jax.lax.stop_gradient(z - grad)) ** 2)


def score_predictions(unet, schedule: DDPMSchedule, z, t, noise, prompt, negative_prompt, *,
                      fake_set: str, guidance: float = GUIDANCE, real_dtype=None):
    """(x0_real, x0_fake) at z_t = add_noise(z, noise, t), both stopped and float32. `prompt` and
    `negative_prompt` are (B, T, D) embeddings. `real_dtype`: what the real score computes in
    (None: the UNet's own dtype)."""
    z_t = schedule.add_noise(z.astype(jnp.float32), noise, t)
    with adapters.select(None), computing_in(real_dtype):
        eps = unet(jnp.concatenate([z_t, z_t]), jnp.concatenate([t, t]),
                   jnp.concatenate([prompt, negative_prompt])).astype(jnp.float32)
    eps_text, eps_negative = jnp.split(eps, 2)
    eps_real = eps_negative + guidance * (eps_text - eps_negative)
    with adapters.select(fake_set):
        eps_fake = unet(z_t, t, prompt).astype(jnp.float32)
    x0_real = schedule.eps_to_x0(z_t, eps_real, t)
    x0_fake = schedule.eps_to_x0(z_t, eps_fake, t)
    return jax.lax.stop_gradient(x0_real), jax.lax.stop_gradient(x0_fake)


def draw_timesteps_and_noise(keys, shape, t_min: int, t_max: int):
    """t ~ U{t_min..t_max} (B,) and N(0, 1) noise of `shape`, from one key per sample."""
    if not is_key_batch(keys) or keys.shape[0] != shape[0]:
        raise ValueError(f"expected one PRNG key per sample ({shape[0]},), got {keys.shape} {keys.dtype}")
    t_keys, noise_keys = jax.vmap(lambda k: jax.random.split(k))(keys).T
    t = jax.vmap(lambda k: jax.random.randint(k, (), t_min, t_max + 1))(t_keys)
    return t, normal_per_sample(noise_keys, shape)


def dmd_loss(unet, schedule: DDPMSchedule, z, keys, prompt, negative_prompt, *, fake_set: str,
             guidance: float = GUIDANCE, t_min: int = T_MIN, t_max: int = T_MAX, real_dtype=None):
    """L_dmd for generator latents z (B, h, w, 4); gradients flow to z only. `real_dtype`: what
    the real score computes in (None: the UNet's own dtype)."""
    t, noise = draw_timesteps_and_noise(keys, z.shape, t_min, t_max)
    x0_real, x0_fake = score_predictions(unet, schedule, jax.lax.stop_gradient(z), t, noise, prompt, negative_prompt,
                                         fake_set=fake_set, guidance=guidance, real_dtype=real_dtype)
    return dmd_loss_from_predictions(z, x0_real, x0_fake)


def fake_score_loss(unet, schedule: DDPMSchedule, z, keys, prompt, *, fake_set: str):
    """Epsilon-MSE of the fake score on detached generator latents, t ~ U{0..999}."""
    z = jax.lax.stop_gradient(z).astype(jnp.float32)
    t, noise = draw_timesteps_and_noise(keys, z.shape, 0, schedule.num_train_timesteps - 1)
    with adapters.select(fake_set):
        eps = unet(schedule.add_noise(z, noise, t), t, prompt).astype(jnp.float32)
    return jnp.mean((eps - noise) ** 2)
