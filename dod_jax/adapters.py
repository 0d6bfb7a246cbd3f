"""LoRA, conditional LoRA (CLoRA) and routed low-rank experts for the Linear and Conv2d layers
of any dod_jax model.

    plain        h = W0 x + s * B(A x)
    conditional  h = W0 x + s * B(gamma * (A x) + beta)      gamma, beta in R^r per image
    experts      h = W0 x + sum_e w_e (dW_e x)                w (E,) routing weights per image

with s = alpha / r, A Gaussian (std 1/r, PEFT's "gaussian") and B zero at initialisation. For a conv layer A is a
conv with the layer's own kernel size, stride and padding producing r channels, and B a 1x1
conv. gamma = 1 + dgamma by default (identity FiLM at init, so CLoRA starts as plain LoRA);
`literal_gamma=True` uses the conditioning output as gamma itself, as the paper writes it.

Adapters hang on their layer under `layer.adapters[set_name]`, so the frozen base weights
exist once and keep their diffusers names, while several named sets (DOD's generator CLoRA,
the DMD fake score's LoRA) live side by side. A set is active only inside `select(name, ...)`,
which carries what its adapters read per image: FiLM rows for a conditional set, routing
weights for experts; outside any selection the model is the plain base model. The selection is read when a
function is traced, so select inside the jitted function.

Targets are data: a layer is adapted when its dotted path equals a target or ends with
"." + target (PEFT's rule), e.g. "to_out.0", "ff.net.0.proj", "conv".
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from dod_jax.models.layers import (ADAPTERS, Conv2d, Linear, compute_dtype, conv2d, normal_init, uniform_fan_in,
                                    weight_at_use)

# Adapters are trained: their weights are float32 whatever the layer they hang on stores (a
# base stored in bfloat16, base.dtype); they compute in the layer's dtype.
TRAINED_DTYPE = jnp.float32


@dataclasses.dataclass(frozen=True)
class _Selection:
    name: str | None = None
    film: jax.Array | None = None     # (num_film_keys, B, 2r): per key and image, [gamma-part, beta]
    routing: jax.Array | None = None  # (B, experts): per image, the experts' weights


_SELECTED: contextvars.ContextVar[_Selection] = contextvars.ContextVar("dod_jax_adapter_selection",
                                                                      default=_Selection())


@contextlib.contextmanager
def select(name: str | None, film: jax.Array | None = None, routing: jax.Array | None = None):
    """Run the model with adapter set `name` active (None: base model only). Conditional sets
    need `film`, M_theta's output of shape (num_film_keys, B, 2r); experts need `routing`, the
    weights of shape (B, experts) (`top_k_routing`)."""
    token = _SELECTED.set(_Selection(name, film, routing))
    try:
        yield
    finally:
        _SELECTED.reset(token)


def top_k_routing(logits, k: int):
    """(B, experts) weights from a router's logits: a softmax over the `k` largest of each row,
    the other experts 0 (LoRA-IR's renormalised top-k; with k = 1 the chosen expert weighs 1)."""
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jax.nn.softmax(jnp.where(logits >= kth, logits, -jnp.inf), axis=-1)


def split_film(film_row, literal_gamma: bool):
    """(B, 2r) -> gamma, beta, each (B, r)."""
    g, beta = jnp.split(film_row, 2, axis=-1)
    return (g if literal_gamma else 1.0 + g), beta


class LoRA(nnx.Module):
    """The low-rank branch of one layer; `film_key` set makes it conditional (CLoRA)."""

    def __init__(self, layer: Linear | Conv2d, set_name: str, rank: int, alpha: float, *,
                 film_key: int | None, literal_gamma: bool, rngs):
        if getattr(layer, "groups", 1) != 1:
            raise ValueError(f"adapter set {set_name!r}: LoRA's A convolution cannot fold into a grouped "
                             "convolution; routed experts can (AdapterSpec.experts)")
        kw = dict(use_bias=False, dtype=layer.dtype, param_dtype=TRAINED_DTYPE, rngs=rngs)
        if isinstance(layer, Linear):
            self.lora_A = Linear(layer.in_features, rank, **kw)
            self.lora_B = Linear(rank, layer.out_features, **kw)
        else:
            k = layer.kernel.shape[0]
            self.lora_A = Conv2d(layer.in_channels, rank, k, stride=layer.stride, padding=layer.padding, **kw)
            self.lora_B = Conv2d(rank, layer.out_channels, 1, **kw)
        a = self.lora_A.kernel
        a.set_value(normal_init(rngs, a.shape, 1.0 / rank, a.dtype))
        self.lora_B.kernel.set_value(jnp.zeros_like(self.lora_B.kernel[...]))
        self.set_name, self.rank, self.scale = set_name, rank, alpha / rank
        self.film_key, self.literal_gamma = film_key, literal_gamma

    def __call__(self, x):
        selection = _SELECTED.get()
        if selection.name != self.set_name:
            return None
        h = self.lora_A(x)
        if self.film_key is not None:
            if selection.film is None:
                raise ValueError(f"adapter set {self.set_name!r} is conditional: select it with its film")
            gamma, beta = split_film(selection.film[self.film_key], self.literal_gamma)
            per_image = (h.shape[0],) + (1,) * (h.ndim - 2) + (self.rank,)
            h = h * gamma.reshape(per_image).astype(h.dtype) + beta.reshape(per_image).astype(h.dtype)
        return self.lora_B(h) * self.scale

    def folded(self, film=None):
        """(kernel delta in the layer's layout, bias delta or None) for folding into W0. A
        conditional branch folds for one image: `film` of shape (num_film_keys, 1, 2r)."""
        a, b = self.lora_A.kernel[...], self.lora_B.kernel[...]
        b = b.reshape(self.rank, -1)  # a 1x1 conv kernel (1, 1, r, out) is a (r, out) matrix
        if self.film_key is None:
            return jnp.einsum("...r,ro->...o", a, b) * self.scale, None
        if film is None or film.shape[1] != 1:
            raise ValueError(f"adapter set {self.set_name!r} is conditional: it folds for one image at a time "
                             f"(film of shape (keys, 1, 2r)), got {None if film is None else film.shape}")
        gamma, beta = split_film(film[self.film_key, 0], self.literal_gamma)
        return jnp.einsum("...r,r,ro->...o", a, gamma, b) * self.scale, (beta @ b) * self.scale

    def merge_into(self, layer, film=None, routing=None):
        _add_to_weights(layer, *self.folded(film))


def _add_to_weights(layer, kernel_delta, bias_delta):
    """W0 + the folded update, b0 + its bias part (a bias is added where W0 had none)."""
    layer.kernel.set_value(layer.kernel[...] + kernel_delta.astype(layer.kernel.dtype))
    if bias_delta is not None:
        if layer.bias is None:
            layer.bias = nnx.data(nnx.Param(jnp.zeros(bias_delta.shape, layer.kernel.dtype)))
        layer.bias.set_value(layer.bias[...] + bias_delta.astype(layer.bias.dtype))


class LoRAExperts(nnx.Module):
    """`experts` low-rank updates of one layer mixed per image by routing weights (LoRA-IR's
    experts, loralib's layout): expert e's update of the PyTorch-layout weight (out, in / g, k, k)
    of a convolution of g groups is (B_e @ A_e).reshape(out, in / g, k, k) * alpha / rank, with
    A (E, rank*k, in*k) and B (E, out/g*k, rank*k) (a Linear: k = g = 1, weight (out, in)). A is
    drawn as PyTorch's kaiming_uniform(a=sqrt(5)), B is zero. While selected it replaces the
    layer's output with conv(x, W0 + sum_e w_e dW_e) + b0: one convolution per image with its
    mixed weights (the authors' code merges so at batch 1), not W0's and the update's apart;
    a batch through a k x k (k > 1) ungrouped convolution mixes outputs instead (_mixed_outputs)."""

    replaces = True  # models.layers calls `replace(layer, x)` instead of adding an output

    def __init__(self, layer: Linear | Conv2d, set_name: str, experts: int, rank: int, alpha: float, *, rngs):
        self.linear = isinstance(layer, Linear)
        self.groups = 1 if self.linear else layer.groups
        if self.linear:
            k, cin, cout = 1, layer.in_features, layer.out_features
        else:
            k, cin, cout = layer.kernel.shape[0], layer.in_channels, layer.out_channels
            self.stride, self.padding = layer.stride, layer.padding
        self.lora_A = nnx.Param(uniform_fan_in(rngs, (experts, rank * k, cin * k), cin * k, TRAINED_DTYPE))
        self.lora_B = nnx.Param(jnp.zeros((experts, cout // self.groups * k, rank * k), TRAINED_DTYPE))
        self.set_name, self.experts, self.rank, self.scale = set_name, experts, rank, alpha / rank
        self.kernel_size, self.cin, self.cout = k, cin, cout

    def deltas(self):
        """Every expert's weight update in the layer's layout: (E, in, out) or (E, k, k, in, out)."""
        w = jnp.einsum("eor,eri->eoi", self.lora_B[...], self.lora_A[...]) * self.scale
        if self.linear:
            return w.transpose(0, 2, 1)
        k = self.kernel_size
        return w.reshape(self.experts, self.cout, self.cin // self.groups, k, k).transpose(0, 3, 4, 2, 1)

    def replace(self, layer, x):
        """The layer's output with each image's mixed weights, or None when the set is not selected."""
        selection = _SELECTED.get()
        if selection.name != self.set_name:
            return None
        if selection.routing is None:
            raise ValueError(f"adapter set {self.set_name!r} holds routed experts: select it with routing weights")
        dtype = compute_dtype(layer.dtype)
        routing, deltas = selection.routing.astype(dtype), self.deltas().astype(dtype)
        base, x = weight_at_use(layer.kernel[...], dtype), x.astype(dtype)
        if x.shape[0] > 1 and not self.linear and self.kernel_size > 1 and self.groups == 1:
            y = self._mixed_outputs(x, base, deltas, routing)
        else:
            kernels = base[None] + jnp.einsum("be,e...->b...", routing, deltas)
            if self.linear:
                y = jnp.einsum("b...i,bio->b...o", x, kernels)
            else:
                y = jax.vmap(lambda image, kernel: conv2d(image[None], kernel, self.stride, self.padding,
                                                          groups=self.groups)[0])(x, kernels)
        return y if layer.bias is None else y + layer.bias[...].astype(dtype)

    def _mixed_outputs(self, x, base, deltas, routing):
        """conv(x, W0) + sum_e w_e conv(x, dW_e) for a batch, as one convolution with the base
        and every expert's update side by side on its output channels (the authors' training
        path): a per-image kernel under vmap is a batch-grouped convolution, whose gradient
        XLA:CPU took 55x as long for NAFNet's ending (3x3, 64 -> 3, batch 8 at 256 x 256: 18 s
        against 0.33 s) and 1.1-1.5x for its other 3x3 and 2x2 ones. 1x1 and depthwise layers
        stay per image: a batched matrix product, an elementwise sum."""
        k, cin, cout, experts = self.kernel_size, self.cin, self.cout, self.experts
        side_by_side = jnp.concatenate([base[None], deltas]).transpose(1, 2, 3, 0, 4)
        y = conv2d(x, side_by_side.reshape(k, k, cin, (experts + 1) * cout), self.stride, self.padding)
        y = y.reshape(*y.shape[:-1], experts + 1, cout)
        return y[..., 0, :] + jnp.einsum("b...ec,be->b...c", y[..., 1:, :], routing)

    def folded(self, routing):
        """(kernel delta, None) of one image's mix: `routing` of shape (1, experts)."""
        if routing is None or routing.shape != (1, self.experts):
            raise ValueError(f"adapter set {self.set_name!r} folds for one image at a time (routing of shape "
                             f"(1, {self.experts})), got {None if routing is None else routing.shape}")
        return jnp.einsum("e,e...->...", routing[0], self.deltas()), None

    def merge_into(self, layer, film=None, routing=None):
        _add_to_weights(layer, *self.folded(routing))


class TrainedCopy(nnx.Module):
    """A trained full copy of one layer, initialised to its frozen weights: while its set is
    selected the layer computes with the copy's weights instead of W0, b0, otherwise with the
    untouched W0, b0. DOD trains the UNet's conv_in this way (the authors' checkpoints hold the
    trained conv_in itself), so the DMD real and fake scores, which share the UNet, keep the
    original conv_in, and weight decay acts on the trained weights as in the authors' AdamW."""

    film_key = None
    replaces = True  # the layer's own output is replaced, not added to (models.layers)

    def __init__(self, layer: Linear | Conv2d, set_name: str, *, rngs):
        kw = dict(use_bias=layer.bias is not None, dtype=layer.dtype, param_dtype=TRAINED_DTYPE, rngs=rngs)
        if isinstance(layer, Linear):
            self.copy = Linear(layer.in_features, layer.out_features, **kw)
        else:
            self.copy = Conv2d(layer.in_channels, layer.out_channels, layer.kernel.shape[0], stride=layer.stride,
                               padding=layer.padding, **kw)
        self.copy.kernel.set_value(layer.kernel[...].astype(TRAINED_DTYPE))
        if layer.bias is not None:
            self.copy.bias.set_value(layer.bias[...].astype(TRAINED_DTYPE))
        self.set_name = set_name

    def replace(self, layer, x):
        return self.copy(x) if _SELECTED.get().name == self.set_name else None

    def merge_into(self, layer, film=None, routing=None):
        """The copy's weights become the layer's (in the layer's dtype)."""
        layer.kernel.set_value(self.copy.kernel[...].astype(layer.kernel.dtype))
        if layer.bias is not None:
            layer.bias.set_value(self.copy.bias[...].astype(layer.bias.dtype))


def add_trained_copy(model: nnx.Module, path: str, set_name: str, rngs) -> str:
    """Hang a TrainedCopy of set `set_name` on the layer at dotted `path` of `model`."""
    found = [layer for p, layer in layers(model) if p == path]
    if not found:
        raise ValueError(f"{type(model).__name__} has no Linear or Conv2d at {path!r}")
    layer = found[0]
    if not hasattr(layer, ADAPTERS):
        layer.adapters = nnx.Dict()
    if set_name in layer.adapters:
        raise ValueError(f"{path} already carries an adapter set named {set_name!r}")
    layer.adapters[set_name] = TrainedCopy(layer, set_name, rngs=rngs)
    return path


def matches(path: str, targets: Sequence[str]) -> bool:
    return any(path == t or path.endswith("." + t) for t in targets)


def layers(model: nnx.Module, scope: str = "") -> Iterator[tuple[str, Linear | Conv2d]]:
    """(dotted path, layer) of every base Linear and Conv2d under `scope` (a path prefix)."""
    for path, node in nnx.iter_graph(model):
        if isinstance(node, (Linear, Conv2d)) and ADAPTERS not in path:
            dotted = ".".join(str(p) for p in path)
            if dotted.startswith(scope):
                yield dotted, node


@dataclasses.dataclass(frozen=True)
class AdapterSpec:
    """One adapter set. `film_key(path)` gives a conditional layer's row of M_theta's output;
    None makes the whole set plain LoRA. `experts` > 0 makes it routed low-rank experts."""
    name: str
    targets: tuple[str, ...]
    rank: int = 8
    alpha: float | None = None  # None: alpha = rank (scale 1, as DOD's authors' code)
    scope: str = ""
    film_key: Callable[[str], int] | None = None
    literal_gamma: bool = False
    experts: int = 0


def inject(model: nnx.Module, spec: AdapterSpec, rngs) -> list[str]:
    """Hang a `spec.name` adapter on every target layer of `model`; returns their paths.
    A target that matches no layer is an error, so a misspelt target list never trains nothing."""
    found = [(p, layer) for p, layer in layers(model, spec.scope) if matches(p[len(spec.scope):], spec.targets)]
    unmatched = [t for t in spec.targets if not any(matches(p[len(spec.scope):], [t]) for p, _ in found)]
    if unmatched:
        raise ValueError(f"adapter set {spec.name!r}: targets {unmatched} match no Linear or Conv2d under "
                         f"{spec.scope or 'the model root'!r} of {type(model).__name__}")
    if spec.experts and spec.film_key is not None:
        raise ValueError(f"adapter set {spec.name!r}: routed experts take no FiLM conditioning (film_key)")
    alpha = spec.rank if spec.alpha is None else spec.alpha
    for path, layer in found:
        if not hasattr(layer, ADAPTERS):
            layer.adapters = nnx.Dict()
        if spec.name in layer.adapters:
            raise ValueError(f"{path} already carries an adapter set named {spec.name!r}")
        if spec.experts:
            layer.adapters[spec.name] = LoRAExperts(layer, spec.name, spec.experts, spec.rank, alpha, rngs=rngs)
        else:
            layer.adapters[spec.name] = LoRA(
                layer, spec.name, spec.rank, alpha, literal_gamma=spec.literal_gamma, rngs=rngs,
                film_key=None if spec.film_key is None else spec.film_key(path))
    return [p for p, _ in found]


def adapted(model: nnx.Module, name: str) -> Iterator[tuple[str, Linear | Conv2d, LoRA | LoRAExperts | TrainedCopy]]:
    for path, layer in layers(model):
        if name in getattr(layer, ADAPTERS, {}):
            yield path, layer, layer.adapters[name]


def merge(model: nnx.Module, name: str, film: jax.Array | None = None, routing: jax.Array | None = None) -> int:
    """Fold adapter set `name` into the base weights and remove it; returns the number of
    layers folded. Conditional sets fold for one image (`film` of shape (keys, 1, 2r)):
    W0 + A diag(gamma) B and bias + beta B; experts for one image's `routing` (1, experts):
    W0 + sum_e w_e dW_e; a trained copy replaces W0 and b0. Works on a model merged inside a
    jitted function."""
    count = 0
    for _, layer, adapter in list(adapted(model, name)):
        adapter.merge_into(layer, film, routing)
        del layer.adapters[name]
        count += 1
    return count


def adapter_filter(name: str):
    """An NNX filter for the parameters of adapter set `name`."""
    return nnx.All(nnx.Param, nnx.PathContains(ADAPTERS), nnx.PathContains(name))
