"""Loading and saving the SD UNet / VAE ports from and to the folders diffusers writes.

No torch or diffusers at run time: safetensors are read with safetensors' NumPy API, the
diffusers Flax format (diffusion_flax_model.msgpack) with flax.serialization.

The name table is explicit and derived from the model itself: every NNX parameter path is
already the diffusers module path (see models/layers.py), so each parameter yields one
`TensorEntry` naming its diffusers tensor and its layout:
  linear  our (in, out)            <-> torch (out, in)
  conv    our (kh, kw, in, out)    <-> torch (out, in, kh, kw)
  conv1d  our (k, in, out)         <-> torch (out, in, k)
  vector  norms' scale -> `weight`, biases, unchanged
A file that does not fit the model raises WeightsMismatchError listing the missing,
unexpected and mis-shaped tensors; no parameter is ever left at its initial value.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Callable

import jax.numpy as jnp
import numpy as np
from flax import nnx, serialization
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from dod_jax.errors import InputError
from dod_jax.files import atomic_write
from dod_jax.models.layers import ADAPTERS, FixedKeyRngs
from dod_jax.models.unet import UNet2DCondition, UNetConfig
from dod_jax.models.vae import AutoencoderKL, VAEConfig
from dod_jax.schedule import DDPMSchedule

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "diffusion_pytorch_model.safetensors"
FLAX_NAME = "diffusion_flax_model.msgpack"
DIFFUSERS_LAYOUT_VERSION = "0.42.1"  # the diffusers release whose folder layout we write and test against

MODEL_CLASSES = {
    "UNet2DConditionModel": (UNetConfig, UNet2DCondition),
    "AutoencoderKL": (VAEConfig, AutoencoderKL),
}


class WeightsError(InputError):
    """A weights folder or file that cannot be loaded; the message names the file."""


class WeightsMismatchError(WeightsError):
    def __init__(self, source: str, missing: list[str], unexpected: list[str],
                 misshaped: list[tuple[str, tuple, tuple]]):
        self.missing, self.unexpected, self.misshaped = missing, unexpected, misshaped
        parts = [f"{source} does not fit the model:"]
        if missing:
            parts.append(f"  {len(missing)} missing: " + _listing(missing))
        if unexpected:
            parts.append(f"  {len(unexpected)} unexpected: " + _listing(unexpected))
        if misshaped:
            parts.append(f"  {len(misshaped)} mis-shaped: " + _listing(
                [f"{n} (file {tuple(f)}, model expects {tuple(m)})" for n, f, m in misshaped]))
        super().__init__("\n".join(parts))


def _listing(items: list[str], limit: int = 20) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    path: tuple           # NNX state path, e.g. ('down_blocks', 0, 'resnets', 1, 'conv1', 'kernel')
    name: str             # diffusers tensor name, e.g. 'down_blocks.0.resnets.1.conv1.weight'
    layout: str           # 'linear' | 'conv' | 'conv1d' | 'vector'
    shape: tuple          # shape in our layout

    @property
    def torch_shape(self) -> tuple:
        return torch_layout_shape(self.layout, self.shape)


# Our layout's axes in PyTorch's order, per layout: a linear (in, out) kernel is PyTorch's
# (out, in), a conv's HWIO is OIHW, a conv1d's (k, in, out) is (out, in, k); vectors are alike.
TORCH_AXES = {"linear": (1, 0), "conv": (3, 2, 0, 1), "conv1d": (2, 1, 0)}


def torch_layout_shape(layout: str, shape: tuple) -> tuple:
    """The PyTorch shape of a parameter of `shape` in our `layout`."""
    axes = TORCH_AXES.get(layout)
    return tuple(shape) if axes is None else tuple(shape[a] for a in axes)


def to_torch_layout(layout: str, array: np.ndarray) -> np.ndarray:
    axes = TORCH_AXES.get(layout)
    return array if axes is None else array.transpose(axes)


def from_torch_layout(layout: str, tensor: np.ndarray) -> np.ndarray:
    axes = TORCH_AXES.get(layout)
    return tensor if axes is None else tensor.transpose(np.argsort(axes))


BASE_PARAMS = nnx.All(nnx.Param, nnx.Not(nnx.PathContains(ADAPTERS)))


def param_table(model: nnx.Module) -> list[TensorEntry]:
    """The explicit name/layout table of a model's base parameters (adapters excluded): a
    `kernel` is PyTorch's `weight` in its layout, a `scale` a norm's `weight`, any other leaf
    keeps its name and layout."""
    table = []
    for path, var in nnx.to_flat_state(nnx.state(model, BASE_PARAMS)):
        leaf = path[-1]
        shape = tuple(var.shape)
        if leaf == "kernel":
            layout, torch_leaf = {2: "linear", 3: "conv1d", 4: "conv"}[len(shape)], "weight"
        elif leaf == "scale":
            layout, torch_leaf = "vector", "weight"
        else:  # a bias, or a parameter named as PyTorch names it (CLIP's class_embedding, an Embedding's weight)
            layout, torch_leaf = "vector", leaf
        name = ".".join(str(p) for p in path[:-1]) + "." + torch_leaf
        table.append(TensorEntry(tuple(path), name, layout, shape))
    return table


# Before diffusers 0.14 the VAE attention was named query/key/value/proj_attn; SD checkpoints
# published then (SD 1.x, 2.x among them) may still carry those names.
_LEGACY_VAE_ATTENTION = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
_VAE_ATTENTION_NAME = re.compile(r"^((?:en|de)coder\.mid_block\.attentions\.\d+)\.(to_q|to_k|to_v|to_out\.0)\.")


def legacy_name(name: str) -> str | None:
    m = _VAE_ATTENTION_NAME.match(name)
    if not m:
        return None
    return f"{m.group(1)}.{_LEGACY_VAE_ATTENTION[m.group(2)]}." + name[m.end():]


def flax_key(entry: TensorEntry) -> tuple[str, ...]:
    """The key of a parameter in diffusers' Flax (linen) parameter tree: list indices are
    joined to their name with '_' and attention projections are query/key/value/proj_attn."""
    key: list[str] = []
    path = list(entry.path)
    i = 0
    while i < len(path):
        part = path[i]
        if part == "to_out" and i + 1 < len(path) and path[i + 1] == 0:
            key.append("proj_attn")
            i += 2
            continue
        if isinstance(part, int):
            key[-1] = f"{key[-1]}_{part}"
        else:
            key.append({"to_q": "query", "to_k": "key", "to_v": "value"}.get(part, part))
        i += 1
    return tuple(key)


# ---------------------------------------------------------------------------------- reading

@dataclasses.dataclass
class TensorSource:
    """Tensors by name from one or more files, with shapes known before reading."""
    description: str
    shapes: dict
    read: Callable[[object], np.ndarray]


def safetensors_source(files: list[Path], description: str) -> TensorSource:
    shapes, owner = {}, {}
    for f in files:
        try:
            h = safe_open(str(f), framework="np")
            for name in h.keys():
                shapes[name] = tuple(h.get_slice(name).get_shape())
                owner[name] = h
        except (SafetensorError, OSError) as e:
            raise WeightsError(f"{f}: not a readable safetensors file ({e})") from e

    def read(name: str) -> np.ndarray:
        try:
            return owner[name].get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise WeightsError(f"{description}: tensor {name} cannot be read ({e})") from e

    return TensorSource(description, shapes, read)


def _msgpack_source(file: Path) -> TensorSource:
    try:
        tree = serialization.msgpack_restore(file.read_bytes())
    except Exception as e:  # msgpack raises several unrelated types for a damaged file
        raise WeightsError(f"{file}: not a readable Flax msgpack file ({type(e).__name__}: {e})") from e
    flat = {}

    def walk(prefix, node):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(prefix + (k,), v)
        else:
            flat[prefix] = np.asarray(node)

    walk((), tree)
    return TensorSource(str(file), {k: v.shape for k, v in flat.items()}, flat.__getitem__)


def _weights_files(folder: Path, variant: str | None) -> tuple[str, list[Path]]:
    """('safetensors' | 'msgpack', files) for a diffusers model folder."""
    stem = "diffusion_pytorch_model" + (f".{variant}" if variant else "")
    single = folder / f"{stem}.safetensors"
    if single.is_file():
        return "safetensors", [single]
    index = folder / f"{stem}.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise WeightsError(f"{index}: not a safetensors index (needs a 'weight_map'): {e}") from e
        shards = [folder / s for s in dict.fromkeys(weight_map.values())]
        absent = [str(s) for s in shards if not s.is_file()]
        if absent:
            raise WeightsError(f"{index} lists shards that are absent: {', '.join(absent)}")
        return "safetensors", shards
    if variant is None and (folder / FLAX_NAME).is_file():
        return "msgpack", [folder / FLAX_NAME]
    present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    raise WeightsError(
        f"{folder}: no weights found (looked for {single.name}, {index.name}"
        f"{'' if variant else ', ' + FLAX_NAME}); the folder holds: {present or 'nothing'}"
        + ("; PyTorch .bin files need a one-off conversion to safetensors" if any(
            p.endswith(".bin") for p in present) else ""))


def read_json(path: Path, needed_by: str) -> dict:
    if not path.is_file():
        raise WeightsError(f"{path}: missing ({needed_by} needs it)")
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise WeightsError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(value, dict):
        raise WeightsError(f"{path}: expected a JSON object")
    return value


def build_abstract(config_dict: dict, source: str, **model_kwargs) -> nnx.Module:
    """The model described by a diffusers config, with shapes but no values."""
    class_name = config_dict.get("_class_name")
    if class_name not in MODEL_CLASSES:
        raise WeightsError(f"{source}: _class_name {class_name!r} is not one of {sorted(MODEL_CLASSES)}")
    config_cls, model_cls = MODEL_CLASSES[class_name]
    try:
        config = config_cls.from_diffusers(config_dict)
    except (ValueError, TypeError) as e:
        raise WeightsError(f"{source}: {e}") from e
    return nnx.eval_shape(lambda: model_cls(config, rngs=FixedKeyRngs(), **model_kwargs))


def fill_parameters(model: nnx.Module, table: list[TensorEntry], names: list[str], source: TensorSource,
          convert: Callable[[TensorEntry, np.ndarray], np.ndarray], file_shape: Callable[[TensorEntry], tuple]):
    """Check every entry against the source, then set every parameter of `model`."""
    wanted = set(names)
    show = lambda n: "/".join(n) if isinstance(n, tuple) else n  # msgpack keys are tuples
    missing = [show(n) for n in names if n not in source.shapes]
    unexpected = sorted(show(k) for k in source.shapes if k not in wanted)
    misshaped = [(show(n), source.shapes[n], file_shape(e)) for e, n in zip(table, names)
                 if n in source.shapes and tuple(source.shapes[n]) != file_shape(e)]
    if missing or unexpected or misshaped:
        raise WeightsMismatchError(source.description, missing, unexpected, misshaped)
    variables = dict(nnx.to_flat_state(nnx.state(model, BASE_PARAMS)))
    for entry, name in zip(table, names):
        var = variables[entry.path]
        var.set_value(jnp.asarray(convert(entry, source.read(name)), dtype=var.dtype))


def load_diffusers_model(folder: str | os.PathLike, *, variant: str | None = None, dtype=jnp.float32,
               param_dtype=jnp.float32, remat: bool = False, attention_impl: str | None = "auto") -> nnx.Module:
    """Load a diffusers model folder (config.json + weights) into UNet2DCondition or
    AutoencoderKL, chosen by the config's `_class_name`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise WeightsError(f"{folder}: no such model folder")
    config = read_json(folder / CONFIG_NAME, "a diffusers model folder")
    model = build_abstract(config, str(folder / CONFIG_NAME), dtype=dtype, param_dtype=param_dtype,
                           remat=remat, attention_impl=attention_impl)
    table = param_table(model)
    kind, files = _weights_files(folder, variant)
    description = ", ".join(str(f) for f in files)
    if kind == "safetensors":
        source = safetensors_source(files, description)
        names = [_resolve_name(e.name, source.shapes) for e in table]
        fill_parameters(model, table, names, source, lambda e, t: from_torch_layout(e.layout, t), lambda e: e.torch_shape)
    else:
        source = _msgpack_source(files[0])
        names = [flax_key(e) for e in table]
        fill_parameters(model, table, names, source, lambda e, t: t, lambda e: e.shape)
    return model


def _resolve_name(name: str, available: dict) -> str:
    if name in available:
        return name
    old = legacy_name(name)
    return old if old is not None and old in available else name


# ---------------------------------------------------------------------------------- writing

def torch_tensors(model: nnx.Module) -> dict[str, np.ndarray]:
    """The model's base parameters under their official names, in PyTorch's layouts."""
    variables = dict(nnx.to_flat_state(nnx.state(model, BASE_PARAMS)))
    return {e.name: np.ascontiguousarray(to_torch_layout(e.layout, np.asarray(variables[e.path][...])))
            for e in param_table(model)}


def save_diffusers_model(model: nnx.Module, folder: str | os.PathLike) -> Path:
    """Write config.json and diffusion_pytorch_model.safetensors in diffusers' layout.
    Each file is written to a temporary name and renamed, so a reader never sees half a file."""
    folder = Path(folder)
    tensors = torch_tensors(model)
    atomic_write(folder / SAFETENSORS_NAME, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    config = dict(model.config.to_diffusers(), _diffusers_version=DIFFUSERS_LAYOUT_VERSION)
    atomic_write(folder / CONFIG_NAME, lambda p: Path(p).write_text(json.dumps(config, indent=2, sort_keys=True)))
    return folder


# --------------------------------------------------------------------------------- pipelines

@dataclasses.dataclass
class SDPipeline:
    """The parts of a diffusers Stable Diffusion pipeline folder that DOD builds on."""
    unet: UNet2DCondition
    vae: AutoencoderKL
    schedule: DDPMSchedule


def load_pipeline(folder: str | os.PathLike, *, variant: str | None = None, dtype=jnp.float32,
                  param_dtype=jnp.float32, remat: bool = False, attention_impl: str | None = "auto") -> SDPipeline:
    """Load unet/, vae/ and scheduler/ of a diffusers pipeline folder (text encoder not needed:
    DOD uses precomputed prompt embeddings)."""
    folder = Path(folder)
    absent = [sub for sub in ("unet", "vae", "scheduler") if not (folder / sub).is_dir()]
    if absent:
        raise WeightsError(f"{folder}: not a diffusers pipeline folder, missing {', '.join(absent)}/")
    kw = dict(variant=variant, dtype=dtype, param_dtype=param_dtype, remat=remat, attention_impl=attention_impl)
    unet, vae = load_diffusers_model(folder / "unet", **kw), load_diffusers_model(folder / "vae", **kw)
    for name, model, cls in (("unet", unet, UNet2DCondition), ("vae", vae, AutoencoderKL)):
        if not isinstance(model, cls):
            raise WeightsError(f"{folder / name}: holds a {type(model).__name__}, expected {cls.__name__}")
    try:
        schedule = DDPMSchedule.from_config(read_json(folder / "scheduler" / "scheduler_config.json",
                                                      "a pipeline's scheduler/ folder"))
    except (ValueError, TypeError) as e:
        raise WeightsError(f"{folder / 'scheduler' / 'scheduler_config.json'}: {e}") from e
    return SDPipeline(unet, vae, schedule)


def save_pipeline(pipeline: SDPipeline, folder: str | os.PathLike, scheduler_config: dict) -> Path:
    """Write unet/, vae/ and scheduler/ in diffusers' layout."""
    folder = Path(folder)
    save_diffusers_model(pipeline.unet, folder / "unet")
    save_diffusers_model(pipeline.vae, folder / "vae")
    atomic_write(folder / "scheduler" / "scheduler_config.json",
                  lambda p: Path(p).write_text(json.dumps(scheduler_config, indent=2, sort_keys=True)))
    return folder
