"""The authors' training details as switches (configs/dod.py): DMD timesteps, the fake
score's LoRA scope, the clamp before the image losses, LPIPS without a backward pass through
the ground truth, and the official initialisation of M_theta and the DEMs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ROOT
from dod_jax import adapters
from dod_jax.configs import load_config
from dod_jax.methods.dod.build import base_models, build_dod
from dod_jax.methods.dod.hde import ESRGAN_INIT_SCALE
from dod_jax.errors import ConfigError
from dod_jax.methods.dod.dmd import T_MAX, T_MIN, draw_timesteps_and_noise
from dod_jax.losses.lpips import LPIPS
from dod_jax.models.layers import NumpyRngs
from dod_jax.methods.dod.method import training_model
from dod_jax.methods.dod.steps import FAKE, Stage


def micro_config(**train):
    config = load_config(ROOT / "configs" / "micro.py")
    config.train.update(train)
    return config


def test_dmd_timesteps_are_the_authors_20_to_979():
    keys = jax.random.split(jax.random.key(0), 20_000)
    t, _ = draw_timesteps_and_noise(keys, (20_000, 1, 1, 1), T_MIN, T_MAX)
    assert (int(t.min()), int(t.max())) == (20, 979)  # their randint(20, 980)


def test_the_official_fake_scope_is_the_mid_block_and_all_is_every_target_layer():
    config = micro_config()
    assert config.train.fake_scope == "official"
    fake_layers = lambda: [p for p, _, _ in adapters.adapted(training_model(config, base_models(config)).unet, FAKE)]
    official = fake_layers()
    assert official and all(p.startswith("mid_block.") for p in official)
    config.train.fake_scope = "all"
    everywhere = fake_layers()
    assert set(official) < set(everywhere) and "conv_in" in everywhere and "conv_out" in everywhere
    assert any(p.startswith("down_blocks.") for p in everywhere) and any(p.startswith("up_blocks.") for p in everywhere)
    config.train.fake_scope = "down"
    with pytest.raises(ConfigError, match="train.fake_scope"):
        fake_layers()


def test_the_image_losses_see_the_output_clamped_to_minus_one_one():
    """With train.clamp_output (the authors' code) the stage-1 MSE is that of the clamped
    image; without it, of the raw decoder output, which this model pushes past [-1, 1]."""
    rng = np.random.default_rng(0)
    gt = rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    batch = {"lq": jnp.asarray(gt * 3.0), "gt": jnp.asarray(gt)}  # an over-range LQ gives over-range outputs
    keys = jax.random.split(jax.random.key(1), 2)
    outputs = {}
    for clamp in (True, False):
        config = micro_config(clamp_output=clamp)
        config.train.weights.update(lpips=0.0, dmd=0.0)
        model = training_model(config, base_models(config))
        stage, state, frozen = Stage.create(model, config.train)
        _, (metrics, (_, restored)) = stage.generator_loss(state.params, state.fake_params, frozen, batch, keys)
        outputs[clamp] = metrics["mse"], np.asarray(restored)
    raw = outputs[False][1]
    assert np.abs(raw).max() > 1.0
    np.testing.assert_allclose(outputs[True][1], np.clip(raw, -1, 1), atol=1e-6)
    np.testing.assert_allclose(outputs[True][0], np.mean((np.clip(raw, -1, 1) - gt) ** 2), rtol=1e-5)
    np.testing.assert_allclose(outputs[False][0], np.mean((raw - gt) ** 2), rtol=1e-5)


def test_lpips_with_a_constant_target_has_the_same_value_and_gradient_and_none_for_the_target():
    lpips = LPIPS(rngs=NumpyRngs(3))
    rng = np.random.default_rng(2)
    x, y = (jnp.asarray(rng.uniform(-1, 1, (2, 32, 32, 3)), jnp.float32) for _ in range(2))
    batched = lambda a, b: lpips(a, b).sum()
    apart = lambda a, b: lpips(a, b, constant_target=True).sum()
    np.testing.assert_allclose(apart(x, y), batched(x, y), rtol=1e-6)
    np.testing.assert_allclose(jax.grad(apart)(x, y), jax.grad(batched)(x, y), rtol=1e-4, atol=1e-9)
    assert float(jnp.abs(jax.grad(apart, argnums=1)(x, y)).max()) == 0.0
    assert float(jnp.abs(jax.grad(batched, argnums=1)(x, y)).max()) > 0.0


def test_the_official_init_is_kaiming_normal_scaled_with_zero_biases():
    """dod.init 'official': M_theta's Linears as basicsr's default_init_weights(1e-5) and the
    RRDB convs as ESRGAN's (x 0.1), biases 0; 'default' keeps PyTorch's uniform init."""
    config = load_config(ROOT / "configs" / "tiny.py")
    models = {}
    for init in ("official", "default"):
        config.dod.init = init
        models[init] = build_dod(config, base_models(config), 0)
    official = models["official"]
    for layer in (official.modulator.degradation, official.modulator.prompt_proj, official.modulator.film):
        kernel = np.asarray(layer.kernel[...])
        expected = np.sqrt(2.0 / kernel.shape[0]) * config.dod.modulator.init_scale
        assert abs(kernel.std() / expected - 1) < 0.1 and abs(kernel.mean()) < 0.1 * expected
        assert not np.asarray(layer.bias[...]).any()
    conv = official.hde.dems[0].rrdb.blocks[0].convs[0]
    kernel = np.asarray(conv.kernel[...])
    expected = np.sqrt(2.0 / np.prod(kernel.shape[:3])) * ESRGAN_INIT_SCALE
    assert abs(kernel.std() / expected - 1) < 0.1 and not np.asarray(conv.bias[...]).any()
    default = models["default"].hde.dems[0].rrdb.blocks[0].convs[0]
    assert np.asarray(default.bias[...]).any()  # PyTorch's default: uniform biases
    assert abs(np.asarray(default.kernel[...]).std() / expected - 1) > 0.5
    with pytest.raises(ConfigError, match="dod.init"):
        config.dod.init = "xavier"
        build_dod(config, base_models(config), 0)
