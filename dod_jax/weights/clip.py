"""transformers' CLIPVisionModelWithProjection weights (the folder `save_pretrained` writes:
config.json and model.safetensors, or its shards) in dod_jax.models.clip, by name: every tensor
of the model must be in the files and every tensor of the files in the model, each in its
shape, or the error names what is missing, unexpected and mis-shaped (as the SD loader).
`save_clip_vision` writes such a folder."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from dod_jax.models.clip import CLIPVisionConfig, CLIPVisionWithProjection
from dod_jax.models.layers import FixedKeyRngs
from dod_jax.weights.diffusers import (WeightsError, fill_parameters, from_torch_layout, param_table, read_json,
                                       safetensors_source, torch_tensors)


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


def save_clip_vision(model: CLIPVisionWithProjection, folder: str | os.PathLike) -> Path:
    """config.json and model.safetensors as transformers' save_pretrained writes them (float32)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = dict(dataclasses.asdict(model.config), model_type="clip_vision_model",
                  architectures=["CLIPVisionModelWithProjection"])
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    tensors = {k: np.asarray(v, np.float32) for k, v in torch_tensors(model).items()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder
