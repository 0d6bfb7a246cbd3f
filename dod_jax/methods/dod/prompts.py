"""Prompt embeddings: DOD conditions its UNet on one fixed text embedding (77 x 1024 for SD
2.1's OpenCLIP text tower), and DMD's real score also on a negative prompt. They are arrays in
a safetensors file, keys "prompt" and "negative_prompt", so no text encoder is needed to train
or restore.

Computing them needs the pipeline's text_encoder/ and tokenizer/ folders and transformers:

    python -m dod_jax.methods.dod.prompts --pipeline PATH/stable-diffusion-2-1-base --out prompts.safetensors \\
        --prompt "" --negative-prompt ""
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from dod_jax.files import atomic_write
from dod_jax.weights.diffusers import WeightsError

KEYS = ("prompt", "negative_prompt")  # the negative prompt is optional: only stage-1 training reads it


def save_prompt_embeddings(path: str | os.PathLike, prompt: np.ndarray, negative_prompt: np.ndarray | None,
                           texts: tuple[str, str] = ("", "")) -> Path:
    path = Path(path)
    if prompt.ndim != 2 or (negative_prompt is not None and prompt.shape != negative_prompt.shape):
        raise ValueError(f"prompt embeddings must be (tokens, dim) arrays of one shape, got "
                         f"{prompt.shape} and {None if negative_prompt is None else negative_prompt.shape}")
    tensors = {"prompt": np.asarray(prompt, np.float32)}
    described = {"prompt": texts[0]}
    if negative_prompt is not None:
        tensors["negative_prompt"] = np.asarray(negative_prompt, np.float32)
        described["negative_prompt"] = texts[1]
    # One metadata entry: safetensors writes several in a random order, and equal embeddings
    # must give equal bytes (the demo base's manifest holds their sha256).
    metadata = {"texts": json.dumps(described, sort_keys=True)}
    atomic_write(path, lambda p: save_file(tensors, p, metadata=metadata))
    return path


def load_prompt_embeddings(path: str | os.PathLike, expected_dim: int | None = None) -> dict[str, np.ndarray]:
    """{"prompt": (T, D), and "negative_prompt": (T, D) where the file has one} float32;
    `expected_dim` is the UNet's cross-attention width."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such prompt-embeddings file")
    try:
        with safe_open(str(path), framework="np") as f:
            if "prompt" not in f.keys():
                raise WeightsError(f"{path}: lacks prompt (a prompt-embeddings file holds {list(KEYS)})")
            arrays = {k: f.get_tensor(k).astype(np.float32) for k in KEYS if k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise WeightsError(f"{path}: not a readable safetensors file ({e})") from e
    for k, a in arrays.items():
        if a.ndim != 2 or (expected_dim is not None and a.shape[1] != expected_dim):
            raise WeightsError(f"{path}: {k} has shape {a.shape}, expected (tokens, {expected_dim or 'dim'})")
    return arrays


def encode_texts(pipeline_folder: str | os.PathLike, texts: list[str]) -> np.ndarray:
    """The text encoder's last hidden states (N, 77, D) for `texts`, as diffusers' SD 2.x
    pipelines compute prompt embeddings (tokenizer padded to max length, no attention mask)."""
    import torch
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = Path(pipeline_folder)
    for sub in ("text_encoder", "tokenizer"):
        if not (folder / sub).is_dir():
            raise WeightsError(f"{folder}: no {sub}/ folder (prompt embeddings need the pipeline's text encoder)")
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
    encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", local_files_only=True).eval()
    ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        return encoder(ids)[0].float().numpy()


def main(argv=None):
    parser = argparse.ArgumentParser(description="Compute DOD's prompt embeddings file with a pipeline's CLIP text encoder.")
    parser.add_argument("--pipeline", required=True, type=Path, help="diffusers SD folder with text_encoder/ and tokenizer/")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--prompt", default="")
    parser.add_argument("--negative-prompt", default="")
    args = parser.parse_args(argv)
    prompt, negative = encode_texts(args.pipeline, [args.prompt, args.negative_prompt])
    out = save_prompt_embeddings(args.out, prompt, negative, (args.prompt, args.negative_prompt))
    print(f"wrote {out}: prompt and negative_prompt of shape {prompt.shape}")


if __name__ == "__main__":
    main()
