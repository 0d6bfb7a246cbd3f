"""The authors' DOD checkpoints and DOD's trained parameters, name for name.

The authors' code saves two dicts (REFERENCE.md, "The authors' code in detail"):

    stage 1  rank_unet, rank_vae, unet_lora_target_modules, vae_lora_target_modules,
             state_dict_unet        <layer>.lora_{A,B}.default.weight (peft), conv_in.{weight,bias}
             state_dict_vae         encoder.<layer>.lora_{A,B}.vae_skip.weight, decoder.skip_conv_k.weight
             state_dict_unet_de_mlp / _block_mlp   0.{weight,bias}     M_theta's Linear(1024->256), Linear(64->64)
             state_dict_unet_fuse_mlp              {weight,bias}       Linear(320 -> 2r)
             state_dict_unet_block                 weight              the prompts (10 x 64)
    stage 2  rank_vae_decoder, state_dict_vae: decoder.skip_conv_k.weight and
             decoder.sft_blocks_k.{encode_enc_1, encode_enc_2.0.rdb{1..3}.conv{1..5}, encode_enc_3, w}

`official_entries` lists, for a DOD model, every trained parameter's place in those dicts (the
file, the dict, the key, the PyTorch layout); `read_official` fills a model from the two
dicts with every tensor accounted for, `write_official` produces them. Tensors are NumPy
arrays in PyTorch's layouts; reading and writing the files is dod_jax.methods.dod.convert's.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
from flax import nnx

from dod_jax import adapters
from dod_jax.methods.dod.model import DOD, GENERATOR, all_trained
from dod_jax.weights.diffusers import (WeightsError, WeightsMismatchError, from_torch_layout, to_torch_layout,
                                      torch_layout_shape)

UNET_ADAPTER, VAE_ADAPTER = "default", "vae_skip"  # the peft adapter names in the authors' files
PEFT_ALPHA = 8.0  # peft's default lora_alpha, which the authors' code keeps: scale 8 / r
MODULATOR_SECTIONS = {"degradation": ("state_dict_unet_de_mlp", "0."), "prompt_proj": ("state_dict_unet_block_mlp", "0."),
                      "film": ("state_dict_unet_fuse_mlp", "")}
# DOD's DEM parts -> the authors' Fuse_sft_block_RRDB parts; their ResBlock calls its 1x1 shortcut conv_out.
DEM_PARTS = {"fuse": "encode_enc_1", "out": "encode_enc_3"}
RESBLOCK_PARTS = {"conv_shortcut": "conv_out"}
LEAVES = {"kernel": "weight", "scale": "weight", "bias": "bias"}


@dataclasses.dataclass(frozen=True)
class OfficialEntry:
    path: tuple     # the parameter's path in the DOD model's state
    file: str       # 'stage1' | 'stage2'
    section: str    # the dict inside the file, e.g. 'state_dict_unet'
    key: str        # the tensor's name in that dict
    layout: str     # dod_jax.weights.diffusers layouts: linear | conv | vector

    @property
    def label(self) -> str:
        return f"{self.section}[{self.key}]"


def _layout(leaf: str, ndim: int) -> str:
    return {2: "linear", 4: "conv"}[ndim] if leaf == "kernel" else "vector"


def _dotted(parts) -> str:
    return ".".join(str(p) for p in parts)


def _entry(path: tuple, ndim: int) -> list[OfficialEntry]:
    """Where one trained parameter of DOD lives in the authors' files (one place, or two for
    the skip convs, which both stages' files hold)."""
    leaf = path[-1]
    if path[0] in ("unet", "vae") and "adapters" in path:
        at = path.index("adapters")
        layer, kind = _dotted(path[1:at]), path[at + 2]
        if kind == "copy":  # the trained conv_in, saved whole
            return [OfficialEntry(path, "stage1", "state_dict_unet", f"{layer}.{LEAVES[leaf]}", _layout(leaf, ndim))]
        section, adapter = ("state_dict_unet", UNET_ADAPTER) if path[0] == "unet" else ("state_dict_vae", VAE_ADAPTER)
        return [OfficialEntry(path, "stage1", section, f"{layer}.{kind}.{adapter}.weight", _layout(leaf, ndim))]
    if path[0] == "modulator":
        if path[1] == "prompts":
            return [OfficialEntry(path, "stage1", "state_dict_unet_block", "weight", "vector")]
        section, prefix = MODULATOR_SECTIONS[path[1]]
        return [OfficialEntry(path, "stage1", section, prefix + LEAVES[leaf], _layout(leaf, ndim))]
    if path[0] == "hde":
        k, part = int(path[2]) + 1, path[3]
        if part == "skip_conv":
            key = f"decoder.skip_conv_{k}.weight"
            return [OfficialEntry(path, f, "state_dict_vae", key, "conv") for f in ("stage2", "stage1")]
        block = f"decoder.sft_blocks_{k}"
        if part == "w":
            return [OfficialEntry(path, "stage2", "state_dict_vae", f"{block}.w", "vector")]
        if part == "rrdb":  # rrdb.blocks.j.convs.i -> encode_enc_2.0.rdb{j+1}.conv{i+1}
            key = f"{block}.encode_enc_2.0.rdb{int(path[5]) + 1}.conv{int(path[7]) + 1}.{LEAVES[leaf]}"
            return [OfficialEntry(path, "stage2", "state_dict_vae", key, _layout(leaf, ndim))]
        layer = RESBLOCK_PARTS.get(path[4], path[4])
        key = f"{block}.{DEM_PARTS[part]}.{layer}.{LEAVES[leaf]}"
        return [OfficialEntry(path, "stage2", "state_dict_vae", key, _layout(leaf, ndim))]
    raise KeyError(f"no official name for DOD parameter {'/'.join(map(str, path))}")


def official_entries(model: DOD) -> list[OfficialEntry]:
    """Every trained parameter of `model` with its place(s) in the authors' files."""
    entries = []
    for path, var in nnx.to_flat_state(all_trained(model)):
        entries.extend(_entry(tuple(path), len(var.shape)))
    return entries


def read_official(model: DOD, files: dict[str, dict], sources: dict[str, str]) -> None:
    """Fill `model`'s trained parameters from the authors' dicts: `files` maps 'stage1' (and,
    optionally, 'stage2') to the loaded dict, `sources` to the file names for messages. Every
    tensor of every section is accounted for: missing, unexpected and mis-shaped entries are
    listed by their official names and the model is left untouched. Without stage 2, the
    DEMs keep their initialisation (a stage-1 model decodes without them)."""
    state = all_trained(model)
    flat = dict(nnx.to_flat_state(state))
    by_file: dict[str, dict[str, list[OfficialEntry]]] = {}
    for entry in official_entries(model):
        if entry.file in files:
            by_file.setdefault(entry.file, {}).setdefault(entry.label, []).append(entry)
    values = {}
    for file, wanted in by_file.items():
        given = files[file]
        sections = sorted({e.section for entries in wanted.values() for e in entries})
        not_dicts = [s for s in sections if not isinstance(given.get(s), dict)]
        if not_dicts:
            raise WeightsMismatchError(sources[file], [f"{s} (the whole dict)" for s in not_dicts], [], [])
        present = {f"{s}[{k}]": v for s in sections for k, v in given[s].items()}
        optional = {label for label, entries in wanted.items() if file == "stage1" and entries[0].path[0] == "hde"}
        missing = sorted(set(wanted) - set(present) - optional)
        unexpected = sorted(set(present) - set(wanted))
        misshaped = []
        for label in sorted(set(wanted) & set(present)):
            entry, tensor = wanted[label][0], present[label]
            expected = torch_layout_shape(entry.layout, tuple(flat[entry.path].shape))
            if not isinstance(tensor, np.ndarray) or tensor.shape != expected:
                misshaped.append((label, getattr(tensor, "shape", type(tensor).__name__), expected))
        if missing or unexpected or misshaped:
            raise WeightsMismatchError(sources[file], missing, unexpected, misshaped)
        for label, entries in wanted.items():
            if label in present and (entries[0].path not in values or file == "stage2"):
                values[entries[0].path] = from_torch_layout(entries[0].layout, present[label])
    for path, value in values.items():
        flat[path].set_value(np.asarray(value, flat[path].dtype))
    nnx.update(model, state)


def write_official(model: DOD, unet_targets, vae_targets) -> dict[str, dict]:
    """The authors' stage-1 and stage-2 dicts of `model`'s trained parameters (float32 NumPy
    arrays in PyTorch's layouts), with the rank and target fields their code reads. Their
    LoRA scale is peft's 8 / r; a model trained at another scale has its B matrices rescaled
    so that the exported LoRA computes the same update (exact when the scales agree)."""
    loras = [lora for sub in (model.unet, model.vae) for _, _, lora in adapters.adapted(sub, GENERATOR)
             if isinstance(lora, adapters.LoRA)]
    rank = loras[0].rank
    b_factor = np.float32(loras[0].scale / (PEFT_ALPHA / rank))
    files = {"stage1": {"rank_unet": rank, "rank_vae": rank, "unet_lora_target_modules": list(unet_targets),
                        "vae_lora_target_modules": vae_target_regex(vae_targets)},
             "stage2": {"rank_vae_decoder": rank}}
    flat = dict(nnx.to_flat_state(all_trained(model)))
    for entry in official_entries(model):
        value = np.asarray(flat[entry.path][...], np.float32)
        if "lora_B" in entry.path and b_factor != 1:
            value = value * b_factor
        files[entry.file].setdefault(entry.section, {})[entry.key] = np.array(to_torch_layout(entry.layout, value), order="C")
    return files


def vae_target_regex(targets) -> str:
    """The authors' peft target for the VAE encoder: a regex over module names."""
    return r"^encoder\..*(" + "|".join(re.escape(t) for t in targets) + r")$"


def vae_targets_from_regex(regex, source: str) -> list[str]:
    """The module-name alternatives of such a regex (the inverse of vae_target_regex)."""
    m = re.fullmatch(r"\^encoder\\\.\.\*\((.*)\)\$", regex) if isinstance(regex, str) else None
    if not m:
        raise WeightsError(f"{source}: vae_lora_target_modules {regex!r} is not of the form ^encoder\\..*(a|b|...)$")
    return [t.replace("\\.", ".") for t in m.group(1).split("|")]


def checked_rank(files: dict[str, dict], sources: dict[str, str]) -> int:
    """The LoRA rank the files were trained with: stage 1's rank_unet, which rank_vae must
    equal (dod-jax uses one rank). Each file must be of its stage."""
    stage1 = files["stage1"]
    if "rank_unet" not in stage1:
        hint = " (it has rank_vae_decoder: a stage-2 file?)" if "rank_vae_decoder" in stage1 else ""
        raise WeightsError(f"{sources['stage1']}: no rank_unet entry, not a stage-1 DOD checkpoint{hint}")
    if "stage2" in files and "rank_vae_decoder" not in files["stage2"]:
        hint = " (it has rank_unet: a stage-1 file?)" if "rank_unet" in files["stage2"] else ""
        raise WeightsError(f"{sources['stage2']}: no rank_vae_decoder entry, not a stage-2 DOD checkpoint{hint}")
    rank, rank_vae = stage1["rank_unet"], stage1.get("rank_vae", stage1["rank_unet"])
    if not isinstance(rank, int) or rank != rank_vae:
        raise WeightsError(f"{sources['stage1']}: rank_unet {rank!r} and rank_vae {rank_vae!r}: dod-jax uses one LoRA rank")
    return rank
