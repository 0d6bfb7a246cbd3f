"""Stable Diffusion's UNet2DConditionModel in Flax NNX (SD 1.x / 2.x family).

Layout: `sample` is NHWC (B, H, W, in_channels); `encoder_hidden_states` is (B, T, D);
the output is NHWC (B, H, W, out_channels), by default in float32 whatever the compute dtype
(the output head, conv_norm_out and conv_out, runs in float32: DOD's x0 = (z - 0.998 eps) / 0.068
multiplies eps's rounding by 14.6, and bfloat16's 8 bits would show). Any H, W works: skip
connections fix the upsampled sizes, as diffusers does for sizes not divisible by 8.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from dod_jax.models.config import check_config
from dod_jax.models.layers import (Attention, Conv2d, compute_dtype, Downsample2D, GroupNorm, LayerNorm, Linear,
                                   ResnetBlock2D, Upsample2D, as_tuple, call_maybe_remat, remat_mode)

CROSS_ATTN_DOWN, PLAIN_DOWN = "CrossAttnDownBlock2D", "DownBlock2D"
CROSS_ATTN_UP, PLAIN_UP = "CrossAttnUpBlock2D", "UpBlock2D"


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """Defaults are diffusers' defaults, so a key missing from a config.json means the same
    here as there; the SD 2.1-base values live in configs/sd21_base.py."""
    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    down_block_types: tuple[str, ...] = (CROSS_ATTN_DOWN,) * 3 + (PLAIN_DOWN,)
    up_block_types: tuple[str, ...] = (PLAIN_UP,) + (CROSS_ATTN_UP,) * 3
    layers_per_block: int = 2
    num_attention_heads: tuple[int, ...] = (8, 8, 8, 8)
    transformer_layers_per_block: tuple[int, ...] = (1, 1, 1, 1)
    cross_attention_dim: int = 1280
    use_linear_projection: bool = False
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    center_input_sample: bool = False
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    resnet_out_scale_factor: float = 1.0
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    time_embedding_dim: int | None = None
    sample_size: int | None = None
    # Kept for round trips only: the softmax here is always float32.
    upcast_attention: bool = False

    _READ = {"in_channels", "out_channels", "block_out_channels", "down_block_types", "up_block_types",
             "layers_per_block", "attention_head_dim", "num_attention_heads", "transformer_layers_per_block",
             "cross_attention_dim", "use_linear_projection", "norm_num_groups", "norm_eps", "flip_sin_to_cos",
             "freq_shift", "center_input_sample", "downsample_padding", "mid_block_scale_factor",
             "resnet_out_scale_factor", "conv_in_kernel", "conv_out_kernel", "time_embedding_dim", "sample_size",
             "upcast_attention"}
    # Only used by addition_embed_type="text_image", which is rejected below.
    _IGNORED = {"addition_embed_type_num_heads"}
    _FIXED = {
        "mid_block_type": ("UNetMidBlock2DCrossAttn",), "act_fn": ("silu",), "dropout": (0.0, 0),
        "only_cross_attention": (False,), "dual_cross_attention": (False,), "class_embed_type": (None,),
        "addition_embed_type": (None,), "addition_time_embed_dim": (None,), "num_class_embeds": (None,),
        "encoder_hid_dim": (None,), "encoder_hid_dim_type": (None,), "resnet_time_scale_shift": ("default",),
        "resnet_skip_time_act": (False,), "time_embedding_type": ("positional",),
        "time_embedding_act_fn": (None,), "timestep_post_act": (None,), "time_cond_proj_dim": (None,),
        "projection_class_embeddings_input_dim": (None,), "attention_type": ("default",),
        "class_embeddings_concat": (False,), "mid_block_only_cross_attention": (None, False),
        "cross_attention_norm": (None,), "reverse_transformer_layers_per_block": (None,),
    }

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> "UNetConfig":
        check_config(config, read=cls._READ, ignored=cls._IGNORED, fixed=cls._FIXED, what="UNet2DConditionModel")
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        get = lambda k: config.get(k, defaults.get(k))
        n = len(get("block_out_channels"))
        # diffusers' historical naming: `attention_head_dim` holds the number of heads
        # when `num_attention_heads` is absent (every SD config).
        heads = config.get("num_attention_heads") or config.get("attention_head_dim", 8)
        layers = get("layers_per_block")
        if isinstance(layers, (list, tuple)):
            raise ValueError("UNet2DConditionModel config: per-block layers_per_block is not supported")
        cfg = cls(
            in_channels=get("in_channels"), out_channels=get("out_channels"),
            block_out_channels=tuple(get("block_out_channels")),
            down_block_types=tuple(get("down_block_types")), up_block_types=tuple(get("up_block_types")),
            layers_per_block=layers,
            num_attention_heads=as_tuple(heads, n, "attention_head_dim"),
            transformer_layers_per_block=as_tuple(config.get("transformer_layers_per_block", 1), n,
                                                  "transformer_layers_per_block"),
            cross_attention_dim=get("cross_attention_dim"), use_linear_projection=get("use_linear_projection"),
            norm_num_groups=get("norm_num_groups"), norm_eps=get("norm_eps"),
            flip_sin_to_cos=get("flip_sin_to_cos"), freq_shift=get("freq_shift"),
            center_input_sample=get("center_input_sample"), downsample_padding=get("downsample_padding"),
            mid_block_scale_factor=get("mid_block_scale_factor"),
            resnet_out_scale_factor=get("resnet_out_scale_factor"),
            conv_in_kernel=get("conv_in_kernel"), conv_out_kernel=get("conv_out_kernel"),
            time_embedding_dim=get("time_embedding_dim"), sample_size=get("sample_size"),
            upcast_attention=get("upcast_attention"))
        cfg.validate()
        return cfg

    def validate(self):
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(f"UNet config: {n} block widths but {len(self.down_block_types)} down and "
                             f"{len(self.up_block_types)} up block types")
        for t in self.down_block_types:
            if t not in (CROSS_ATTN_DOWN, PLAIN_DOWN):
                raise ValueError(f"UNet config: down block type {t!r} is not supported")
        for t in self.up_block_types:
            if t not in (CROSS_ATTN_UP, PLAIN_UP):
                raise ValueError(f"UNet config: up block type {t!r} is not supported")
        if isinstance(self.cross_attention_dim, (list, tuple)):
            raise ValueError("UNet config: per-block cross_attention_dim is not supported")

    def to_diffusers(self) -> dict:
        return {
            "_class_name": "UNet2DConditionModel",
            "in_channels": self.in_channels, "out_channels": self.out_channels,
            "block_out_channels": list(self.block_out_channels),
            "down_block_types": list(self.down_block_types), "up_block_types": list(self.up_block_types),
            "mid_block_type": "UNetMidBlock2DCrossAttn",
            "layers_per_block": self.layers_per_block,
            "attention_head_dim": list(self.num_attention_heads),
            "transformer_layers_per_block": list(self.transformer_layers_per_block),
            "cross_attention_dim": self.cross_attention_dim, "use_linear_projection": self.use_linear_projection,
            "norm_num_groups": self.norm_num_groups, "norm_eps": self.norm_eps, "act_fn": "silu",
            "flip_sin_to_cos": self.flip_sin_to_cos, "freq_shift": self.freq_shift,
            "center_input_sample": self.center_input_sample, "downsample_padding": self.downsample_padding,
            "mid_block_scale_factor": self.mid_block_scale_factor,
            "resnet_out_scale_factor": self.resnet_out_scale_factor,
            "conv_in_kernel": self.conv_in_kernel, "conv_out_kernel": self.conv_out_kernel,
            "time_embedding_dim": self.time_embedding_dim, "sample_size": self.sample_size,
            "upcast_attention": self.upcast_attention,
        }


def timestep_embedding(timesteps, dim: int, *, flip_sin_to_cos: bool, freq_shift: float, max_period=10000.0):
    """Sinusoidal timestep features (B,) -> (B, dim), float32 (diffusers' get_timestep_embedding)."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift))
    args = timesteps.astype(jnp.float32)[:, None] * freqs[None, :]
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nnx.Module):
    def __init__(self, in_features: int, dim: int, **kw):
        self.linear_1 = Linear(in_features, dim, **kw)
        self.linear_2 = Linear(dim, dim, **kw)

    def __call__(self, x):
        return self.linear_2(jax.nn.silu(self.linear_1(x)))


class GEGLU(nnx.Module):
    def __init__(self, dim: int, inner: int, **kw):
        self.proj = Linear(dim, 2 * inner, **kw)

    def __call__(self, x):
        h, gate = jnp.split(self.proj(x), 2, axis=-1)
        return h * jax.nn.gelu(gate, approximate=False)


class FeedForward(nnx.Module):
    """diffusers' FeedForward: net = [GEGLU, Dropout, Linear]; the dropout slot (rate 0 in
    SD) is kept so the parameter paths read `ff.net.0.proj` and `ff.net.2` as in diffusers."""

    def __init__(self, dim: int, **kw):
        inner = 4 * dim
        self.net = nnx.List([GEGLU(dim, inner, **kw), nnx.Dropout(0.0), Linear(inner, dim, **kw)])

    def __call__(self, x):
        return self.net[2](self.net[0](x))


class BasicTransformerBlock(nnx.Module):
    def __init__(self, dim: int, heads: int, context_dim: int, *, attention_impl, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        norm_kw = dict(dtype=dtype, param_dtype=param_dtype)
        dim_head = dim // heads
        self.norm1 = LayerNorm(dim, **norm_kw)
        self.attn1 = Attention(dim, heads, dim_head, implementation=attention_impl, **kw)
        self.norm2 = LayerNorm(dim, **norm_kw)
        self.attn2 = Attention(dim, heads, dim_head, context_dim=context_dim, implementation=attention_impl, **kw)
        self.norm3 = LayerNorm(dim, **norm_kw)
        self.ff = FeedForward(dim, **kw)

    def __call__(self, x, context):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2D(nnx.Module):
    """diffusers' Transformer2DModel (continuous input): GroupNorm, proj_in, blocks, proj_out,
    residual. proj_in/out are Linear (SD 2.x) or 1x1 Conv (SD 1.x), the same map in NHWC."""

    def __init__(self, channels: int, heads: int, depth: int, context_dim: int, *, linear_projection: bool,
                 groups: int, attention_impl, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        proj = (lambda i, o: Linear(i, o, **kw)) if linear_projection else (lambda i, o: Conv2d(i, o, 1, **kw))
        self.norm = GroupNorm(groups, channels, eps=1e-6, dtype=dtype, param_dtype=param_dtype)
        self.proj_in = proj(channels, channels)
        self.transformer_blocks = nnx.List([
            BasicTransformerBlock(channels, heads, context_dim, attention_impl=attention_impl, **kw)
            for _ in range(depth)])
        self.proj_out = proj(channels, channels)

    def __call__(self, x, context):
        b, h, w, c = x.shape
        tokens = self.proj_in(self.norm(x)).reshape(b, h * w, c)
        for block in self.transformer_blocks:
            tokens = block(tokens, context)
        return x + self.proj_out(tokens.reshape(b, h, w, c))


class DownBlock(nnx.Module):
    """CrossAttnDownBlock2D (with `attentions`) or DownBlock2D (without)."""

    def __init__(self, in_ch, out_ch, *, cfg: UNetConfig, index: int, temb_ch, attention_impl, dtype,
                 param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        res = dict(temb_channels=temb_ch, groups=cfg.norm_num_groups, eps=cfg.norm_eps,
                   output_scale_factor=cfg.resnet_out_scale_factor, **kw)
        n = cfg.layers_per_block
        self.resnets = nnx.List([ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, **res) for i in range(n)])
        self.attentions = nnx.List([
            Transformer2D(out_ch, cfg.num_attention_heads[index], cfg.transformer_layers_per_block[index],
                          cfg.cross_attention_dim, linear_projection=cfg.use_linear_projection,
                          groups=cfg.norm_num_groups, attention_impl=attention_impl, **kw)
            for _ in range(n)]) if cfg.down_block_types[index] == CROSS_ATTN_DOWN else None
        is_final = index == len(cfg.block_out_channels) - 1
        self.downsamplers = None if is_final else nnx.List(
            [Downsample2D(out_ch, padding=cfg.downsample_padding, **kw)])

    def __call__(self, x, temb, context):
        outputs = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
            outputs.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            outputs.append(x)
        return x, outputs


class UpBlock(nnx.Module):
    """CrossAttnUpBlock2D (with `attentions`) or UpBlock2D (without)."""

    def __init__(self, in_ch, out_ch, prev_out_ch, *, cfg: UNetConfig, index: int, heads: int, depth: int,
                 temb_ch, attention_impl, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        res = dict(temb_channels=temb_ch, groups=cfg.norm_num_groups, eps=cfg.norm_eps,
                   output_scale_factor=cfg.resnet_out_scale_factor, **kw)
        n = cfg.layers_per_block + 1
        self.resnets = nnx.List([
            ResnetBlock2D((prev_out_ch if i == 0 else out_ch) + (in_ch if i == n - 1 else out_ch), out_ch, **res)
            for i in range(n)])
        self.attentions = nnx.List([
            Transformer2D(out_ch, heads, depth, cfg.cross_attention_dim,
                          linear_projection=cfg.use_linear_projection, groups=cfg.norm_num_groups,
                          attention_impl=attention_impl, **kw)
            for _ in range(n)]) if cfg.up_block_types[index] == CROSS_ATTN_UP else None
        is_final = index == len(cfg.block_out_channels) - 1
        self.upsamplers = None if is_final else nnx.List([Upsample2D(out_ch, **kw)])

    def __call__(self, x, skips, temb, context, upsample_size):
        for i, resnet in enumerate(self.resnets):
            x = jnp.concatenate([x, skips[-1 - i].astype(x.dtype)], axis=-1)
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, upsample_size)
        return x


class MidBlockCrossAttn(nnx.Module):
    def __init__(self, ch, *, cfg: UNetConfig, temb_ch, attention_impl, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        res = dict(temb_channels=temb_ch, groups=cfg.norm_num_groups, eps=cfg.norm_eps,
                   output_scale_factor=cfg.mid_block_scale_factor, **kw)
        self.resnets = nnx.List([ResnetBlock2D(ch, ch, **res), ResnetBlock2D(ch, ch, **res)])
        self.attentions = nnx.List([
            Transformer2D(ch, cfg.num_attention_heads[-1], cfg.transformer_layers_per_block[-1],
                          cfg.cross_attention_dim, linear_projection=cfg.use_linear_projection,
                          groups=cfg.norm_num_groups, attention_impl=attention_impl, **kw)])

    def __call__(self, x, temb, context):
        x = self.resnets[0](x, temb)
        x = self.attentions[0](x, context)
        return self.resnets[1](x, temb)


class UNet2DCondition(nnx.Module):
    """UNet2DConditionModel. Call with NHWC `sample`, timesteps (scalar or (B,)) and (B, T, D)
    `encoder_hidden_states`.

    dtype: compute dtype of activations (e.g. jnp.bfloat16); param_dtype: storage dtype.
    output_dtype: compute dtype of the output head (conv_norm_out, conv_out) and of the output;
    None: the compute dtype.
    remat: rematerialise each down/mid/up block in the backward pass: 'blocks' (or True) or
    'dots' (layers.REMAT_POLICIES); 'none' (or False) not.
    attention_impl: see layers.dot_product_attention ("auto", "chunked", None, "xla", "cudnn").
    """

    def __init__(self, config: UNetConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, remat: bool | str = False,
                 attention_impl: str | None = "auto", output_dtype=jnp.float32, rngs: nnx.Rngs):
        cfg = config
        self.config, self.dtype, self.remat = cfg, dtype, remat_mode(remat)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        blocks = dict(attention_impl=attention_impl, **kw)
        ch = cfg.block_out_channels
        temb_ch = cfg.time_embedding_dim or 4 * ch[0]
        self.conv_in = Conv2d(cfg.in_channels, ch[0], cfg.conv_in_kernel, **kw)
        self.time_embedding = TimestepEmbedding(ch[0], temb_ch, **kw)
        down, out_ch = [], ch[0]
        for i in range(len(ch)):
            in_ch, out_ch = out_ch, ch[i]
            down.append(DownBlock(in_ch, out_ch, cfg=cfg, index=i, temb_ch=temb_ch, **blocks))
        self.down_blocks = nnx.List(down)
        self.mid_block = MidBlockCrossAttn(ch[-1], cfg=cfg, temb_ch=temb_ch, **blocks)
        rev, heads, depth = ch[::-1], cfg.num_attention_heads[::-1], cfg.transformer_layers_per_block[::-1]
        up, out_ch = [], rev[0]
        for i in range(len(ch)):
            prev_out, out_ch = out_ch, rev[i]
            in_ch = rev[min(i + 1, len(ch) - 1)]
            up.append(UpBlock(in_ch, out_ch, prev_out, cfg=cfg, index=i, heads=heads[i], depth=depth[i],
                              temb_ch=temb_ch, **blocks))
        self.up_blocks = nnx.List(up)
        head = dict(kw, dtype=output_dtype or dtype)
        self.conv_norm_out = GroupNorm(cfg.norm_num_groups, ch[0], eps=cfg.norm_eps, dtype=head["dtype"],
                                       param_dtype=param_dtype)
        self.conv_out = Conv2d(ch[0], cfg.out_channels, cfg.conv_out_kernel, **head)

    def __call__(self, sample, timesteps, encoder_hidden_states):
        cfg = self.config
        b = sample.shape[0]
        timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (b,))
        temb = timestep_embedding(timesteps, cfg.block_out_channels[0], flip_sin_to_cos=cfg.flip_sin_to_cos,
                                  freq_shift=cfg.freq_shift)
        dtype = compute_dtype(self.dtype)
        temb = self.time_embedding(temb.astype(dtype))
        context = encoder_hidden_states.astype(dtype)
        x = sample.astype(dtype)
        if cfg.center_input_sample:
            x = 2 * x - 1.0
        x = self.conv_in(x)
        skips = [x]
        for block in self.down_blocks:
            x, outputs = call_maybe_remat(self.remat, lambda m, h: m(h, temb, context), block, x)
            skips.extend(outputs)
        x = call_maybe_remat(self.remat, lambda m, h: m(h, temb, context), self.mid_block, x)
        for block in self.up_blocks:
            n = len(block.resnets)
            block_skips, skips = skips[-n:], skips[:-n]
            size = skips[-1].shape[1:3] if skips else None
            x = call_maybe_remat(self.remat, lambda m, h, s: m(h, s, temb, context, size), block, x, block_skips)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))
