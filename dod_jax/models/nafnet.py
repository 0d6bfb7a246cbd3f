"""NAFNet (Chen et al. 2022) with the degradation-aware modulation (DAM) heads LoRA-IR puts on
its encoder stages and middle (../shared/LORA_IR.md, section 2), in Flax NNX, NHWC.

    x = intro(pad16(LQ)); e_d = intro_de(e)              e: a (B, embed_dim) degradation embedding
    encoder stage s: x = DAM(x, e_d), NAFBlocks; skip; x = down(x)   (conv 2x2, stride 2, c -> 2c)
    middle: DAM, NAFBlocks
    decoder step: x = up(x) (conv 1x1 c -> 2c, no bias, pixel shuffle 2) + skip; NAFBlocks
    out = ending(x) + pad16(LQ), cropped to the input's size

NAFBlock(c): x = LN(inp); conv1 1x1 c -> 2c; conv2 depthwise 3x3; SimpleGate; x * SCA(x) with
SCA = average pool + conv 1x1; conv3 1x1; y = inp + beta x; x = conv5(SimpleGate(conv4(LN(y))));
out = y + gamma x (beta, gamma zero at initialisation). DAM(c): m = sigmoid(conv4(relu(conv3(
conv2(gelu(conv1(e_d))))))) with 1x1 convs embed -> 128 -> c -> c/16 -> c, x + beta (LN(x) m).
LN normalises each pixel over its channels (eps 1e-6). Attribute names follow the authors'
PyTorch modules (`encoders.3.blocks.27.sca.1`, `ups.0.0`, `intro_de.2`), so an NNX path reads
as their state-dict name.

The SCA's average pool is global (what LoRA-IR's code does for its training crops and for a
first test image), or with `tlc=(train_size, base_size)` NAFNet-TLC's local pooling: each
pool averages a window of base_size / train_size times the feature size the layer has at
train_size crops (edge windows replicated), global where the window covers the feature.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dod_jax.models.layers import Activation, Conv2d, LayerNorm, gelu

NORM_EPS = 1e-6
PAD_MULTIPLE = 16  # the input is zero-padded right and bottom to a multiple of this


def simple_gate(x):
    a, b = jnp.split(x, 2, axis=-1)
    return a * b


def pixel_shuffle(x, r: int = 2):
    """PyTorch's PixelShuffle on NHWC: channel c*r*r + i*r + j goes to pixel (r h + i, r w + j)."""
    b, h, w, c = x.shape
    x = x.reshape(b, h, w, c // (r * r), r, r).transpose(0, 1, 4, 2, 5, 3)
    return x.reshape(b, h * r, w * r, c // (r * r))


def local_average(x, window: tuple[int, int]):
    """NAFNet-TLC's pooling: the mean of each window (kh, kw) that fits inside the feature
    (from a summed-area table), the result replicated at the edges back to the feature's size;
    the global mean when the window covers the whole feature."""
    b, h, w, c = x.shape
    kh, kw = window
    if kh >= h and kw >= w:
        return jnp.mean(x, axis=(1, 2), keepdims=True)
    kh, kw = min(h, kh), min(w, kw)
    table = jnp.pad(jnp.cumsum(jnp.cumsum(x, axis=1), axis=2), ((0, 0), (1, 0), (1, 0), (0, 0)))
    sums = table[:, kh:, kw:] + table[:, :-kh, :-kw] - table[:, kh:, :-kw] - table[:, :-kh, kw:]
    mean = sums / (kh * kw)
    oh, ow = mean.shape[1:3]
    return jnp.pad(mean, ((0, 0), ((h - oh) // 2, (h - oh + 1) // 2), ((w - ow) // 2, (w - ow + 1) // 2), (0, 0)),
                   mode="edge")


class AveragePool(nnx.Module):
    """The SCA's pooling (module docstring): global, or TLC windows fixed for this layer."""

    def __init__(self, window: tuple[int, int] | None = None):
        self.window = window

    def __call__(self, x):
        if self.window is None:
            return jnp.mean(x, axis=(1, 2), keepdims=True)
        return local_average(x, self.window)


class NAFBlock(nnx.Module):
    def __init__(self, c: int, *, pool_window, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        dw = 2 * c
        self.norm1 = LayerNorm(c, eps=NORM_EPS, dtype=dtype, param_dtype=param_dtype)
        self.conv1 = Conv2d(c, dw, 1, padding=0, **kw)
        self.conv2 = Conv2d(dw, dw, 3, padding=1, groups=dw, **kw)
        self.sca = nnx.List([AveragePool(pool_window), Conv2d(dw // 2, dw // 2, 1, padding=0, **kw)])
        self.conv3 = Conv2d(dw // 2, c, 1, padding=0, **kw)
        self.norm2 = LayerNorm(c, eps=NORM_EPS, dtype=dtype, param_dtype=param_dtype)
        self.conv4 = Conv2d(c, 2 * c, 1, padding=0, **kw)
        self.conv5 = Conv2d(c, c, 1, padding=0, **kw)
        self.beta = nnx.Param(jnp.zeros((c,), param_dtype))
        self.gamma = nnx.Param(jnp.zeros((c,), param_dtype))

    def __call__(self, inp):
        x = simple_gate(self.conv2(self.conv1(self.norm1(inp))))
        x = self.conv3(x * self.sca[1](self.sca[0](x)))
        y = inp + x * self.beta[...].astype(x.dtype)
        x = self.conv5(simple_gate(self.conv4(self.norm2(y))))
        return y + x * self.gamma[...].astype(x.dtype)


class Stage(nnx.Module):
    """NAFBlocks, with a DAM head before them when `embed_dim` is given (encoder stages and the
    middle; the decoder's stages have none)."""

    def __init__(self, c: int, blocks: int, *, embed_dim: int | None, hidden: int, pool_window, dtype,
                 param_dtype, rngs):
        kw = dict(padding=0, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.modulated = embed_dim is not None
        if self.modulated:
            self.conv1 = Conv2d(embed_dim, hidden, 1, **kw)
            self.conv2 = Conv2d(hidden, c, 1, **kw)
            self.conv3 = Conv2d(c, c // 16, 1, **kw)
            self.conv4 = Conv2d(c // 16, c, 1, **kw)
            self.norm = LayerNorm(c, eps=NORM_EPS, dtype=dtype, param_dtype=param_dtype)
            self.beta = nnx.Param(jnp.zeros((c,), param_dtype))
        self.blocks = nnx.List([NAFBlock(c, pool_window=pool_window, dtype=dtype, param_dtype=param_dtype,
                                         rngs=rngs) for _ in range(blocks)])

    def __call__(self, x, e_d=None, *, scan: bool = False):
        if self.modulated:
            m = jax.nn.sigmoid(self.conv4(jax.nn.relu(self.conv3(self.conv2(gelu(self.conv1(e_d)))))))
            x = x + self.beta[...].astype(x.dtype) * (self.norm(x) * m)
        if scan and len(self.blocks) > 1:
            return scanned(self.blocks, x)
        for block in self.blocks:
            x = block(x)
        return x


def scanned(blocks, x):
    """x through `blocks` (modules of one structure) in turn, as one lax.scan over their
    parameters stacked at call time. For gradients: unrolled, XLA:CPU fuses the backward pass's
    residual-gradient sums of all later blocks into each block's weight-gradient transposes (work
    quadratic in depth: 28 NAFBlocks of 512 channels on (4, 16, 16), 17 s a gradient, 3 s
    scanned; TPU compiles the unrolled chain linearly) and compiles every block anew (67 s
    against 6). The stacking copies the parameters once a call, so restore keeps the loop."""
    graphdefs, states = zip(*(nnx.split(block) for block in blocks))
    graphdef = graphdefs[0]
    if any(other != graphdef for other in graphdefs[1:]):
        raise ValueError(f"scanned: {type(blocks[0]).__name__}s of different structures cannot be stacked")
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)
    return jax.lax.scan(lambda h, state: (nnx.merge(graphdef, state)(h), None), x, stacked)[0]


class NAFNetDAM(nnx.Module):
    """LoRA-IR's restorer: `width` 64, `enc_blocks` (1, 1, 1, 28), `middle_blocks` 1,
    `dec_blocks` (1, 1, 1, 1), a 384-d degradation embedding, DAM hidden width 128.
    `tlc`: None (global SCA pooling) or (train_size, base_size) for NAFNet-TLC's local pooling.
    Call with LQ images (B, H, W, 3) and embeddings (B, embed_dim)."""

    def __init__(self, *, width: int = 64, enc_blocks=(1, 1, 1, 28), middle_blocks: int = 1,
                 dec_blocks=(1, 1, 1, 1), embed_dim: int = 384, dam_hidden: int = 128, in_channels: int = 3,
                 tlc: tuple[int, int] | None = None, dtype=jnp.float32, param_dtype=jnp.float32, rngs):
        if len(dec_blocks) != len(enc_blocks):
            raise ValueError(f"NAFNet needs as many decoder as encoder stages, got {dec_blocks} and {enc_blocks}")
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)

        def window(scale: int):  # the TLC window of a layer whose feature is train_size / scale
            if tlc is None:
                return None
            train_size, base_size = tlc
            side = train_size // scale * base_size // train_size
            return (side, side)

        stage = dict(embed_dim=embed_dim, hidden=dam_hidden, **kw)
        self.intro = Conv2d(in_channels, width, 3, padding=1, **kw)
        self.intro_de = nnx.List([Conv2d(embed_dim, embed_dim, 1, padding=0, **kw), Activation(gelu),
                                  Conv2d(embed_dim, embed_dim, 1, padding=0, **kw), Activation(gelu)])
        encoders, downs, c = [], [], width
        for i, n in enumerate(enc_blocks):
            encoders.append(Stage(c, n, pool_window=window(2 ** i), **stage))
            downs.append(Conv2d(c, 2 * c, 2, stride=2, padding=0, **kw))
            c *= 2
        self.encoders, self.downs = nnx.List(encoders), nnx.List(downs)
        self.middle_blks = Stage(c, middle_blocks, pool_window=window(2 ** len(enc_blocks)), **stage)
        decoders, ups = [], []
        for i, n in enumerate(dec_blocks):
            ups.append(nnx.List([Conv2d(c, 2 * c, 1, padding=0, use_bias=False, **kw), Activation(pixel_shuffle)]))
            c //= 2
            scale = 2 ** (len(dec_blocks) - 1 - i)
            decoders.append(Stage(c, n, embed_dim=None, hidden=dam_hidden, pool_window=window(scale), **kw))
        self.ups, self.decoders = nnx.List(ups), nnx.List(decoders)
        self.ending = Conv2d(width, in_channels, 3, padding=1, **kw)

    def __call__(self, lq, embedding, *, scan: bool = False):
        """`scan`: each stage's blocks as one lax.scan (`scanned`: for training; same values)."""
        b, h, w, _ = lq.shape
        padded = jnp.pad(lq, ((0, 0), (0, -h % PAD_MULTIPLE), (0, -w % PAD_MULTIPLE), (0, 0)))
        e_d = embedding[:, None, None, :]
        for layer in self.intro_de:
            e_d = layer(e_d)
        x, skips = self.intro(padded), []
        for encoder, down in zip(self.encoders, self.downs):
            x = encoder(x, e_d, scan=scan)
            skips.append(x)
            x = down(x)
        x = self.middle_blks(x, e_d, scan=scan)
        for decoder, up, skip in zip(self.decoders, self.ups, skips[::-1]):
            x = decoder(up[1](up[0](x)) + skip, scan=scan)
        return (self.ending(x) + padded)[:, :h, :w]
