"""LoRA-IR's released IR weights (`setting1_ir.pth`, key `params`) in dod-jax's NAFNet-DAM
with routed experts, by name (../shared/LORA_IR.md, section 5).

Their names follow the PyTorch modules, which dod_jax.models.nafnet mirrors; per tensor:

    X.conv.weight / X.conv.bias      (a convolution wrapped with experts)  -> X.kernel / X.bias
    X.weight (4-D)                   a convolution's weight, OIHW -> HWIO  -> X.kernel
    X.weight (1-D) / X.bias          a LayerNorm2d's affine                -> X.scale / X.bias
    X.beta, X.gamma (1, c, 1, 1)                                            -> (c,)
    X.lora_A_list / X.lora_B_list    the experts, layout kept              -> X.adapters.<set>.lora_A / lora_B

Every tensor of the model must be in the file and every tensor of the file in the model, each
in its shape; otherwise the error names what is missing, unexpected and mis-shaped.
"""

from __future__ import annotations

import numpy as np
from flax import nnx, traverse_util

from dod_jax.models.layers import ADAPTERS
from dod_jax.weights.diffusers import WeightsError

EXPERTS = "experts"  # the adapter set holding LoRA-IR's routed experts


def our_name(name: str, set_name: str = EXPERTS) -> str:
    """The dotted NNX path of the authors' tensor `name`."""
    parts = name.split(".")
    if parts[-1] in ("lora_A_list", "lora_B_list"):
        return ".".join(parts[:-1] + ["adapters", set_name, parts[-1][:len("lora_A")]])
    if len(parts) > 1 and parts[-2] == "conv" and parts[-1] in ("weight", "bias"):
        parts = parts[:-2] + parts[-1:]
    return ".".join(parts)


def _converted(name: str, value: np.ndarray, like: np.ndarray) -> np.ndarray:
    if value.ndim == 4 and like.ndim == 4:
        return value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    if name.endswith((".beta", ".gamma")) or name in ("beta", "gamma"):
        return value.reshape(-1)
    return value


def has_experts(tensors: dict) -> bool:
    """Whether an IR state dict is the fine-tuned one (with experts) or the stage-1 one."""
    return any(name.endswith(("lora_A_list", "lora_B_list")) for name in tensors)


def read_ir(model: nnx.Module, tensors: dict[str, np.ndarray], source: str, set_name: str = EXPERTS) -> None:
    """Put the authors' IR `tensors` (their state dict as NumPy arrays) into `model` (a
    models.nafnet.NAFNetDAM with the experts set `set_name` injected); a file without experts
    (stage 1) leaves them as they are."""
    with_experts = has_experts(tensors)
    state = nnx.state(model, nnx.Param if with_experts else nnx.All(nnx.Param, nnx.Not(nnx.PathContains(ADAPTERS))))
    flat = {".".join(map(str, k)): v for k, v in traverse_util.flatten_dict(nnx.to_pure_dict(state)).items()}
    ours = {}
    for name, value in tensors.items():
        path = our_name(name, set_name)
        leaf = path.rsplit(".", 1)[-1]
        if leaf == "weight":
            base = path[:-len("weight")]
            path = base + ("kernel" if np.ndim(value) == 4 else "scale")
        ours[path] = (name, np.asarray(value))
    missing = sorted(set(flat) - set(ours))
    unexpected = sorted(ours[p][0] for p in set(ours) - set(flat))
    values, misshaped = {}, []
    for path in sorted(set(ours) & set(flat)):
        name, value = ours[path]
        converted = _converted(name, value, np.asarray(flat[path]))
        if converted.shape != np.shape(flat[path]):
            misshaped.append(f"{name}: {value.shape} in the file, {np.shape(flat[path])} in the model")
        values[path] = converted
    if missing or unexpected or misshaped:
        more = lambda items: f"{items[:5]}{' ...' if len(items) > 5 else ''}"
        raise WeightsError(f"{source} does not fit this LoRA-IR network: missing {more(missing)}, "
                           f"unexpected {more(unexpected)}, mis-shaped {more(misshaped)}")
    tree = traverse_util.unflatten_dict({tuple(int(p) if p.isdigit() else p for p in k.split(".")):
                                         np.asarray(v, np.asarray(flat[k]).dtype) for k, v in values.items()})
    nnx.replace_by_pure_dict(state, tree)
    nnx.update(model, state)
