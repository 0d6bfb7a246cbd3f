"""Stable Diffusion's AutoencoderKL in Flax NNX.

Layout: images are NHWC (B, H, W, 3) in [-1, 1]; latents are NHWC (B, H/8, W/8, 4) for the
SD configs (one factor 2 per down block after the first). `encode` returns the posterior
(unscaled; multiply a sample by `config.scaling_factor` for the UNet) and, on request, the
encoder's down-block inputs; `decode` takes an optional callable run before each up-block.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
from flax import nnx, struct

from dod_jax.models.config import check_config
from dod_jax.models.layers import (Conv2d, Downsample2D, GroupNorm, ResnetBlock2D, SpatialSelfAttention,
                                   Upsample2D, call_maybe_remat, normal_per_sample, remat_mode)

VAE_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    # Kept for round trips only.
    sample_size: int | None = None
    force_upcast: bool = True

    _READ = {"in_channels", "out_channels", "block_out_channels", "layers_per_block", "latent_channels",
             "norm_num_groups", "scaling_factor", "use_quant_conv", "use_post_quant_conv",
             "mid_block_add_attention", "sample_size", "force_upcast"}
    _FIXED = {"act_fn": ("silu",), "shift_factor": (None,), "latents_mean": (None,), "latents_std": (None,)}

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> "VAEConfig":
        n = len(config.get("block_out_channels", cls.block_out_channels))
        fixed = dict(cls._FIXED, down_block_types=(["DownEncoderBlock2D"] * n, ("DownEncoderBlock2D",) * n),
                     up_block_types=(["UpDecoderBlock2D"] * n, ("UpDecoderBlock2D",) * n))
        check_config(config, read=cls._READ, ignored=set(), fixed=fixed, what="AutoencoderKL")
        values = {k: config[k] for k in cls._READ if k in config}
        if "block_out_channels" in values:
            values["block_out_channels"] = tuple(values["block_out_channels"])
        return cls(**values)

    def to_diffusers(self) -> dict:
        n = len(self.block_out_channels)
        out = {"_class_name": "AutoencoderKL", "act_fn": "silu",
               "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n}
        out.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self)})
        out["block_out_channels"] = list(self.block_out_channels)
        return out

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


@struct.dataclass
class DiagonalGaussian:
    """The VAE posterior; logvar is clamped to [-30, 20] as in diffusers."""
    mean: jax.Array
    logvar: jax.Array

    @classmethod
    def from_moments(cls, moments):
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return cls(mean, jnp.clip(logvar, -30.0, 20.0))

    @property
    def std(self):
        return jnp.exp(0.5 * self.logvar)

    def sample(self, key):
        """A draw from the posterior; `key` is one key, or one key per sample."""
        return self.mean + self.std * normal_per_sample(key, self.mean.shape, self.mean.dtype)

    def mode(self):
        return self.mean


class MidBlock(nnx.Module):
    def __init__(self, ch, *, groups, add_attention, attention_impl, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resnets = nnx.List([ResnetBlock2D(ch, ch, temb_channels=None, groups=groups, eps=VAE_EPS, **kw)
                                 for _ in range(2)])
        self.attentions = nnx.List([SpatialSelfAttention(ch, groups=groups, eps=VAE_EPS,
                                                         implementation=attention_impl, **kw)]
                                   ) if add_attention else None

    def __call__(self, x):
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class EncoderBlock(nnx.Module):
    """DownEncoderBlock2D."""

    def __init__(self, in_ch, out_ch, *, n_layers, groups, add_downsample, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resnets = nnx.List([ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, temb_channels=None,
                                               groups=groups, eps=VAE_EPS, **kw) for i in range(n_layers)])
        self.downsamplers = nnx.List([Downsample2D(out_ch, padding=0, **kw)]) if add_downsample else None

    def __call__(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class DecoderBlock(nnx.Module):
    """UpDecoderBlock2D."""

    def __init__(self, in_ch, out_ch, *, n_layers, groups, add_upsample, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resnets = nnx.List([ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, temb_channels=None,
                                               groups=groups, eps=VAE_EPS, **kw) for i in range(n_layers)])
        self.upsamplers = nnx.List([Upsample2D(out_ch, **kw)]) if add_upsample else None

    def __call__(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class Encoder(nnx.Module):
    def __init__(self, cfg: VAEConfig, *, remat, attention_impl, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        ch, g = cfg.block_out_channels, cfg.norm_num_groups
        self.remat = remat_mode(remat)
        self.conv_in = Conv2d(cfg.in_channels, ch[0], 3, **kw)
        self.down_blocks = nnx.List([
            EncoderBlock(ch[max(i - 1, 0)], ch[i], n_layers=cfg.layers_per_block, groups=g,
                         add_downsample=i < len(ch) - 1, **kw) for i in range(len(ch))])
        self.mid_block = MidBlock(ch[-1], groups=g, add_attention=cfg.mid_block_add_attention,
                                  attention_impl=attention_impl, **kw)
        self.conv_norm_out = GroupNorm(g, ch[-1], eps=VAE_EPS, dtype=dtype, param_dtype=param_dtype)
        self.conv_out = Conv2d(ch[-1], 2 * cfg.latent_channels, 3, **kw)

    def __call__(self, x):
        """Returns the moments (mean and logvar, concatenated on channels) and the input of
        every down block, shallowest first."""
        x = self.conv_in(x)
        block_inputs = []
        for block in self.down_blocks:
            block_inputs.append(x)
            x = call_maybe_remat(self.remat, lambda m, h: m(h), block, x)
        x = call_maybe_remat(self.remat, lambda m, h: m(h), self.mid_block, x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x))), block_inputs


class Decoder(nnx.Module):
    def __init__(self, cfg: VAEConfig, *, remat, attention_impl, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        rev, g = cfg.block_out_channels[::-1], cfg.norm_num_groups
        self.remat = remat_mode(remat)
        self.conv_in = Conv2d(cfg.latent_channels, rev[0], 3, **kw)
        self.mid_block = MidBlock(rev[0], groups=g, add_attention=cfg.mid_block_add_attention,
                                  attention_impl=attention_impl, **kw)
        self.up_blocks = nnx.List([
            DecoderBlock(rev[max(i - 1, 0)], rev[i], n_layers=cfg.layers_per_block + 1, groups=g,
                         add_upsample=i < len(rev) - 1, **kw) for i in range(len(rev))])
        self.conv_norm_out = GroupNorm(g, rev[-1], eps=VAE_EPS, dtype=dtype, param_dtype=param_dtype)
        self.conv_out = Conv2d(rev[-1], cfg.out_channels, 3, **kw)

    def __call__(self, z, before_up_block: Callable[[int, jax.Array], jax.Array] | None = None):
        x = self.conv_in(z)
        x = call_maybe_remat(self.remat, lambda m, h: m(h), self.mid_block, x)
        for i, block in enumerate(self.up_blocks):
            if before_up_block is not None:
                x = before_up_block(i, x)
            x = call_maybe_remat(self.remat, lambda m, h: m(h), block, x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class AutoencoderKL(nnx.Module):
    """dtype: compute dtype; param_dtype: storage dtype; remat: per encoder/decoder block, as
    UNet2DCondition's."""

    def __init__(self, config: VAEConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, remat: bool | str = False,
                 attention_impl: str | None = "auto", rngs: nnx.Rngs):
        kw = dict(remat=remat, attention_impl=attention_impl, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.config, self.dtype = config, dtype
        lc = config.latent_channels
        self.encoder = Encoder(config, **kw)
        self.decoder = Decoder(config, **kw)
        conv_kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.quant_conv = Conv2d(2 * lc, 2 * lc, 1, **conv_kw) if config.use_quant_conv else None
        self.post_quant_conv = Conv2d(lc, lc, 1, **conv_kw) if config.use_post_quant_conv else None

    def encode(self, images, *, return_skips: bool = False):
        """images (B, H, W, C) in [-1, 1] -> DiagonalGaussian in float32 [, down-block inputs]."""
        moments, block_inputs = self.encoder(images.astype(self.dtype))
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        posterior = DiagonalGaussian.from_moments(moments.astype(jnp.float32))
        return (posterior, block_inputs) if return_skips else posterior

    def decode(self, latents, *, before_up_block: Callable[[int, jax.Array], jax.Array] | None = None):
        """Unscaled latents (B, h, w, latent_channels) -> images (B, H, W, C) in the compute dtype.
        `before_up_block(i, features)` returns the features that enter up block i."""
        z = latents.astype(self.dtype)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z, before_up_block)
