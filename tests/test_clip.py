"""The CLIP image tower (dod_jax.models.clip, loaded by dod_jax.weights.clip) against
transformers' own CLIPVisionModelWithProjection: a small random config and LoRA-IR's
ViT-L/14-336, random non-trivial weights saved by save_pretrained and read back by name."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from dod_jax.weights.clip import load_clip_vision
from dod_jax.weights.diffusers import WeightsMismatchError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
             patch_size=8, projection_dim=16)
VIT_L_14_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                    image_size=336, patch_size=14, projection_dim=768)


def saved_tower(sizes: dict, folder, seed: int = 0):
    """transformers' tower with its random init, norms and biases moved off 1 and 0, saved."""
    torch.manual_seed(seed)
    model = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**sizes)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder, safe_serialization=True)
    return model


def embeddings_of_both(sizes: dict, folder, batch: int):
    reference = saved_tower(sizes, folder)
    ours = load_clip_vision(folder)
    size = sizes["image_size"]
    pixels = np.random.default_rng(1).standard_normal((batch, 3, size, size)).astype(np.float32)
    with torch.no_grad():
        expected = reference(pixel_values=torch.from_numpy(pixels)).image_embeds.numpy()
    got = np.asarray(jax.jit(ours)(jnp.asarray(pixels.transpose(0, 2, 3, 1))))
    return expected, got


def test_a_small_tower_equals_transformers(tmp_path):
    expected, got = embeddings_of_both(SMALL, tmp_path, batch=2)
    assert got.shape == (2, 16) and np.abs(expected).max() > 0.1
    assert np.abs(got - expected).max() <= 1e-4, np.abs(got - expected).max()


def test_vit_l_14_336_equals_transformers(tmp_path):
    expected, got = embeddings_of_both(VIT_L_14_336, tmp_path, batch=1)
    assert got.shape == (1, 768)
    assert np.abs(got - expected).max() <= 1e-4 * max(1.0, np.abs(expected).max()), np.abs(got - expected).max()


def test_a_file_that_does_not_fit_is_named_with_what_is_wrong(tmp_path):
    saved_tower(SMALL, tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    del tensors["vision_model.post_layernorm.bias"]
    tensors["vision_model.extra"] = np.zeros(3, np.float32)
    tensors["visual_projection.weight"] = tensors["visual_projection.weight"][:8]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(WeightsMismatchError) as error:
        load_clip_vision(tmp_path)
    assert error.value.missing == ["vision_model.post_layernorm.bias"]
    assert error.value.unexpected == ["vision_model.extra"]
    assert [m[0] for m in error.value.misshaped] == ["visual_projection.weight"]
