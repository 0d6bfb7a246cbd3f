"""transformers' CLIPVisionModelWithProjection weights (the folder `save_pretrained` writes:
config.json and model.safetensors, or its shards) in dod_jax.models.clip, by name: every tensor
of the model must be in the files and every tensor of the files in the model, each in its
shape, or the error names what is missing, unexpected and mis-shaped (as the SD loader)."""

from __future__ import annotations

import os
from pathlib import Path

import jax.numpy as jnp
from flax import nnx

from dod_jax.models.clip import CLIPVisionConfig, CLIPVisionWithProjection
from dod_jax.models.layers import FixedKeyRngs
from dod_jax.weights.diffusers import (WeightsError, fill_parameters, from_torch_layout, param_table, read_json,
                                       safetensors_source)


def load_clip_vision(folder: str | os.PathLike, *, dtype=jnp.float32, param_dtype=jnp.float32,
                     attention_impl: str | None = "auto") -> CLIPVisionWithProjection:
    folder = Path(folder)
    if not folder.is_dir():
        raise WeightsError(f"{folder}: no such CLIP vision folder")
    config_file = folder / "config.json"
    try:
        config = CLIPVisionConfig.from_transformers(read_json(config_file, "a transformers CLIP vision folder"))
    except (TypeError, ValueError) as e:
        raise WeightsError(f"{config_file}: {e}") from e
    files = sorted(folder.glob("model*.safetensors"))
    if not files:
        raise WeightsError(f"{folder}: holds no model.safetensors (save the model with safe_serialization)")
    model = nnx.eval_shape(lambda: CLIPVisionWithProjection(config, attention_impl=attention_impl, dtype=dtype,
                                                            param_dtype=param_dtype, rngs=FixedKeyRngs()))
    table = param_table(model)
    source = safetensors_source(files, ", ".join(map(str, files)))
    fill_parameters(model, table, [e.name for e in table], source, lambda e, t: from_torch_layout(e.layout, t),
                    lambda e: e.torch_shape)
    return model
