"""The UNet port held against diffusers' UNet2DConditionModel with the same random weights."""

import gc

import numpy as np
import pytest
import torch
from flax import nnx

from conftest import nchw, nhwc, sd1_style_tiny_unet, sd21_config, tiny_config
from torch_models import diffusers_model
from dod_jax.weights.diffusers import load_diffusers_model


def unet_outputs(config: dict, tmp_path, latent_hw, seed=0, timesteps=(999, 37)):
    ref = diffusers_model("unet", config, seed)
    ref.save_pretrained(tmp_path)
    rng = np.random.default_rng(seed)
    b = len(timesteps)
    sample = rng.standard_normal((b, *latent_hw, config["in_channels"])).astype(np.float32)
    context = rng.standard_normal((b, 7, config["cross_attention_dim"])).astype(np.float32)
    with torch.no_grad():
        expected = nhwc(ref(nchw(sample), torch.tensor(timesteps), torch.from_numpy(context)).sample)
    del ref  # SD 2.1's UNet is 3.5 GB in float32: never hold both ports at once
    gc.collect()
    ours = load_diffusers_model(tmp_path)
    got = np.asarray(nnx.jit(lambda m, *a: m(*a))(ours, sample, np.array(timesteps), context))
    return got, expected


@pytest.mark.parametrize("name,config,latent_hw", [
    ("tiny_sd2", lambda: tiny_config().unet.to_dict(), (16, 16)),
    ("tiny_sd1_style", sd1_style_tiny_unet, (16, 16)),
    ("tiny_odd_size", lambda: tiny_config().unet.to_dict(), (10, 14)),
])
def test_tiny_unet_matches_diffusers(name, config, latent_hw, tmp_path):
    got, expected = unet_outputs(config(), tmp_path, latent_hw)
    assert got.shape == expected.shape
    assert np.abs(expected).mean() > 0.1, "reference output too small for a meaningful comparison"
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


@pytest.mark.slow
def test_sd21_base_unet_matches_diffusers(tmp_path):
    got, expected = unet_outputs(sd21_config().unet.to_dict(), tmp_path, (16, 16), timesteps=(999,))
    err = np.abs(got - expected).max()
    print(f"SD 2.1-base UNet max abs error {err:.2e}, output mean |x| {np.abs(expected).mean():.3f}")
    assert err <= 1e-4
