"""The ADM encoder half (MFM backbone) against a PyTorch re-statement of guided-diffusion's
network holding the same random weights, through the official .pt -> safetensors converter."""

import dataclasses

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors import safe_open

from adm_reference import ADMEncoderTorch
from conftest import nchw, nhwc
from torch_models import perturb_
from dod_jax.models.adm import ADMConfig
from dod_jax.weights.adm import convert_checkpoint, load_adm
from dod_jax.weights.diffusers import WeightsError, WeightsMismatchError

TINY = ADMConfig(image_size=32, model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=2,
                 attention_resolutions=(16, 8), num_head_channels=16)


def torch_encoder(config: ADMConfig, seed=0):
    torch.manual_seed(seed)
    model = ADMEncoderTorch(config.image_size, config.in_channels, config.model_channels, config.channel_mult,
                            config.num_res_blocks, config.attention_resolutions, config.num_head_channels)
    return perturb_(model.eval(), seed)


def official_file(model, path, with_output_half=True):
    """The model's weights saved like the official checkpoint: the whole UNet's state dict,
    of which the output half is here represented by two tensors the converter must drop."""
    state = dict(model.state_dict())
    if with_output_half:
        state["output_blocks.0.0.in_layers.0.weight"] = torch.ones(8)
        state["out.2.weight"] = torch.ones(6, 8, 3, 3)
    torch.save(state, path)
    return state


def compare(config, tmp_path, sizes, timesteps, tol):
    ref = torch_encoder(config)
    official_file(ref, tmp_path / "adm.pt")
    out = convert_checkpoint(tmp_path / "adm.pt", tmp_path / "adm.safetensors", config)
    names = set(safe_open(str(out), framework="np").keys())
    assert "out.2.weight" not in names and not any(n.startswith("output_blocks.") for n in names)
    model = load_adm(out)
    assert model.config == config
    graphdef, state = nnx.split(model)
    run = jax.jit(lambda s, x, t: nnx.merge(graphdef, s)(x, t))
    features = jax.jit(lambda s, x: nnx.merge(graphdef, s).features(x))
    rng = np.random.default_rng(0)
    for (h, w), t in zip(sizes, timesteps):
        x = rng.uniform(-1, 1, (2, h, w, 3)).astype(np.float32)
        with torch.no_grad():
            expected = nhwc(ref(nchw(x), torch.full((2,), t)))
        got = np.asarray(run(state, x, t))
        assert got.shape == expected.shape
        err = np.abs(got - expected).max()
        print(f"ADM {h}x{w} t={t}: max abs error {err:.2e} (output scale {np.abs(expected).max():.2f})")
        assert err <= tol, (h, w, t, err)
        if t == 0:
            np.testing.assert_allclose(np.asarray(features(state, x)), expected.mean(axis=(1, 2)), atol=tol)
    return model


def test_tiny_adm_matches_reference(tmp_path):
    compare(TINY, tmp_path, sizes=[(32, 32), (40, 24)], timesteps=[0, 500], tol=1e-4)


def test_full_adm_256_uncond_matches_reference(tmp_path):
    # The real 256x256 uncond config (c is 1024-wide) at a small spatial size.
    model = compare(ADMConfig(), tmp_path, sizes=[(64, 64)], timesteps=[0], tol=1e-4)
    assert model.config.out_channels == 1024


@pytest.mark.parametrize("edit,message", [
    (lambda s: s.pop("middle_block.1.qkv.weight"), "1 missing: middle_block.1.qkv.weight"),
    (lambda s: s.__setitem__("input_blocks.1.0.extra.weight", torch.ones(3)), "1 unexpected: input_blocks.1.0.extra"),
    (lambda s: s.__setitem__("label_emb.weight", torch.ones(3)), "1 unexpected: label_emb.weight"),
    (lambda s: s.__setitem__("time_embed.0.weight", torch.ones(3, 3)), "1 mis-shaped: time_embed.0.weight"),
])
def test_converter_names_what_does_not_fit_and_writes_nothing(tmp_path, edit, message):
    state = official_file(torch_encoder(TINY), tmp_path / "adm.pt")
    edit(state)
    torch.save(state, tmp_path / "adm.pt")
    with pytest.raises(WeightsMismatchError, match=message):
        convert_checkpoint(tmp_path / "adm.pt", tmp_path / "adm.safetensors", TINY)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adm.pt"]


def test_loader_refuses_unreadable_and_foreign_files(tmp_path):
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="broken.pt: not a torch.save file in the zip format"):
        convert_checkpoint(tmp_path / "broken.pt", tmp_path / "x.safetensors", TINY)
    with pytest.raises(WeightsError, match="no such ADM weights file"):
        load_adm(tmp_path / "absent.safetensors")
    official_file(torch_encoder(TINY), tmp_path / "a.pt")
    convert_checkpoint(tmp_path / "a.pt", tmp_path / "a.safetensors", TINY)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes((tmp_path / "a.safetensors").read_bytes()[:1000])
    with pytest.raises(WeightsError, match="truncated.safetensors"):
        load_adm(truncated)
    wider = dataclasses.replace(TINY, model_channels=64)
    official_file(torch_encoder(wider), tmp_path / "b.pt")
    convert_checkpoint(tmp_path / "b.pt", tmp_path / "b.safetensors", wider)
    assert load_adm(tmp_path / "b.safetensors").config == wider
