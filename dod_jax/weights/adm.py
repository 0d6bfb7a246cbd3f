"""ADM (guided-diffusion) weights: a one-off converter from the official .pt to safetensors
(read without torch, by dod_jax.weights.torch_pickle), and a strict loader of that file into
models.adm.ADMEncoder.

The converter keeps only the tensors the encoder half needs (time_embed, input_blocks,
middle_block) and drops the output half (output_blocks, out) by name; anything else in the
file, a missing tensor or a mis-shaped one is an error naming the tensors, and nothing is
written. The ADM config travels in the safetensors metadata, so the file loads on its own.

    python -m dod_jax.weights.adm 256x256_diffusion_uncond.pt adm_256_uncond_encoder.safetensors
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from dod_jax.errors import reported
from dod_jax.files import atomic_write
from dod_jax.models.adm import ADMConfig, ADMEncoder
from dod_jax.models.layers import FixedKeyRngs
from dod_jax.weights import torch_pickle
from dod_jax.weights.diffusers import (
    TensorSource, WeightsError, WeightsMismatchError, fill_parameters,
    from_torch_layout, param_table, safetensors_source, torch_tensors)

ENCODER_PREFIXES = ("time_embed.", "input_blocks.", "middle_block.")
OUTPUT_HALF_PREFIXES = ("output_blocks.", "out.")
CONFIG_METADATA_KEY = "adm_config"


def abstract_encoder(config: ADMConfig, **model_kwargs) -> ADMEncoder:
    return nnx.eval_shape(lambda: ADMEncoder(config, rngs=FixedKeyRngs(), **model_kwargs))


def config_to_json(config: ADMConfig) -> str:
    return json.dumps(dataclasses.asdict(config), sort_keys=True)


def config_from_json(text: str, source: str) -> ADMConfig:
    try:
        fields = json.loads(text)
        return ADMConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
    except (json.JSONDecodeError, TypeError) as e:
        raise WeightsError(f"{source}: the '{CONFIG_METADATA_KEY}' metadata is not an ADM config ({e})") from e


def check_state_dict(shapes: dict[str, tuple], config: ADMConfig, source: str) -> list[str]:
    """The names of the encoder-half tensors in `shapes` (an official state dict's names and
    shapes), after checking they are exactly what the encoder needs."""
    table = {e.name: e.torch_shape for e in param_table(abstract_encoder(config))}
    kept = [n for n in shapes if n.startswith(ENCODER_PREFIXES)]
    unexpected = sorted(n for n in shapes if not n.startswith(ENCODER_PREFIXES + OUTPUT_HALF_PREFIXES)
                        or (n.startswith(ENCODER_PREFIXES) and n not in table))
    missing = sorted(n for n in table if n not in shapes)
    misshaped = [(n, tuple(shapes[n]), table[n]) for n in kept if n in table and tuple(shapes[n]) != table[n]]
    if missing or unexpected or misshaped:
        raise WeightsMismatchError(source, missing, unexpected, misshaped)
    return kept


def convert_checkpoint(pt_path: str | os.PathLike, out_path: str | os.PathLike,
                       config: ADMConfig = ADMConfig()) -> Path:
    """Official guided-diffusion .pt -> safetensors holding the encoder half (read by the
    restricted unpickler: no torch needed)."""
    pt_path, out_path = Path(pt_path), Path(out_path)
    state = torch_pickle.load(pt_path)
    if not isinstance(state, dict) or not all(isinstance(v, np.ndarray) for v in state.values()):
        raise WeightsError(f"{pt_path}: expected a flat state dict of tensors")
    kept = check_state_dict({k: v.shape for k, v in state.items()}, config, str(pt_path))
    tensors = {k: np.ascontiguousarray(state[k], np.float32) for k in kept}
    atomic_write(out_path, lambda p: save_file(tensors, p, metadata={CONFIG_METADATA_KEY: config_to_json(config)}))
    return out_path


def save_adm(encoder: ADMEncoder, path: str | os.PathLike) -> Path:
    """Write an encoder's weights as the file `load_adm` reads (official names and layouts,
    its config in the metadata)."""
    tensors = torch_tensors(encoder)
    return atomic_write(path, lambda p: save_file(tensors, p, metadata={CONFIG_METADATA_KEY: config_to_json(encoder.config)}))


def read_config(path: str | os.PathLike) -> ADMConfig:
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such ADM weights file")
    try:
        metadata = safe_open(str(path), framework="np").metadata() or {}
    except (SafetensorError, OSError) as e:
        raise WeightsError(f"{path}: not a readable safetensors file ({e})") from e
    return config_from_json(metadata[CONFIG_METADATA_KEY], str(path)) if CONFIG_METADATA_KEY in metadata else ADMConfig()


def load_adm(path: str | os.PathLike, *, dtype=jnp.float32, param_dtype=jnp.float32,
             attention_impl: str | None = "auto") -> ADMEncoder:
    """Load a converted ADM encoder-half safetensors file (config from its metadata, else the
    256x256 uncond config)."""
    config = read_config(path)
    model = abstract_encoder(config, dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl)
    table = param_table(model)
    source: TensorSource = safetensors_source([Path(path)], str(path))
    fill_parameters(model, table, [e.name for e in table], source,
                    lambda e, t: from_torch_layout(e.layout, t), lambda e: e.torch_shape)
    return model


def main(argv=None):
    parser = argparse.ArgumentParser(description="Convert guided-diffusion's 256x256_diffusion_uncond.pt "
                                                 "to the safetensors file DOD's MFM loads.")
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("output", type=Path)
    args = parser.parse_args(argv)
    with reported("dod_jax.weights.adm"):
        out = convert_checkpoint(args.checkpoint, args.output)
        print(f"wrote {out} ({len(safe_open(str(out), framework='np').keys())} tensors)")


if __name__ == "__main__":
    main()
