"""The AutoencoderKL port held against diffusers with the same random weights."""

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from conftest import nchw, nhwc, sd21_config, tiny_config
from torch_models import diffusers_model
from dod_jax.weights.diffusers import load_diffusers_model


def compare_vae(config: dict, tmp_path, hw, seed=0, atol=1e-4):
    ref = diffusers_model("vae", config, seed)
    ref.save_pretrained(tmp_path)
    ours = load_diffusers_model(tmp_path)
    rng = np.random.default_rng(seed)
    image = rng.uniform(-1, 1, (2, *hw, 3)).astype(np.float32)
    latent_hw = [s // ours.config.downscale for s in hw]
    latents = rng.standard_normal((2, *latent_hw, config["latent_channels"])).astype(np.float32)
    with torch.no_grad():
        dist = ref.encode(nchw(image)).latent_dist
        ref_mean, ref_logvar = nhwc(dist.mean), nhwc(dist.logvar)
        ref_decoded = nhwc(ref.decode(nchw(latents)).sample)
    posterior = nnx.jit(lambda m, x: m.encode(x))(ours, image)
    decoded = nnx.jit(lambda m, z: m.decode(z))(ours, latents)
    errors = {"mean": np.abs(np.asarray(posterior.mean) - ref_mean).max(),
              "logvar": np.abs(np.asarray(posterior.logvar) - ref_logvar).max(),
              "decode": np.abs(np.asarray(decoded) - ref_decoded).max()}
    print({k: f"{v:.2e}" for k, v in errors.items()})
    for name, err in errors.items():
        assert err <= atol, f"{name}: max abs error {err:.2e}"
    assert np.abs(ref_decoded).mean() > 0.05
    return ref, ours


def test_tiny_vae_matches_diffusers(tmp_path):
    compare_vae(tiny_config().vae.to_dict(), tmp_path, (32, 48))


def test_tiny_vae_without_mid_attention_or_quant_convs(tmp_path):
    cfg = tiny_config().vae.to_dict()
    cfg.update(mid_block_add_attention=False, use_quant_conv=False, use_post_quant_conv=False)
    _, ours = compare_vae(cfg, tmp_path, (32, 32))
    assert ours.quant_conv is None and ours.decoder.mid_block.attentions is None


def test_encoder_skips_are_down_block_inputs_and_decoder_hook_sees_up_block_inputs(tmp_path):
    ref = diffusers_model("vae", tiny_config().vae.to_dict())
    ref.save_pretrained(tmp_path)
    ours = load_diffusers_model(tmp_path)
    image = np.random.default_rng(1).uniform(-1, 1, (1, 32, 32, 3)).astype(np.float32)
    captured_in = []
    hooks = [mod.register_forward_pre_hook(lambda m, args: captured_in.append(nhwc(args[0])))
             for mod in ref.encoder.down_blocks]
    with torch.no_grad():
        latents = ref.encode(nchw(image)).latent_dist.mode()
    for h in hooks:
        h.remove()
    _, skips = ours.encode(image, return_skips=True)
    assert [s.shape for s in skips] == [c.shape for c in captured_in]
    for s, c in zip(skips, captured_in):
        np.testing.assert_allclose(np.asarray(s), c, atol=1e-4)

    up_inputs = []
    hooks = [mod.register_forward_pre_hook(lambda m, args: up_inputs.append(nhwc(args[0])))
             for mod in ref.decoder.up_blocks]
    with torch.no_grad():
        plain = nhwc(ref.decode(latents).sample)
    for h in hooks:
        h.remove()
    seen = []

    def record(i, x):
        seen.append((i, np.asarray(x)))
        return x

    z = nhwc(latents)
    np.testing.assert_allclose(np.asarray(ours.decode(z, before_up_block=record)), plain, atol=1e-4)
    assert [i for i, _ in seen] == list(range(len(ref.decoder.up_blocks)))
    for (_, x), ref_x in zip(seen, up_inputs):
        np.testing.assert_allclose(x, ref_x, atol=1e-4)
    changed = np.asarray(ours.decode(z, before_up_block=lambda i, x: x * 0.5 if i == 1 else x))
    assert np.abs(changed - plain).max() > 1e-2, "the hook's return value must feed the up block"


def test_posterior_sample_and_mode():
    from dod_jax.models.vae import DiagonalGaussian
    moments = np.concatenate([np.full((1, 2, 2, 4), 0.5), np.full((1, 2, 2, 4), 50.0)], -1).astype(np.float32)
    post = DiagonalGaussian.from_moments(moments)
    assert float(post.logvar.max()) == 20.0  # clamped as in diffusers
    np.testing.assert_array_equal(np.asarray(post.mode()), 0.5)
    s1, s2 = post.sample(jax.random.key(0)), post.sample(jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(s1), np.asarray(s2))
    moments[..., 4:] = np.log(0.25)
    samples = DiagonalGaussian.from_moments(np.tile(moments, (4096, 1, 1, 1))).sample(jax.random.key(1))
    assert abs(float(np.std(samples)) - 0.5) < 0.01 and abs(float(np.mean(samples)) - 0.5) < 0.01


@pytest.mark.slow
def test_sd21_base_vae_matches_diffusers(tmp_path):
    compare_vae(sd21_config().vae.to_dict(), tmp_path, (64, 64))
