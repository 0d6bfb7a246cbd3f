"""HDE: the detail enhancement modules (DEMs) that stand before the VAE decoder's up-blocks.

    F_m = F_d + w * ResBlock(C->C)(RRDB(ResBlock(2C->C)([SkipConv(F_e), F_d])))

F_d is the decoder feature entering an up-block, F_e the matching encoder skip feature (the
encoder's down-block inputs, deepest first), SkipConv a bias-free 1x1 conv, w a learnable
scalar. RRDB is ESRGAN's residual-in-residual dense block.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dod_jax.models.layers import Conv2d, ResnetBlock2D, kaiming_normal

RESIDUAL_SCALE = 0.2  # ESRGAN's scale of dense-block and RRDB residuals


ESRGAN_INIT_SCALE = 0.1  # init 'official': the dense-block convs Kaiming-normal times 0.1, biases 0


class DenseBlock(nnx.Module):
    """ESRGAN's RDB: five 3x3 convs, each seeing the input and all earlier outputs. `official_init`:
    the convs initialised as ESRGAN's (Kaiming-normal times 0.1, biases 0), else PyTorch's default."""

    def __init__(self, channels: int, growth: int, *, official_init: bool = True, dtype, param_dtype,
                 rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.convs = nnx.List([Conv2d(channels + i * growth, growth if i < 4 else channels, 3, **kw) for i in range(5)])
        if official_init:
            for conv in self.convs:
                shape = conv.kernel.shape  # (3, 3, in, out)
                fan_in = shape[0] * shape[1] * shape[2]
                conv.kernel.set_value(kaiming_normal(rngs, shape, fan_in, param_dtype) * ESRGAN_INIT_SCALE)
                conv.bias.set_value(jnp.zeros_like(conv.bias[...]))

    def __call__(self, x):
        features = [x]
        for conv in list(self.convs)[:-1]:
            features.append(jax.nn.leaky_relu(conv(jnp.concatenate(features, axis=-1)), 0.2))
        return x + RESIDUAL_SCALE * self.convs[-1](jnp.concatenate(features, axis=-1))


class RRDB(nnx.Module):
    def __init__(self, channels: int, growth: int = 32, *, official_init: bool = True, dtype, param_dtype,
                 rngs: nnx.Rngs):
        self.blocks = nnx.List([DenseBlock(channels, growth, official_init=official_init, dtype=dtype,
                                           param_dtype=param_dtype, rngs=rngs) for _ in range(3)])

    def __call__(self, x):
        h = x
        for block in self.blocks:
            h = block(h)
        return x + RESIDUAL_SCALE * h


class DEM(nnx.Module):
    def __init__(self, skip_channels: int, channels: int, *, skip_init: float, w_init: float, growth: int = 32,
                 groups: int = 32, official_init: bool = True, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.skip_conv = Conv2d(skip_channels, channels, 1, use_bias=False, rngs=rngs, **kw)
        self.skip_conv.kernel.set_value(jnp.full(self.skip_conv.kernel.shape, skip_init, param_dtype))
        block = dict(temb_channels=None, groups=groups, eps=1e-6, rngs=rngs, **kw)
        self.fuse = ResnetBlock2D(2 * channels, channels, **block)
        self.rrdb = RRDB(channels, growth, official_init=official_init, rngs=rngs, **kw)
        self.out = ResnetBlock2D(channels, channels, **block)
        self.w = nnx.Param(jnp.asarray(w_init, param_dtype))

    def __call__(self, decoder_feature, skip_feature):
        x = jnp.concatenate([self.skip_conv(skip_feature).astype(decoder_feature.dtype), decoder_feature], axis=-1)
        out = self.out(self.rrdb(self.fuse(x)))
        return decoder_feature + self.w[...].astype(out.dtype) * out


class HDE(nnx.Module):
    """One DEM per decoder up-block. `skip_channels` and `channels` are listed in decoder order
    (deepest first): SD's VAE gives skips 512, 256, 128, 128 and up-block inputs 512, 512, 512, 256."""

    def __init__(self, skip_channels, channels, *, skip_init: float = 1e-5, w_init: float = 1.0, growth: int = 32,
                 groups: int = 32, official_init: bool = True, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.dems = nnx.List([DEM(s, c, skip_init=skip_init, w_init=w_init, growth=growth, groups=groups,
                                  official_init=official_init, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                              for s, c in zip(skip_channels, channels)])

    def hook(self, encoder_skips):
        """The decoder's `before_up_block` callable for one image batch; `encoder_skips` as the
        VAE encoder returns them (shallowest first)."""
        deepest_first = list(encoder_skips)[::-1]
        return lambda i, h: self.dems[i](h, deepest_first[i])
