"""What every method's training steps share: the learning-rate schedule, AdamW with
clipping, gradients accumulated over micro-batches, and updates skipped when the loss or a
gradient is not finite."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from dod_jax.errors import ConfigError

LR_SCHEDULES = ("constant", "cosine")


def learning_rate(lr: float, steps: int, schedule: str = "constant", warmup: int = 0, final_fraction: float = 0.0):
    """`lr` as optax takes it: 'constant' (the authors' code), or 'cosine': linear warm-up from 0
    over `warmup` steps (at most half the run), then cosine decay to `final_fraction` x lr at `steps`."""
    if schedule == "constant":
        return lr
    if schedule != "cosine":
        raise ConfigError(f"train.lr_schedule must be one of {list(LR_SCHEDULES)}, got {schedule!r}")
    warmup = min(warmup, steps // 2)
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1), lr * final_fraction)


def optimizer(lr, weight_decay: float, clip: float | None, b1: float = 0.9, b2: float = 0.999):
    """AdamW after global-norm clipping (None: no clipping); `lr` a number or an optax schedule."""
    adamw = optax.adamw(lr, b1=b1, b2=b2, weight_decay=weight_decay)
    return optax.chain(optax.clip_by_global_norm(clip), adamw) if clip else adamw


def accumulate(loss_fn: Callable, params, batch: dict, keys, micro_batches: int):
    """Gradients of loss_fn(params, batch, keys) -> (loss, (metrics, out)) averaged over
    `micro_batches` equal slices of the batch (a lax.scan, so one slice's activations live at a
    time); metrics averaged, `out` concatenated."""
    if micro_batches == 1:
        grads, (metrics, out) = jax.grad(loss_fn, has_aux=True)(params, batch, keys)
        return grads, metrics, out
    n = keys.shape[0]
    if n % micro_batches:
        raise ConfigError(f"a batch of {n} does not split into {micro_batches} micro-batches")
    split = lambda x: x.reshape((micro_batches, n // micro_batches) + x.shape[1:])
    sliced = jax.tree.map(split, (batch, keys))

    def body(total, piece):
        grads, (metrics, out) = jax.grad(loss_fn, has_aux=True)(params, *piece)
        total = jax.tree.map(jnp.add, total, (grads, metrics))
        return total, out

    first = jax.tree.map(lambda x: x[0], sliced)
    grad_shapes, (metric_shapes, _) = jax.eval_shape(lambda: jax.grad(loss_fn, has_aux=True)(params, *first))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (grad_shapes, metric_shapes))
    (grads, metrics), outs = jax.lax.scan(body, zeros, sliced)
    grads, metrics = jax.tree.map(lambda x: x / micro_batches, (grads, metrics))
    out = None if outs is None else jax.tree.map(lambda x: x.reshape((n,) + x.shape[2:]), outs)
    return grads, metrics, out


def apply_if_finite(tx, grads, loss, params, opt_state):
    """(params, opt_state, 1) after the update, or the unchanged inputs and 0 when the loss or
    any gradient is not finite. A NaN or an infinity anywhere makes the gradients' global norm
    non-finite, so one scalar decides; lax.cond keeps the update out of the skipped branch."""
    finite = jnp.isfinite(loss) & jnp.isfinite(optax.tree.norm(grads))

    def update(operands):
        params, opt_state = operands
        updates, new_opt = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_opt

    params, opt_state = jax.lax.cond(finite, update, lambda operands: operands, (params, opt_state))
    return params, opt_state, finite.astype(jnp.int32)
