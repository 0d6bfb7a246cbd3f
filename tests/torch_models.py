"""PyTorch models with random, non-trivial weights for the reference side of the parity tests
and benchmarks (no JAX set-up here, so benchmarks import it without the tests' virtual devices)."""

from __future__ import annotations

import copy


def perturb_(module, seed: int, scale: float = 0.05):
    """Random offsets on every parameter, so norms' weights and biases differ from 1 and 0
    and a mix-up of any two tensors shows in the outputs."""
    import torch
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return module


def diffusers_model(kind: str, config: dict, seed: int = 0, scale: float = 0.05):
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    torch.manual_seed(seed)
    cls = {"unet": UNet2DConditionModel, "vae": AutoencoderKL}[kind]
    cfg = {k: v for k, v in copy.deepcopy(dict(config)).items() if not k.startswith("_")}
    return perturb_(cls(**cfg).eval(), seed, scale)
