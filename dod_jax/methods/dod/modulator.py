"""M_theta: the degradation-aware modulation of DOD's conditional LoRA.

    de   = ReLU(Linear(feature_dim -> hidden)(c))
    e_k  = ReLU(Linear(prompt_dim -> prompt_dim)(P_k))         P: learnable prompts
    film = Linear(hidden + prompt_dim -> 2r)([de, e_k])          one row per prompt k

Every CLoRA layer reads the row of its prompt (its film key): by default one prompt per UNet
block group, so layers of a group share (gamma, beta). The authors' code initialises the three
Linears as basicsr's default_init_weights(1e-5) (Kaiming-normal weights times 1e-5, biases 0:
init 'official'), so film starts near zero; init 'default' scales PyTorch's default Linear
init (weights and biases) by init_scale instead.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
from flax import nnx

from dod_jax.errors import ConfigError
from dod_jax.models.layers import Linear, kaiming_normal, normal_init

INITS = ("official", "default")  # dod.init (configs/dod.py)

UNET_GROUPS = 10  # down_blocks 0-3, mid_block, up_blocks 0-3, everything else


def unet_block_group(path: str) -> int:
    """down_blocks.i -> i, mid_block -> 4, up_blocks.i -> 5 + i, anything else (conv_out...) -> 9."""
    m = re.match(r"(down_blocks|up_blocks)\.(\d+)\.", path)
    if m:
        return int(m.group(2)) + (0 if m.group(1) == "down_blocks" else 5)
    return 4 if path.startswith("mid_block.") else 9


class Modulator(nnx.Module):
    def __init__(self, num_prompts: int, rank: int, *, feature_dim: int = 1024, hidden: int = 256,
                 prompt_dim: int = 64, init_scale: float = 1e-5, init: str = "official", rngs: nnx.Rngs):
        if init not in INITS:
            raise ConfigError(f"dod.init must be one of {INITS}, got {init!r}")
        self.degradation = Linear(feature_dim, hidden, rngs=rngs)
        self.prompt_proj = Linear(prompt_dim, prompt_dim, rngs=rngs)
        self.film = Linear(hidden + prompt_dim, 2 * rank, rngs=rngs)
        self.prompts = nnx.Param(normal_init(rngs, (num_prompts, prompt_dim), 1.0, jnp.float32))
        for layer in (self.degradation, self.prompt_proj, self.film):
            if init == "official":
                shape = layer.kernel.shape
                layer.kernel.set_value(kaiming_normal(rngs, shape, shape[0], jnp.float32) * init_scale)
                layer.bias.set_value(jnp.zeros_like(layer.bias[...]))
            else:
                for p in (layer.kernel, layer.bias):
                    p.set_value(p[...] * init_scale)

    def __call__(self, c):
        """c: (B, feature_dim) -> film (num_prompts, B, 2r), float32."""
        de = jax.nn.relu(self.degradation(c.astype(jnp.float32)))
        e = jax.nn.relu(self.prompt_proj(self.prompts[...]))
        b, k = c.shape[0], e.shape[0]
        joint = jnp.concatenate([jnp.broadcast_to(de[None], (k, b, de.shape[-1])),
                                 jnp.broadcast_to(e[:, None], (k, b, e.shape[-1]))], axis=-1)
        return self.film(joint)
