"""The encoder half and middle block of OpenAI guided-diffusion's ADM UNet (Flax NNX, NHWC).

DOD's MFM reads the degradation feature c from a frozen pixel-space DDPM: the ImageNet
256x256 unconditional ADM, run at t=0 on the LQ image, its middle-block output mean-pooled
to (B, 1024). The output half of the network is never needed, so it is not built.

Attribute names follow the official state dict (`input_blocks.3.0.in_layers.2.weight`,
`middle_block.1.qkv.weight`), so an NNX parameter path reads as the official tensor name.
Sequential slots without parameters (SiLU, dropout, pooling) are `Parameterless` entries,
which keeps the official indices.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from dod_jax.models.layers import (Conv2d, GroupNorm, Linear, batch_sharded, dot_product_attention, uniform_fan_in,
                                   weight_at_use)
from dod_jax.models.unet import timestep_embedding

Dtype = jnp.dtype


@dataclasses.dataclass(frozen=True)
class ADMConfig:
    """guided-diffusion's `create_model` arguments that shape the encoder half. The defaults are
    the 256x256 unconditional ImageNet model (`256x256_diffusion_uncond.pt`)."""
    image_size: int = 256
    in_channels: int = 3
    model_channels: int = 256
    channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4, 4)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (32, 16, 8)
    num_head_channels: int = 64
    num_heads: int = 4  # used only when num_head_channels == -1
    resblock_updown: bool = True
    use_scale_shift_norm: bool = True
    groups: int = 32
    eps: float = 1e-5

    @property
    def out_channels(self) -> int:
        return self.model_channels * self.channel_mult[-1]

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.model_channels

    def heads(self, channels: int) -> int:
        return self.num_heads if self.num_head_channels == -1 else channels // self.num_head_channels


class Parameterless(nnx.Module):
    """Holds the index of a parameter-free slot of an official nn.Sequential."""


class Conv1d(nnx.Module):
    """guided-diffusion's 1D kernel-size-1 conv over flattened pixels, kernel stored (1, in, out)."""

    def __init__(self, in_channels: int, out_channels: int, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        self.dtype = dtype
        self.kernel = nnx.Param(uniform_fan_in(rngs, (1, in_channels, out_channels), in_channels, param_dtype))
        self.bias = nnx.Param(uniform_fan_in(rngs, (out_channels,), in_channels, param_dtype))

    def __call__(self, x):
        return batch_sharded(jnp.dot(x.astype(self.dtype), weight_at_use(self.kernel[0], self.dtype))
                             + self.bias[...].astype(self.dtype))


def avg_pool_2x2(x):
    """AvgPool2d(kernel 2, stride 2) of NHWC `x`; odd trailing rows/columns are dropped as in torch."""
    b, h, w, c = x.shape
    x = x[:, : h // 2 * 2, : w // 2 * 2]
    return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


class ResBlock(nnx.Module):
    """in_layers (norm, SiLU, 3x3 conv), emb_layers (SiLU, linear), out_layers (norm, SiLU, dropout,
    3x3 conv), optional average-pool downsampling inside (resblock_updown), scale-shift norm."""

    def __init__(self, channels: int, out_channels: int, *, cfg: ADMConfig, down: bool = False,
                 dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.down, self.scale_shift = down, cfg.use_scale_shift_norm
        self.in_layers = nnx.List([GroupNorm(cfg.groups, channels, eps=cfg.eps, **kw), Parameterless(),
                                   Conv2d(channels, out_channels, 3, rngs=rngs, **kw)])
        self.emb_layers = nnx.List([Parameterless(), Linear(
            cfg.time_embed_dim, 2 * out_channels if cfg.use_scale_shift_norm else out_channels, rngs=rngs, **kw)])
        self.out_layers = nnx.List([GroupNorm(cfg.groups, out_channels, eps=cfg.eps, **kw), Parameterless(),
                                    Parameterless(), Conv2d(out_channels, out_channels, 3, rngs=rngs, **kw)])
        self.skip_connection = Conv2d(channels, out_channels, 1, rngs=rngs, **kw) if channels != out_channels else None

    def __call__(self, x, emb):
        h = jax.nn.silu(self.in_layers[0](x))
        if self.down:
            h, x = avg_pool_2x2(h), avg_pool_2x2(x)
        h = self.in_layers[2](h)
        emb = self.emb_layers[1](jax.nn.silu(emb))[:, None, None, :]
        if self.scale_shift:
            scale, shift = jnp.split(emb, 2, axis=-1)
            h = self.out_layers[0](h) * (1 + scale) + shift
        else:
            h = self.out_layers[0](h + emb)
        h = self.out_layers[3](jax.nn.silu(h))
        skip = x if self.skip_connection is None else self.skip_connection(x)
        return skip.astype(h.dtype) + h


class AttentionBlock(nnx.Module):
    """Self-attention over all pixels with the legacy QKV order: the qkv conv's output channels
    are grouped per head as [q, k, v], each head_dim wide."""

    def __init__(self, channels: int, heads: int, *, cfg: ADMConfig, attention_impl: str | None,
                 dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        if channels % heads:
            raise ValueError(f"ADM attention: {channels} channels do not split into {heads} heads")
        self.heads, self.attention_impl = heads, attention_impl
        self.norm = GroupNorm(cfg.groups, channels, eps=cfg.eps, **kw)
        self.qkv = Conv1d(channels, 3 * channels, rngs=rngs, **kw)
        self.proj_out = Conv1d(channels, channels, rngs=rngs, **kw)

    def __call__(self, x):
        b, h, w, c = x.shape
        qkv = self.qkv(self.norm(x).reshape(b, h * w, c)).reshape(b, h * w, self.heads, 3, c // self.heads)
        out = dot_product_attention(qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :], self.attention_impl)
        return x + self.proj_out(out.reshape(b, h * w, c)).reshape(b, h, w, c).astype(x.dtype)


class ADMEncoder(nnx.Module):
    """time_embed, input_blocks and middle_block of guided-diffusion's UNetModel.

    Call with NHWC images in [-1, 1] and timesteps (scalar or (B,)); returns the middle-block
    output (B, H/2^(levels-1), W/2^(levels-1), out_channels). `features` gives DOD's MFM vector.
    """

    def __init__(self, config: ADMConfig = ADMConfig(), *, dtype=jnp.float32, param_dtype=jnp.float32,
                 attention_impl: str | None = "auto", rngs: nnx.Rngs):
        cfg = self.config = config
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.dtype = dtype
        self.time_embed = nnx.List([Linear(cfg.model_channels, cfg.time_embed_dim, **kw), Parameterless(),
                                    Linear(cfg.time_embed_dim, cfg.time_embed_dim, **kw)])
        ch = cfg.model_channels * cfg.channel_mult[0]
        blocks = [nnx.List([Conv2d(cfg.in_channels, ch, 3, **kw)])]
        attend_at = {cfg.image_size // r for r in cfg.attention_resolutions}
        ds = 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [ResBlock(ch, mult * cfg.model_channels, cfg=cfg, **kw)]
                ch = mult * cfg.model_channels
                if ds in attend_at:
                    layers.append(AttentionBlock(ch, cfg.heads(ch), cfg=cfg, attention_impl=attention_impl, **kw))
                blocks.append(nnx.List(layers))
            if level != len(cfg.channel_mult) - 1:
                if not cfg.resblock_updown:
                    raise ValueError("ADMEncoder supports resblock_updown=True only (the 256x256 uncond model's)")
                blocks.append(nnx.List([ResBlock(ch, ch, cfg=cfg, down=True, **kw)]))
                ds *= 2
        self.input_blocks = nnx.List(blocks)
        self.middle_block = nnx.List([
            ResBlock(ch, ch, cfg=cfg, **kw),
            AttentionBlock(ch, cfg.heads(ch), cfg=cfg, attention_impl=attention_impl, **kw),
            ResBlock(ch, ch, cfg=cfg, **kw)])

    def __call__(self, images, timesteps):
        timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (images.shape[0],))
        emb = timestep_embedding(timesteps, self.config.model_channels, flip_sin_to_cos=True, freq_shift=0)
        emb = self.time_embed[2](jax.nn.silu(self.time_embed[0](emb)))
        h = self.input_blocks[0][0](images)
        for block in list(self.input_blocks)[1:]:
            h = _run_block(block, h, emb)
        return _run_block(self.middle_block, h, emb)

    def features(self, images):
        """MFM: the middle-block output at t=0, mean-pooled over pixels, in float32: (B, out_channels)."""
        return self(images, 0).astype(jnp.float32).mean(axis=(1, 2))


def _run_block(layers, h, emb):
    for layer in layers:
        h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
    return h
