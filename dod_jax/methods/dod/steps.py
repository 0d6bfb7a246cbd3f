"""The two training stages as pure functions over split model state.

Stage 1 trains M_theta, the UNet CLoRA, the UNet conv_in and the VAE-encoder LoRA:
    L_gen  = l_l2 MSE(I, I_hq) + l_lpips LPIPS(I, I_hq) + l_dmd L_dmd(z)      (decoder without DEMs)
    L_fake = epsilon-MSE of the fake score (the UNet with the FAKE LoRA set) on stopgrad(z)
with one AdamW per update (generator; fake score). Stage 2 trains the HDE (skip convs, DEMs):
    L = MSE(I, I_hq) + l_ssim (1 - SSIM(I, I_hq))                             (decoder with DEMs)

The model is split once into what the stage trains, the fake LoRA (stage 1) and everything
frozen; each update is one function `(state, frozen, batch) -> (state, metrics)` meant for
jax.jit with the state donated. A batch may be split into `micro_batches` whose gradients
are averaged (the same result as the whole batch, as every loss term is a mean over equal
micro-batches and every random draw follows one key per sample). An update whose loss or
gradients are not finite changes nothing but its counter (`skipped`, `fake_skipped`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct

from dod_jax import adapters
from dod_jax.methods import TrainingSteps
from dod_jax.methods.dod.build import DTYPES
from dod_jax.methods.dod.model import DOD, PromptEmbedding, all_trained, trainable
from dod_jax.errors import ConfigError
from dod_jax.optim import accumulate, apply_if_finite, learning_rate, optimizer
from dod_jax.methods.dod.dmd import dmd_loss, fake_score_loss
from dod_jax.losses.ssim import batch_ssim

FAKE = "fake"  # the fake score's LoRA set on the shared UNet

LOSS_WEIGHTS = {  # REFERENCE.md: the authors' code and the paper differ
    "code": {"l2": 2.0, "lpips": 5.0, "dmd": 1.0, "ssim": 0.1},
    "paper": {"l2": 1.0, "lpips": 2.0, "dmd": 1.0, "ssim": 0.2},
}


def loss_weights(train_cfg) -> dict[str, float]:
    """The preset `train_cfg.loss_weights` ('code' or 'paper'), with any weight set explicitly
    in `train_cfg.weights` taking precedence."""
    if train_cfg.loss_weights not in LOSS_WEIGHTS:
        raise ConfigError(f"train.loss_weights must be one of {sorted(LOSS_WEIGHTS)}, got {train_cfg.loss_weights!r}")
    weights = dict(LOSS_WEIGHTS[train_cfg.loss_weights])
    weights.update({k: float(v) for k, v in train_cfg.weights.items() if v is not None})
    return weights


class TrainState(struct.PyTreeNode):
    """Everything a stage updates; a checkpoint holds exactly this (plus the data position)."""
    step: jax.Array
    params: Any               # nnx.State of what the stage trains
    opt_state: Any
    fake_params: Any          # stage 1: the fake LoRA; stage 2: an empty nnx.State
    fake_opt_state: Any       # stage 2: ()
    key: jax.Array            # uint32 raw key data (checkpointable); steps fold the step number in
    skipped: jax.Array        # generator updates dropped for a non-finite loss or gradient
    fake_skipped: jax.Array


@dataclasses.dataclass
class Frozen:
    """What the steps read but never change."""
    model: Any                # nnx.State of the rest of the DOD model (base weights, other stage's parts)
    lpips: Any                # nnx.State of the LPIPS network (stage 1), or None


jax.tree_util.register_dataclass(Frozen, data_fields=["model", "lpips"], meta_fields=[])


def split_filters(stage: str):
    """(trained, fake) NNX filters. The fake LoRA comes first in nnx.split, so no stage filter
    can claim it."""
    return trainable(stage), nnx.All(nnx.Param, adapters.adapter_filter(FAKE))


@dataclasses.dataclass
class Stage(TrainingSteps):
    """The update functions of one stage for one model structure."""
    stage: str
    graphdef: Any
    lpips_graphdef: Any
    weights: dict[str, float]
    gen_tx: Any
    fake_tx: Any
    micro_batches: int = 1
    fake_updates: int = 1
    clamp_output: bool = True  # train.clamp_output (configs/dod.py)
    real_score_dtype: Any = None  # train.real_score_dtype as a jnp dtype; None: train.dtype

    # --------------------------------------------------------------------------- set-up

    @classmethod
    def create(cls, model: DOD, train_cfg, lpips=None) -> tuple["Stage", TrainState, Frozen]:
        """Split `model` (carrying the FAKE set in stage 1) and `lpips` into the state the stage
        updates and the frozen rest."""
        stage = train_cfg.stage
        trained, fake = split_filters(stage)
        graphdef, fake_params, params, frozen = nnx.split(model, fake, trained, ...)
        weights = loss_weights(train_cfg)
        stage1 = stage == "stage1"
        if stage1 and (not jax.tree.leaves(fake_params) or getattr(model, "negative_prompt", None) is None):
            raise ValueError("stage 1 needs the fake score's LoRA set and the negative prompt on the model "
                             "(dod_jax.methods.dod.steps.add_fake_score)")
        if stage1 and weights["lpips"] and lpips is None:
            raise ConfigError("stage 1 with an LPIPS weight needs the LPIPS network (train.lpips_weights)")
        lpips_graphdef, lpips_state = nnx.split(lpips) if lpips is not None else (None, None)
        real = train_cfg.real_score_dtype
        if real is not None and real not in DTYPES:
            raise ConfigError(f"train.real_score_dtype must be None or one of {sorted(DTYPES)}, got {real!r}")
        schedule = lambda lr: learning_rate(lr, train_cfg.steps, train_cfg.lr_schedule, train_cfg.warmup,
                                            train_cfg.final_lr_fraction)
        gen_tx = optimizer(schedule(train_cfg.lr), train_cfg.weight_decay, train_cfg.clip, *train_cfg.betas)
        fake_tx = optimizer(schedule(train_cfg.fake_lr), train_cfg.weight_decay, train_cfg.fake_clip, *train_cfg.betas)
        self = cls(stage, graphdef, lpips_graphdef, weights, gen_tx, fake_tx, train_cfg.micro_batches,
                   train_cfg.fake_updates if stage1 else 0, train_cfg.clamp_output,
                   None if real is None else DTYPES[real])
        state = TrainState(
            step=jnp.zeros((), jnp.int32), params=params, opt_state=gen_tx.init(params),
            fake_params=fake_params, fake_opt_state=fake_tx.init(fake_params) if stage1 else (),
            key=jax.random.key_data(jax.random.key(train_cfg.seed)),
            skipped=jnp.zeros((), jnp.int32), fake_skipped=jnp.zeros((), jnp.int32))
        return self, state, Frozen(frozen, lpips_state)

    def merge(self, state: TrainState, frozen: Frozen) -> DOD:
        """The DOD model holding the state's parameters."""
        return nnx.merge(self.graphdef, state.fake_params, state.params, frozen.model)

    def trained_params(self, state: TrainState, frozen: Frozen) -> dict:
        """Everything either stage trains, as checkpoints hold it for restore (model.ALL_TRAINED)."""
        return nnx.to_pure_dict(all_trained(self.merge(state, frozen)))

    def counters(self, state: TrainState) -> dict[str, int]:
        return {"skipped": int(state.skipped), "fake_skipped": int(state.fake_skipped)}

    # ------------------------------------------------------------------------------ losses

    def generator_loss(self, params, fake_params, frozen: Frozen, batch, keys):
        """(loss, (metrics, (latent x0, restored images))) on one (micro-)batch."""
        model = nnx.merge(self.graphdef, fake_params, params, frozen.model)
        lq, gt = batch["lq"], batch["gt"]
        pairs = jax.vmap(jax.random.split)(keys)
        latent_keys, dmd_keys = pairs[:, 0], pairs[:, 1]
        film = model.film(lq)
        z, skips = model.encode(lq, film, model.latent_noise(latent_keys, lq.shape))
        x0 = model.generate_latent(z, film)
        restored = model.decode(x0, skips, use_hde=self.stage == "stage2")
        if self.clamp_output:  # the authors' code clamps before its image losses
            restored = jnp.clip(restored, -1.0, 1.0)
        w = self.weights
        metrics = {"mse": jnp.mean((restored - gt.astype(jnp.float32)) ** 2)}
        if self.stage == "stage1":
            loss = w["l2"] * metrics["mse"]
            if w["lpips"]:
                lpips = nnx.merge(self.lpips_graphdef, frozen.lpips)
                metrics["lpips"] = lpips(restored, gt, constant_target=True).mean()
                loss = loss + w["lpips"] * metrics["lpips"]
            if w["dmd"]:
                b = lq.shape[0]
                metrics["dmd"] = dmd_loss(model.unet, model.schedule, x0, dmd_keys, model.context(b),
                                          model.context(b, model.negative_prompt), fake_set=FAKE,
                                          real_dtype=self.real_score_dtype)
                loss = loss + w["dmd"] * metrics["dmd"]
        else:
            metrics["ssim"] = batch_ssim(restored, gt, data_range=2.0).mean()
            loss = metrics["mse"] + w["ssim"] * (1.0 - metrics["ssim"])
        metrics["loss"] = loss
        return loss, (metrics, jax.lax.stop_gradient((x0, restored)))

    def fake_loss(self, fake_params, params, frozen: Frozen, batch, keys):
        model = nnx.merge(self.graphdef, fake_params, params, frozen.model)
        x0 = batch["x0"]
        loss = fake_score_loss(model.unet, model.schedule, x0, keys, model.context(x0.shape[0]), fake_set=FAKE)
        return loss, ({"fake_loss": loss}, None)

    # ----------------------------------------------------------------------------- updates

    def sample_keys(self, state: TrainState, purpose: int, batch_size: int):
        """One key per sample of the global batch, from (run key, step, purpose)."""
        key = jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step), purpose)
        return jax.random.split(key, batch_size)

    def generator_update(self, state: TrainState, frozen: Frozen, batch):
        """One generator (stage 1) or HDE (stage 2) update -> (state, metrics, (x0 latents,
        restored images)), the outputs of the forward pass before the update."""
        keys = self.sample_keys(state, 0, batch["lq"].shape[0])
        loss_fn = lambda p, b, k: self.generator_loss(p, state.fake_params, frozen, b, k)
        grads, metrics, outputs = accumulate(loss_fn, state.params, batch, keys, self.micro_batches)
        params, opt_state, finite = apply_if_finite(self.gen_tx, grads, metrics["loss"], state.params, state.opt_state)
        metrics["skipped"] = state.skipped + (1 - finite)
        return state.replace(params=params, opt_state=opt_state, skipped=metrics["skipped"]), metrics, outputs

    def fake_update(self, state: TrainState, frozen: Frozen, x0, round_: int = 0):
        """One update of the fake score's LoRA on detached generator latents."""
        keys = self.sample_keys(state, 1 + round_, x0.shape[0])
        loss_fn = lambda f, b, k: self.fake_loss(f, state.params, frozen, b, k)
        grads, metrics, _ = accumulate(loss_fn, state.fake_params, {"x0": x0}, keys, self.micro_batches)
        fake, fake_opt, finite = apply_if_finite(self.fake_tx, grads, metrics["fake_loss"], state.fake_params,
                                                 state.fake_opt_state)
        metrics["fake_skipped"] = state.fake_skipped + (1 - finite)
        return state.replace(fake_params=fake, fake_opt_state=fake_opt, fake_skipped=metrics["fake_skipped"]), metrics

    def train_step(self, state: TrainState, frozen: Frozen, batch):
        """A whole step: the generator update, then `fake_updates` fake-score updates (stage 1);
        the step counter advances once. -> (state, metrics, restored images of the batch)."""
        state, metrics, (x0, restored) = self.generator_update(state, frozen, batch)
        for r in range(self.fake_updates):
            state, fake_metrics = self.fake_update(state, frozen, x0, r)
            metrics.update(fake_metrics)
        return state.replace(step=state.step + 1), metrics, restored


# Where the fake score's LoRA sits (train.fake_scope): (a path prefix in the UNet, layers added to
# the targets). The authors' code adds three adapters to the fake score (the target layers of the
# down blocks and conv_in; of the up blocks and conv_out; the others). 'all': the three together,
# every target layer and conv_in (their intent); 'official': what their code trains in effect,
# the "others" adapter (added last, so the only active one), which is the mid block's layers.
FAKE_SCOPES = {"all": ("", ("conv_in",)), "official": ("mid_block.", ())}


def add_fake_score(model: DOD, negative_prompt, *, rank: int, targets, rngs, scope: str = "official") -> DOD:
    """Give `model` what stage 1's DMD needs: the fake score's LoRA set (FAKE, rank `rank`, on
    the UNet layers ending in `targets` within `scope` (FAKE_SCOPES), B zero so the fake score
    starts as the base UNet) and the real score's negative prompt embedding."""
    if scope not in FAKE_SCOPES:
        raise ConfigError(f"train.fake_scope must be one of {sorted(FAKE_SCOPES)}, got {scope!r}")
    prefix, added = FAKE_SCOPES[scope]
    present = [t for t in tuple(targets) + added
               if any(adapters.matches(p[len(prefix):], [t]) for p, _ in adapters.layers(model.unet, prefix))]
    adapters.inject(model.unet, adapters.AdapterSpec(FAKE, tuple(present), rank=rank, scope=prefix), rngs)
    model.negative_prompt = PromptEmbedding(jnp.asarray(negative_prompt, jnp.float32))
    return model
