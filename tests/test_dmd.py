"""DMD against an independent NumPy computation of REFERENCE.md's formula, the guided real
score and the fake score against separate UNet calls, and where gradients go."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import ROOT, tiny_config
from dod_jax import adapters
from dod_jax.configs import load_config
from dod_jax.errors import ConfigError
from dod_jax.methods.dod.dmd import (dmd_loss, dmd_loss_from_predictions, draw_timesteps_and_noise, fake_score_loss,
                                     score_predictions)
from dod_jax.training.plan import abstract_stage
from dod_jax.models.layers import NumpyRngs
from dod_jax.models.unet import UNet2DCondition, UNetConfig
from dod_jax.schedule import DDPMSchedule


def test_dmd_gradient_is_the_normalised_score_difference():
    rng = np.random.default_rng(0)
    z, x0_real, x0_fake = (rng.standard_normal((3, 4, 5, 4)) for _ in range(3))
    loss, grad = jax.value_and_grad(dmd_loss_from_predictions)(*(jnp.asarray(a, jnp.float32) for a in (z, x0_real, x0_fake)))
    weight = np.abs(z - x0_real).mean(axis=(1, 2, 3), keepdims=True)
    expected = (x0_fake - x0_real) / weight
    np.testing.assert_allclose(np.asarray(grad), 2 * expected / z.size, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(float(loss), np.mean(expected ** 2), rtol=1e-5)


def tiny_unet_with_fake_lora():
    unet = UNet2DCondition(UNetConfig.from_diffusers(tiny_config().unet.to_dict()), rngs=NumpyRngs(0))
    adapters.inject(unet, adapters.AdapterSpec("fake", ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2")),
                    NumpyRngs(1))
    rng = np.random.default_rng(2)
    for _, _, lora in adapters.adapted(unet, "fake"):
        b = lora.lora_B.kernel
        b.set_value(jnp.asarray(rng.standard_normal(b.shape) * 0.05, jnp.float32))
    return unet


def test_score_predictions_follow_cfg_and_the_fake_set():
    unet = tiny_unet_with_fake_lora()
    schedule = DDPMSchedule.create()
    rng = np.random.default_rng(3)
    z = jnp.asarray(rng.standard_normal((2, 8, 8, 4)), jnp.float32)
    noise = jnp.asarray(rng.standard_normal((2, 8, 8, 4)), jnp.float32)
    prompt, negative = (jnp.asarray(rng.standard_normal((2, 5, 64)), jnp.float32) for _ in range(2))
    t = jnp.array([500, 900])
    graphdef, state = nnx.split(unet)

    @jax.jit
    def run(state):
        m = nnx.merge(graphdef, state)
        preds = score_predictions(m, schedule, z, t, noise, prompt, negative, fake_set="fake", guidance=7.5)
        z_t = schedule.add_noise(z, noise, t)
        separate = m(z_t, t, prompt), m(z_t, t, negative)
        with adapters.select("fake"):
            fake = m(z_t, t, prompt)
        return preds, separate, fake, z_t

    (x0_real, x0_fake), (eps_text, eps_negative), eps_fake, z_t = jax.tree.map(np.asarray, run(state))
    abar = np.asarray(schedule.alphas_cumprod, np.float64)[np.array([500, 900])][:, None, None, None]
    x0 = lambda eps: (z_t - np.sqrt(1 - abar) * eps) / np.sqrt(abar)
    np.testing.assert_allclose(x0_real, x0(eps_negative + 7.5 * (eps_text - eps_negative)), atol=2e-4)
    np.testing.assert_allclose(x0_fake, x0(eps_fake), atol=2e-5)
    assert np.abs(eps_fake - eps_text).max() > 1e-3  # the fake LoRA is in the fake score


def test_dmd_trains_the_generator_latent_only_and_the_fake_loss_trains_the_fake_lora():
    unet = tiny_unet_with_fake_lora()
    schedule = DDPMSchedule.create()
    rng = np.random.default_rng(4)
    z = jnp.asarray(rng.standard_normal((2, 8, 8, 4)), jnp.float32)
    prompt, negative = (jnp.asarray(rng.standard_normal((2, 5, 64)), jnp.float32) for _ in range(2))
    graphdef, params, rest = nnx.split(unet, nnx.Param, ...)
    key = jax.random.split(jax.random.key(0), 2)  # one key per sample

    t_fake, noise_fake = draw_timesteps_and_noise(key, z.shape, 0, 999)  # the fake score's t range
    abar = np.asarray(schedule.alphas_cumprod, np.float64)[np.asarray(t_fake)][:, None, None, None]
    z_t = np.sqrt(abar) * np.asarray(z, np.float64) + np.sqrt(1 - abar) * np.asarray(noise_fake, np.float64)

    @jax.jit
    def grads(params, z):
        dmd = jax.grad(lambda p, z: dmd_loss(nnx.merge(graphdef, p, rest), schedule, z, key, prompt, negative,
                                             fake_set="fake"), argnums=(0, 1))(params, z)
        fake_loss, fake = jax.value_and_grad(lambda p: fake_score_loss(nnx.merge(graphdef, p, rest), schedule, z,
                                                                       key, prompt, fake_set="fake"))(params)
        # the same draws and predictions, taken apart from the losses
        unet = nnx.merge(graphdef, params, rest)
        t, noise = draw_timesteps_and_noise(key, z.shape, 20, 979)  # DMD's t range
        predictions = score_predictions(unet, schedule, z, t, noise, prompt, negative, fake_set="fake")
        with adapters.select("fake"):
            eps_fake = unet(jnp.asarray(z_t, jnp.float32), t_fake, prompt)
        return dmd, (fake_loss, fake), predictions, eps_fake

    (dmd_params, dmd_z), (fake_loss, fake_params), (x0_real, x0_fake), eps_fake = grads(params, z)
    # dL_dmd/dz points from the fake score's x0 to the real one's: 2 (x0_fake - x0_real) /
    # mean|z - x0_real| / N (swapping the two predictions flips it)
    z64, real, fake = (np.asarray(a, np.float64) for a in (z, x0_real, x0_fake))
    weight = np.abs(z64 - real).mean(axis=(1, 2, 3), keepdims=True)
    np.testing.assert_allclose(np.asarray(dmd_z), 2 * (fake - real) / weight / z64.size, rtol=1e-4,
                               atol=1e-4 * np.abs(dmd_z).max())
    # the fake score's loss: epsilon-MSE at t ~ U{0..999} on z_t formed here in float64
    expected = np.mean((np.asarray(eps_fake, np.float64) - np.asarray(noise_fake, np.float64)) ** 2)
    np.testing.assert_allclose(float(fake_loss), expected, rtol=1e-5)
    assert all(float(jnp.abs(g[...]).max()) == 0 for g in jax.tree.leaves(dmd_params))
    flat = dict(nnx.to_flat_state(fake_params))
    fake_b = [g for p, g in flat.items() if "fake" in p and "lora_B" in p]
    assert fake_b and all(float(jnp.abs(g[...]).max()) > 0 for g in fake_b)


def test_draws_follow_each_samples_key_so_batch_splits_do_not_change_them():
    keys = jax.random.split(jax.random.key(3), 6)
    t, noise = draw_timesteps_and_noise(keys, (6, 4, 4, 4), 20, 979)
    t_part, noise_part = draw_timesteps_and_noise(keys[4:], (2, 4, 4, 4), 20, 979)
    np.testing.assert_array_equal(t[4:], t_part)
    np.testing.assert_array_equal(noise[4:], noise_part)
    assert int(t.min()) >= 20 and int(t.max()) <= 979 and len(set(np.asarray(t).tolist())) > 1
    with pytest.raises(ValueError, match="one PRNG key per sample"):
        draw_timesteps_and_noise(jax.random.key(0), (6, 4, 4, 4), 20, 979)


def test_the_real_score_computes_in_bfloat16_when_asked_and_nothing_else_does():
    """train.real_score_dtype: the real score's UNet pass computes in bfloat16 (its convolutions
    and matmuls take bfloat16 operands), the fake score stays float32 and gives exactly what it
    gives without the switch, and the real prediction stays within bfloat16's rounding of the
    float32 one. The switch reaches the step from the config."""
    unet = tiny_unet_with_fake_lora()
    schedule = DDPMSchedule.create()
    rng = np.random.default_rng(4)
    z, noise = (jnp.asarray(rng.standard_normal((2, 8, 8, 4)), jnp.float32) for _ in range(2))
    prompt, negative = (jnp.asarray(rng.standard_normal((2, 5, 64)), jnp.float32) for _ in range(2))
    t = jnp.array([300, 700])
    graphdef, state = nnx.split(unet)

    def predict(state, real_dtype):
        return score_predictions(nnx.merge(graphdef, state), schedule, z, t, noise, prompt, negative,
                                 fake_set="fake", real_dtype=real_dtype)

    (real32, fake32), (real16, fake16) = (jax.tree.map(np.asarray, jax.jit(predict, static_argnums=1)(state, d))
                                          for d in (None, jnp.bfloat16))
    np.testing.assert_array_equal(fake16, fake32)
    assert 0 < np.abs(real16 - real32).max() < 0.05 * np.abs(real32).max()
    products = lambda d: set(re.findall(r":(\w+)\[[\d,]*\] = (?:dot_general|conv_general_dilated)\[",
                                        str(jax.make_jaxpr(predict, static_argnums=1)(state, d))))
    assert products(None) == {"f32"} and products(jnp.bfloat16) == {"f32", "bf16"}


def test_the_real_score_dtype_reaches_the_stage_1_step_from_the_config():
    """train.real_score_dtype 'bfloat16': the traced stage-1 step has bfloat16 matmuls and
    convolutions (the real score's), None has none; an unknown name is refused."""
    config = load_config(ROOT / "configs" / "micro.py")
    config.train.stage = "stage1"
    products = {}
    for name in (None, "bfloat16"):
        config.train.real_score_dtype = name
        steps, state, frozen = abstract_stage(config)
        batch = {k: jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32) for k in ("lq", "gt")}
        products[name] = set(re.findall(r":(\w+)\[[\d,]*\] = (?:dot_general|conv_general_dilated)\[",
                                        str(jax.make_jaxpr(steps.train_step)(state, frozen, batch))))
    assert "bf16" not in products[None] and "bf16" in products["bfloat16"]
    config.train.real_score_dtype = "float8"
    with pytest.raises(ConfigError, match="train.real_score_dtype"):
        abstract_stage(config)
