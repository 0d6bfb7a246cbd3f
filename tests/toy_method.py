"""A second restoration method in a few lines, for the tests of the method-free layers: the
frozen base is one 3x3 convolution with a residual (random weights from base.random_seed), and
what trains is a rank-2 LoRA on it, by MSE with AdamW. Importing this module registers it as
config.method 'toy'."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from dod_jax import adapters, methods
from dod_jax.models.layers import Conv2d, FixedKeyRngs, NumpyRngs

SET = "toy"


class ToyModel(nnx.Module):
    def __init__(self, rngs):
        self.conv = Conv2d(3, 3, 3, rngs=rngs)
        adapters.inject(self, adapters.AdapterSpec(SET, ("conv",), rank=2), rngs)

    def __call__(self, lq):
        with adapters.select(SET):
            return lq + 0.1 * self.conv(lq)


class ToyState(struct.PyTreeNode):
    step: jax.Array
    params: nnx.State
    opt_state: optax.OptState


class ToySteps(methods.TrainingSteps):
    def __init__(self, graphdef, tx):
        self.graphdef, self.tx = graphdef, tx

    def train_step(self, state: ToyState, frozen, batch):
        def loss_fn(params):
            restored = nnx.merge(self.graphdef, params, frozen)(batch["lq"])
            return jnp.mean((restored - batch["gt"]) ** 2), restored

        (loss, restored), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                              opt_state=opt_state)
        return state, {"loss": loss}, restored

    def trained_params(self, state: ToyState, frozen) -> dict:
        return nnx.to_pure_dict(state.params)


class ToyRunner:
    def __init__(self, model: ToyModel):
        graphdef, self.state = nnx.split(model)
        self.forward = jax.jit(lambda state, lq: nnx.merge(graphdef, state)(lq))

    def restore_batch(self, lq, prepared, engine):
        return engine.compiling(self.forward, "toy restore", self.state, lq)


class ToyMethod(methods.Method):
    name, label, stages = "toy", "Toy (conv + LoRA)", ("stage1",)
    trained = adapters.adapter_filter(SET)

    def base_identity(self, config, root=None) -> dict:
        return {"random_seed": config.base.random_seed}

    def build(self, config, *, dtype=None) -> methods.Built:
        return methods.Built(ToyModel(NumpyRngs(config.base.random_seed)), {})

    def _steps(self, model, config):
        graphdef, params, frozen = nnx.split(model, self.trained, ...)
        tx = optax.adamw(config.train.lr)
        return ToySteps(graphdef, tx), ToyState(jnp.zeros((), jnp.int32), params, tx.init(params)), frozen

    def training(self, config):
        return self._steps(self.build(config).model, config)

    def shaped_training(self, config):
        holder = []

        def make():
            steps, state, frozen = self._steps(ToyModel(FixedKeyRngs()), config)
            holder.append(steps)
            return state, frozen

        state, frozen = jax.eval_shape(make)
        return holder[0], state, frozen

    def runner(self, built, config, stage, seed=0) -> ToyRunner:
        return ToyRunner(built.model)


METHOD = methods.register(ToyMethod())
