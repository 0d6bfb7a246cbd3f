"""Building blocks shared by the model ports (SD UNet and VAE, ADM, NAFNet; Flax NNX, NHWC).

Parameter names follow Flax (`kernel`, `scale`, `bias`) and attribute names follow
diffusers' module names, so a parameter's path in an NNX state reads as the diffusers
tensor name (`down_blocks.0.resnets.1.conv1.kernel` <-> `down_blocks.0.resnets.1.conv1.weight`).
Kernels are stored in Flax layout: Linear (in, out), Conv (kh, kw, in, out).

Every module takes `dtype`, the compute dtype of its activations; parameters stay in
`param_dtype` and are cast at use. Normalisations compute their statistics in float32.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dod_jax.errors import ConfigError

Dtype = jnp.dtype
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}  # as configs name them


class NumpyRngs:
    """An nnx.Rngs stand-in that draws initial values on the host with NumPy. Eager
    jax.random compiles a kernel for every new shape, which makes random initialisation of
    a whole model take tens of seconds on a CPU; NumPy takes milliseconds."""

    def __init__(self, seed: int):
        self.generator = np.random.default_rng(seed)

    def params(self):
        return self.generator


class FixedKeyRngs:
    """An nnx.Rngs stand-in for builds where the values cannot matter (shape-only builds under
    nnx.eval_shape): nnx.Rngs' bookkeeping under tracing grows with the trace."""

    def params(self):
        return jax.random.key(0)


def uniform_init(rngs, shape, bound, dtype):
    """U(-bound, bound) from `rngs.params()`: a jax key, or a NumPy Generator (NumpyRngs)."""
    source = rngs.params()
    if isinstance(source, np.random.Generator):
        return jnp.asarray(source.uniform(-bound, bound, shape), dtype)
    return jax.random.uniform(source, shape, dtype, -bound, bound)


def normal_init(rngs, shape, std, dtype):
    source = rngs.params()
    if isinstance(source, np.random.Generator):
        return jnp.asarray(source.standard_normal(shape) * std, dtype)
    return jax.random.normal(source, shape, dtype) * std


def kaiming_normal(rngs, shape, fan_in, dtype):
    """PyTorch's kaiming_normal_ (fan_in mode, ReLU gain): N(0, 2 / fan_in)."""
    return normal_init(rngs, shape, (2.0 / fan_in) ** 0.5, dtype)


def uniform_fan_in(rngs, shape, fan_in, dtype):
    # PyTorch's default init for Linear/Conv (kaiming_uniform with a=sqrt(5)) reduces
    # to U(-1/sqrt(fan_in), 1/sqrt(fan_in)); the same scale keeps random-weight models
    # numerically tame in both frameworks.
    return uniform_init(rngs, shape, 1.0 / np.sqrt(fan_in), dtype)


ADAPTERS = "adapters"


def is_key_batch(key) -> bool:
    """Whether `key` is one typed PRNG key per sample (shape (B,)) rather than a single key."""
    return jnp.issubdtype(key.dtype, jax.dtypes.prng_key) and key.ndim == 1


def normal_per_sample(key, shape, dtype=jnp.float32):
    """N(0, 1) noise of `shape` (B, ...). With one key per sample, sample i depends on keys[i]
    alone, so splitting a batch into micro-batches or shards draws the same noise."""
    if is_key_batch(key):
        if key.shape[0] != shape[0]:
            raise ValueError(f"{key.shape[0]} keys for a batch of {shape[0]}")
        return jax.vmap(lambda k: jax.random.normal(k, tuple(shape[1:]), dtype))(key)
    return jax.random.normal(key, shape, dtype)


def replacement_output(layer: nnx.Module, x):
    """The output of a selected adapter that replaces `layer`'s (dod_jax.adapters.TrainedCopy,
    LoRAExperts: `adapter.replace(layer, x)`), or None: then the layer computes with its own
    weights."""
    for adapter in getattr(layer, ADAPTERS, {}).values():
        if getattr(adapter, "replaces", False):
            out = adapter.replace(layer, x)
            if out is not None:
                return out
    return None


def batch_sharded(x):
    """`x` split on its first (batch) axis over every axis of the mesh in context, or `x` itself
    outside one. The training step traces under its mesh (jax.sharding.use_abstract_mesh), where
    every axis splits the batch. Applied to each layer's output, it stops an FSDP-sharded
    weight's channel split from spreading into the activations: the layer gathers its weight for
    its own use instead, and the activations stay split by sample."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(mesh.axis_names))


_COMPUTE_DTYPE: contextvars.ContextVar = contextvars.ContextVar("dod_jax_compute_dtype", default=None)


@contextlib.contextmanager
def computing_in(dtype):
    """Layers called inside compute in `dtype` instead of their own (None: their own), whatever
    their weights are stored in; read when a function is traced, so enter it inside the jitted
    function. One network can so run in two precisions, e.g. DOD's real score in bfloat16 and
    the generator in float32 on the same UNet (train.real_score_dtype)."""
    token = _COMPUTE_DTYPE.set(dtype)
    try:
        yield
    finally:
        _COMPUTE_DTYPE.reset(token)


def compute_dtype(own):
    """The dtype a layer computes in: `computing_in`'s, else its own."""
    return _COMPUTE_DTYPE.get() or own


def weight_at_use(weight, dtype):
    """A layer's weight for its computation: whole on every device of the mesh in context (an
    FSDP-sharded weight gathered just before its layer, in the dtype it is stored in: a base
    stored in bfloat16 moves half the bytes), then cast to the compute `dtype`; outside a mesh
    only the cast."""
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty:
        weight = jax.lax.with_sharding_constraint(weight, jax.sharding.PartitionSpec())
    return weight.astype(dtype)


def add_adapter_outputs(layer: nnx.Module, x, y):
    """y plus the outputs of the additive adapters hung on `layer` under ADAPTERS (see
    dod_jax.adapters); an adapter returns None when its set is not selected for this call."""
    for adapter in getattr(layer, ADAPTERS, {}).values():
        if getattr(adapter, "replaces", False):
            continue
        delta = adapter(x)
        if delta is not None:
            y = y + delta.astype(y.dtype)
    return y


class Linear(nnx.Module):
    def __init__(self, in_features: int, out_features: int, *, use_bias: bool = True,
                 dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        self.in_features, self.out_features = in_features, out_features
        self.dtype = dtype
        self.kernel = nnx.Param(uniform_fan_in(rngs, (in_features, out_features), in_features, param_dtype))
        self.bias = (nnx.Param(uniform_fan_in(rngs, (out_features,), in_features, param_dtype))
                     if use_bias else None)

    def __call__(self, x):
        replaced = replacement_output(self, x)
        if replaced is not None:
            return batch_sharded(replaced)
        dtype = compute_dtype(self.dtype)
        y = jnp.dot(x.astype(dtype), weight_at_use(self.kernel[...], dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(dtype)
        return batch_sharded(add_adapter_outputs(self, x, y))


# At most this many output positions per image, a convolution runs as one matrix product over
# its k*k shifted views of the input (im2col): XLA:CPU's convolutions are pathological on tiny
# images with many channels, which SD's UNet has at its inner levels on small crops (a 3x3
# convolution, 1280 channels, 2x2 positions, batch 4: 0.14 s forward and 0.29 s with its input
# gradient, against 2.3 and 5.2 ms as im2col; the backward pass reverses the kernel into copies
# and swaps operands into a slow layout). At 8x8 positions im2col is still faster, at 16x16
# even, at 32x32 and above slower (bench/conv_im2col.py; bench/results/README.md). Layers on a
# mesh of several devices keep XLA's convolution: with im2col the micro config's FSDP-8 stage-1
# step peaked at 1.04x the replicated step's bytes per device (0.87x with XLA's convolution),
# and the TPU and GPU compilers that sharded runs target have no such pathology.
IM2COL_MAX_POSITIONS = 64


def _shifted_views(x, k: int, stride: int, padding: int) -> list:
    """The k*k views of zero-padded NHWC `x` that a k x k convolution's taps read, row-major."""
    b, h, w, c = x.shape
    ho, wo = (h + 2 * padding - k) // stride + 1, (w + 2 * padding - k) // stride + 1
    padded = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    return [jax.lax.slice(padded, (0, i, j, 0), (b, i + stride * (ho - 1) + 1, j + stride * (wo - 1) + 1, c),
                          (1, stride, stride, 1)) for i in range(k) for j in range(k)]


def conv2d(x, kernel, stride: int, padding: int, im2col_max_positions: int = IM2COL_MAX_POSITIONS, groups: int = 1):
    """A 2D convolution of NHWC `x` with an HWIO `kernel` (I = input channels / `groups`),
    symmetric integer `padding`; ungrouped, as im2col where it has at most
    `im2col_max_positions` output positions per image; depthwise (one input and one output
    channel per group), as a sum of the k*k shifted views times their taps: XLA:CPU's grouped
    convolution takes 8-16x as long (a 3x3 one on 512 x 512 x 128: 0.79 s against 0.08 s,
    PyTorch 0.13 s; bench/results/README.md), and the sum is one elementwise fusion anywhere."""
    k, _, c, out = kernel.shape
    if k == 1 and stride == 1 and padding == 0 and groups == 1:
        return jnp.dot(x, kernel[0, 0])
    if groups > 1 and c == 1 and out == groups == x.shape[-1]:
        views = _shifted_views(x, k, stride, padding)
        return sum(view * kernel[i // k, i % k, 0] for i, view in enumerate(views))
    b, h, w, _ = x.shape
    ho, wo = (h + 2 * padding - k) // stride + 1, (w + 2 * padding - k) // stride + 1
    if ho * wo > im2col_max_positions or groups > 1:
        return jax.lax.conv_general_dilated(x, kernel, window_strides=(stride, stride),
                                            padding=((padding, padding), (padding, padding)),
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups)
    return jnp.concatenate(_shifted_views(x, k, stride, padding), axis=-1) @ kernel.reshape(k * k * c, -1)


class Conv2d(nnx.Module):
    """2D convolution on NHWC inputs with symmetric integer padding (PyTorch semantics);
    `groups` splits the channels as PyTorch's (in_channels = groups: depthwise)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, *, stride: int = 1,
                 padding: int | None = None, use_bias: bool = True, groups: int = 1,
                 dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"Conv2d: {in_channels} -> {out_channels} channels do not split into {groups} groups")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.stride = stride
        self.padding = kernel_size // 2 if padding is None else padding
        self.dtype = dtype
        fan_in = in_channels // groups * kernel_size * kernel_size
        self.kernel = nnx.Param(uniform_fan_in(
            rngs, (kernel_size, kernel_size, in_channels // groups, out_channels), fan_in, param_dtype))
        self.bias = nnx.Param(uniform_fan_in(rngs, (out_channels,), fan_in, param_dtype)) if use_bias else None

    def __call__(self, x):
        replaced = replacement_output(self, x)
        if replaced is not None:
            return batch_sharded(replaced)
        # im2col on one device only (IM2COL_MAX_POSITIONS); an empty mesh has size 0
        im2col = IM2COL_MAX_POSITIONS if jax.sharding.get_abstract_mesh().size <= 1 else 0
        dtype = compute_dtype(self.dtype)
        y = conv2d(x.astype(dtype), weight_at_use(self.kernel[...], dtype), self.stride, self.padding, im2col,
                   self.groups)
        if self.bias is not None:
            y = y + self.bias[...].astype(dtype)
        return batch_sharded(add_adapter_outputs(self, x, y))


class Activation(nnx.Module):
    """A parameter-free step of a PyTorch Sequential (keeps the others' indices as names)."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, x):
        return self.fn(x)


def gelu(x):
    return jax.nn.gelu(x, approximate=False)  # PyTorch's nn.GELU: the exact erf form


def _affine_norm_params(module, features: int, param_dtype: Dtype):
    module.scale = nnx.Param(jnp.ones((features,), param_dtype))
    module.bias = nnx.Param(jnp.zeros((features,), param_dtype))


class GroupNorm(nnx.Module):
    """GroupNorm over the channel axis of an (..., C) input; statistics in float32."""

    def __init__(self, num_groups: int, num_channels: int, *, eps: float,
                 dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32):
        if num_channels % num_groups:
            raise ValueError(f"GroupNorm: {num_channels} channels do not split into {num_groups} groups")
        self.num_groups, self.eps, self.dtype = num_groups, eps, dtype
        _affine_norm_params(self, num_channels, param_dtype)

    def __call__(self, x):
        shape = x.shape
        xg = x.astype(jnp.float32).reshape(shape[0], -1, self.num_groups, shape[-1] // self.num_groups)
        mean = jnp.mean(xg, axis=(1, 3), keepdims=True)
        var = jnp.mean(jnp.square(xg - mean), axis=(1, 3), keepdims=True)
        y = ((xg - mean) * jax.lax.rsqrt(var + self.eps)).reshape(shape)
        return (y * self.scale[...] + self.bias[...]).astype(compute_dtype(self.dtype))


class LayerNorm(nnx.Module):
    def __init__(self, features: int, *, eps: float = 1e-5,
                 dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32):
        self.eps, self.dtype = eps, dtype
        _affine_norm_params(self, features, param_dtype)

    def __call__(self, x):
        x = x.astype(jnp.float32)
        mean = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...] + self.bias[...]).astype(compute_dtype(self.dtype))


class ResnetBlock2D(nnx.Module):
    """GroupNorm-SiLU-conv twice, optional timestep injection, 1x1 shortcut when widths differ."""

    def __init__(self, in_channels: int, out_channels: int, *, temb_channels: int | None, groups: int,
                 eps: float, output_scale_factor: float = 1.0,
                 dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.norm1 = GroupNorm(groups, in_channels, eps=eps, **kw)
        self.conv1 = Conv2d(in_channels, out_channels, 3, rngs=rngs, **kw)
        self.time_emb_proj = Linear(temb_channels, out_channels, rngs=rngs, **kw) if temb_channels else None
        self.norm2 = GroupNorm(groups, out_channels, eps=eps, **kw)
        self.conv2 = Conv2d(out_channels, out_channels, 3, rngs=rngs, **kw)
        self.conv_shortcut = (Conv2d(in_channels, out_channels, 1, rngs=rngs, **kw)
                              if in_channels != out_channels else None)
        self.output_scale_factor = output_scale_factor

    def __call__(self, x, temb=None):
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(jax.nn.silu(temb))[:, None, None, :]
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        out = x.astype(h.dtype) + h
        return out if self.output_scale_factor == 1.0 else out / self.output_scale_factor


class Downsample2D(nnx.Module):
    """Stride-2 3x3 conv. padding=0 means diffusers' asymmetric (0, 1) right/bottom pad (the VAE)."""

    def __init__(self, channels: int, *, padding: int, dtype: Dtype = jnp.float32,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        self.asymmetric_pad = padding == 0
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=padding, rngs=rngs,
                           dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x):
        if self.asymmetric_pad:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return self.conv(x)


def resize_nearest(x, size: tuple[int, int]):
    """Nearest-neighbour resize of NHWC `x` to `size`, PyTorch's `mode="nearest"` rule
    (source index floor(dst * in / out))."""
    h, w = x.shape[1:3]
    oh, ow = size
    if (oh, ow) == (2 * h, 2 * w):
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    rows = (jnp.arange(oh) * h) // oh
    cols = (jnp.arange(ow) * w) // ow
    return x[:, rows][:, :, cols]


class Upsample2D(nnx.Module):
    def __init__(self, channels: int, *, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
                 rngs: nnx.Rngs):
        self.conv = Conv2d(channels, channels, 3, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x, size: tuple[int, int] | None = None):
        size = size or (2 * x.shape[1], 2 * x.shape[2])
        return self.conv(resize_nearest(x, size))


ATTENTION_IMPLEMENTATIONS = ("auto", "chunked", None, "xla", "cudnn")
QUERY_CHUNK = 256


def dot_product_attention(q, k, v, implementation: str | None = "auto"):
    """Softmax attention over (B, T, heads, head_dim) arrays with float32 logits.

    None, "xla" and "cudnn" go to jax.nn.dot_product_attention. "chunked" computes the exact
    softmax for QUERY_CHUNK queries at a time, so the (heads, T_q, T_k) logits never exist
    whole: on CPU, XLA's unfused attention is memory-bound on them, and the chunked form runs
    about 2.5x faster at 4096 tokens. "auto" picks "chunked" on CPU and jax's default elsewhere.
    """
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {implementation!r} is not one of {ATTENTION_IMPLEMENTATIONS}")
    if implementation == "auto":
        implementation = "chunked" if jax.default_backend() == "cpu" else None
    if implementation != "chunked" or q.shape[1] <= QUERY_CHUNK:
        return jax.nn.dot_product_attention(q, k, v, implementation=None if implementation == "chunked" else implementation)
    b, t, heads, dim = q.shape
    chunks = -(-t // QUERY_CHUNK)
    q = jnp.pad(q, ((0, 0), (0, chunks * QUERY_CHUNK - t), (0, 0), (0, 0)))
    q = q.reshape(b, chunks, QUERY_CHUNK, heads, dim).transpose(1, 0, 3, 2, 4)  # (chunks, B, H, Tq, D)
    k_t = k.transpose(0, 2, 3, 1)  # (B, H, D, Tk)
    v_h = v.transpose(0, 2, 1, 3)  # (B, H, Tk, D)

    def one_chunk(q_chunk):
        logits = jnp.matmul(q_chunk, k_t, preferred_element_type=jnp.float32) * jnp.float32(dim ** -0.5)
        probs = jax.nn.softmax(logits, axis=-1)
        return jnp.matmul(probs.astype(v.dtype), v_h)

    out = jax.lax.map(one_chunk, q)  # (chunks, B, H, QUERY_CHUNK, D)
    return out.transpose(1, 0, 3, 2, 4).reshape(b, chunks * QUERY_CHUNK, heads, dim)[:, :t]


class Attention(nnx.Module):
    """Multi-head attention over (B, T, C) tokens; `context` gives cross-attention keys/values.

    Logits and softmax are float32 whatever the compute dtype, which SD 2.x needs.
    `implementation` is one of ATTENTION_IMPLEMENTATIONS (see `dot_product_attention`).
    """

    def __init__(self, query_dim: int, heads: int, dim_head: int, *, context_dim: int | None = None,
                 qkv_bias: bool = False, implementation: str | None = "auto",
                 dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        inner = heads * dim_head
        context_dim = context_dim or query_dim
        self.heads, self.dim_head, self.implementation = heads, dim_head, implementation
        self.to_q = Linear(query_dim, inner, use_bias=qkv_bias, **kw)
        self.to_k = Linear(context_dim, inner, use_bias=qkv_bias, **kw)
        self.to_v = Linear(context_dim, inner, use_bias=qkv_bias, **kw)
        self.to_out = nnx.List([Linear(inner, query_dim, **kw)])

    def __call__(self, x, context=None):
        context = x if context is None else context
        b, t = x.shape[:2]
        split = lambda y: y.reshape(b, y.shape[1], self.heads, self.dim_head)
        q, k, v = split(self.to_q(x)), split(self.to_k(context)), split(self.to_v(context))
        out = dot_product_attention(q, k, v, self.implementation)
        return self.to_out[0](out.reshape(b, t, self.heads * self.dim_head))


class SpatialSelfAttention(Attention):
    """The VAE mid-block attention: GroupNorm, single-head self-attention over all pixels,
    residual add. diffusers keeps the norm inside the attention module as `group_norm`."""

    def __init__(self, channels: int, *, groups: int, eps: float, implementation: str | None = "auto",
                 dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        super().__init__(channels, 1, channels, qkv_bias=True, implementation=implementation,
                         dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.group_norm = GroupNorm(groups, channels, eps=eps, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x):
        b, h, w, c = x.shape
        tokens = self.group_norm(x).reshape(b, h * w, c)
        return x + super().__call__(tokens).reshape(b, h, w, c)


# What a rematerialised block keeps for its backward pass (the models' `remat`, train.remat):
# 'blocks' nothing (its whole forward runs again), 'dots' the outputs of its matmuls and
# convolutions (the rest, norms, activations and attention's softmax, runs again).
REMAT_POLICIES = {"blocks": None, "dots": jax.checkpoint_policies.dots_saveable}


def remat_mode(remat) -> str | None:
    """A remat setting as a REMAT_POLICIES name, or None for none: 'none' and False are none,
    True is 'blocks' (the setting was a bool before the policies)."""
    if remat in (False, None, "none"):
        return None
    if remat is True:
        return "blocks"
    if remat not in REMAT_POLICIES:
        raise ConfigError(f"remat must be 'none' or one of {sorted(REMAT_POLICIES)}, got {remat!r}")
    return remat


def call_maybe_remat(remat: str | None, fn: Callable, module: nnx.Module, *args):
    """Call `fn(module, *args)`, rematerialised in the backward pass with policy `remat` (a
    remat_mode result). Non-array arguments must be closed over in `fn`, and `fn` must not
    change the module's state (a block's forward does not). The block runs as a pure function
    of its state under jax.checkpoint: nnx.remat writes its state back into the module's
    Variables, which the training step creates in an outer trace (the jitted step) and reads
    under jax.grad, and NNX refuses that write ("Cannot mutate Param from a different trace
    level")."""
    if remat is None:
        return fn(module, *args)
    graphdef, state = nnx.split(module)
    return jax.checkpoint(lambda state, *args: fn(nnx.merge(graphdef, state), *args),
                          policy=REMAT_POLICIES[remat])(state, *args)


def as_tuple(value, n: int, name: str) -> tuple:
    """A per-block config value given either once or per block (diffusers allows both)."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"config {name!r} has {len(value)} entries for {n} blocks")
        return tuple(value)
    return (value,) * n

