"""CLIP's image tower with its projection (transformers' CLIPVisionModelWithProjection) in Flax
NNX: the image embeddings LoRA-IR's degradation router reads (ViT-L/14 at 336 pixels there).

    patches = conv(pixels, patch x patch, stride patch, no bias)       (B, N, width)
    x = pre_layrnorm([class_embedding; patches] + position_embedding)
    x = x + attention(layer_norm1(x)); x = x + fc2(act(fc1(layer_norm2(x))))   per layer
    image_embeds = visual_projection(post_layernorm(x[:, 0]))

Pixels are NHWC, already normalised with CLIP's mean and std. Attribute names follow
transformers' modules (`vision_model.encoder.layers.3.self_attn.q_proj`), so a parameter's path
reads as its tensor name (dod_jax.weights.clip loads them).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from dod_jax.models.layers import (Conv2d, LayerNorm, Linear, compute_dtype, dot_product_attention, gelu,
                                    normal_init)


def quick_gelu(x):
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": gelu}


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """transformers' CLIPVisionConfig fields (ViT-L/14-336: 1024 wide, 24 layers, 16 heads,
    4096 MLP, 336 pixels in 14-pixel patches, 768-d projection)."""
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 336
    patch_size: int = 14
    projection_dim: int = 768
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"

    @classmethod
    def from_transformers(cls, values: dict) -> "CLIPVisionConfig":
        """From a config.json of CLIPVisionModelWithProjection (or a full CLIP config's
        vision_config); other keys are ignored."""
        values = values.get("vision_config", values)
        fields = {f.name for f in dataclasses.fields(cls)}
        config = cls(**{k: v for k, v in values.items() if k in fields})
        if config.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act {config.hidden_act!r} is not one of {sorted(ACTIVATIONS)}")
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(f"hidden_size {config.hidden_size} does not split into {config.num_attention_heads} heads")
        return config

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1


class Embedding(nnx.Module):
    def __init__(self, count: int, features: int, *, param_dtype, rngs):
        self.weight = nnx.Param(normal_init(rngs, (count, features), 0.02, param_dtype))


class Embeddings(nnx.Module):
    def __init__(self, cfg: CLIPVisionConfig, *, dtype, param_dtype, rngs):
        self.patch_size = cfg.patch_size
        self.patch_embedding = Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size,
                                      padding=0, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.class_embedding = nnx.Param(normal_init(rngs, (cfg.hidden_size,), 0.02, param_dtype))
        self.position_embedding = Embedding(cfg.num_positions, cfg.hidden_size, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, pixels):
        patches = self.patch_embedding(pixels)
        b, gh, gw, width = patches.shape
        tokens = patches.reshape(b, gh * gw, width)
        cls = jnp.broadcast_to(self.class_embedding[...].astype(tokens.dtype), (b, 1, width))
        positions = self.position_embedding.weight[...]
        if positions.shape[0] != gh * gw + 1:
            raise ValueError(f"CLIP's position embedding has {positions.shape[0] - 1} patches, the image gives "
                             f"{gh} x {gw}: resize it to the tower's image_size")
        return jnp.concatenate([cls, tokens], axis=1) + positions.astype(tokens.dtype)


class SelfAttention(nnx.Module):
    def __init__(self, cfg: CLIPVisionConfig, *, attention_impl, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        width = cfg.hidden_size
        self.heads, self.implementation = cfg.num_attention_heads, attention_impl
        self.q_proj, self.k_proj, self.v_proj = (Linear(width, width, **kw) for _ in range(3))
        self.out_proj = Linear(width, width, **kw)

    def __call__(self, x):
        b, t, width = x.shape
        split = lambda y: y.reshape(b, t, self.heads, width // self.heads)
        out = dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)),
                                    self.implementation)
        return self.out_proj(out.reshape(b, t, width))


class MLP(nnx.Module):
    def __init__(self, cfg: CLIPVisionConfig, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.activation = ACTIVATIONS[cfg.hidden_act]
        self.fc1 = Linear(cfg.hidden_size, cfg.intermediate_size, **kw)
        self.fc2 = Linear(cfg.intermediate_size, cfg.hidden_size, **kw)

    def __call__(self, x):
        return self.fc2(self.activation(self.fc1(x)))


class EncoderLayer(nnx.Module):
    def __init__(self, cfg: CLIPVisionConfig, *, attention_impl, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        norm = dict(eps=cfg.layer_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.layer_norm1 = LayerNorm(cfg.hidden_size, **norm)
        self.self_attn = SelfAttention(cfg, attention_impl=attention_impl, **kw)
        self.layer_norm2 = LayerNorm(cfg.hidden_size, **norm)
        self.mlp = MLP(cfg, **kw)

    def __call__(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nnx.Module):
    def __init__(self, cfg: CLIPVisionConfig, **kw):
        self.layers = nnx.List([EncoderLayer(cfg, **kw) for _ in range(cfg.num_hidden_layers)])

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class VisionTransformer(nnx.Module):
    def __init__(self, cfg: CLIPVisionConfig, *, attention_impl, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        norm = dict(eps=cfg.layer_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.embeddings = Embeddings(cfg, **kw)
        self.pre_layrnorm = LayerNorm(cfg.hidden_size, **norm)  # transformers' spelling
        self.encoder = Encoder(cfg, attention_impl=attention_impl, **kw)
        self.post_layernorm = LayerNorm(cfg.hidden_size, **norm)

    def __call__(self, pixels):
        x = self.encoder(self.pre_layrnorm(self.embeddings(pixels)))
        return x, self.post_layernorm(x[:, 0])


class CLIPVisionWithProjection(nnx.Module):
    """`__call__(pixels)` -> image embeddings (B, projection_dim); `features(pixels)` also
    returns the last hidden state (B, tokens, width)."""

    def __init__(self, config: CLIPVisionConfig, *, attention_impl: str | None = "auto", dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs):
        self.config, self.dtype = config, dtype
        self.vision_model = VisionTransformer(config, attention_impl=attention_impl, dtype=dtype,
                                              param_dtype=param_dtype, rngs=rngs)
        self.visual_projection = Linear(config.hidden_size, config.projection_dim, use_bias=False, dtype=dtype,
                                        param_dtype=param_dtype, rngs=rngs)

    def features(self, pixels):
        hidden, pooled = self.vision_model(pixels.astype(compute_dtype(self.dtype)))
        return self.visual_projection(pooled), hidden

    def __call__(self, pixels):
        return self.features(pixels)[0]
