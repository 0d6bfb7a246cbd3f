"""DOD behind the method interface (dod_jax.methods): what the trainer, the restore engine,
bundles and evaluation get from it."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dod_jax import checkpoints as ckpt
from dod_jax.errors import ConfigError
from dod_jax.losses.lpips import LPIPS, load_lpips
from dod_jax.methods import Built, Method
from dod_jax.methods.dod.build import (BASE_FILES, DTYPES, BaseModels, base_identity, base_models, build_dod,
                                       shaped_base, storage_dtype)
from dod_jax.methods.dod.model import ALL_TRAINED, DOD, trainable
from dod_jax.methods.dod.restore import PRESETS, DODRunner
from dod_jax.methods.dod.steps import Stage, add_fake_score
from dod_jax.models.layers import FixedKeyRngs, NumpyRngs

STAGES = ("stage1", "stage2")


def training_model(config, base: BaseModels, *, load_stage1: bool = True) -> DOD:
    """DOD for `config.train.stage`: stage 1 adds the fake score; stage 2 starts from the
    stage-1 checkpoint in train.init_from (with load_stage1=False, from fresh stage-1 parts:
    the shapes alone, for planning)."""
    model = build_dod(config, base, config.train.seed)
    stage = config.train.stage
    if stage == "stage1":
        if "negative_prompt" not in base.prompt_embeddings:
            raise ConfigError(f"{config.base.prompts}: holds no negative_prompt embedding, which stage 1's DMD "
                              "real score needs (python -m dod_jax.methods.dod.prompts writes both)")
        add_fake_score(model, base.prompt_embeddings["negative_prompt"], rank=config.train.fake_rank,
                       targets=config.dod.unet_targets, rngs=NumpyRngs(config.train.seed + 2),
                       scope=config.train.fake_scope)
    elif stage == "stage2":
        if not load_stage1:
            return model
        if not config.train.init_from:
            raise ConfigError("stage 2 starts from a stage-1 run: set train.init_from to its checkpoints directory")
        ckpt.load_trained_params(model, config.train.init_from, trainable("stage1"), ALL_TRAINED)
    else:
        raise ConfigError(f"train.stage must be one of {STAGES}, got {stage!r}")
    return model


class DODMethod(Method):
    name = "dod"
    label = "DOD (ours)"
    stages = STAGES
    base_files = BASE_FILES
    presets = PRESETS
    trained = ALL_TRAINED

    def base_identity(self, config, root=None) -> dict:
        return base_identity(config, root)

    def build(self, config, *, dtype: str | None = None) -> Built:
        base = base_models(config, dtype=dtype)
        return Built(build_dod(config, base, config.train.seed), {"prompts": base.prompt_embeddings})

    def training(self, config):
        """Stage 1: the generator and the fake score, LPIPS loaded; stage 2: the HDE on the
        stage-1 run of train.init_from."""
        tc = config.train
        model = training_model(config, base_models(config))
        lpips = load_lpips(tc.lpips_weights, param_dtype=storage_dtype(config)) if tc.stage == "stage1" else None
        return Stage.create(model, tc, lpips)

    def shaped_training(self, config):
        """The base built in the config's shapes and compute dtype without weights, DOD's
        trained parts and (stage 1) the fake score's LoRA and LPIPS, all ShapeDtypeStructs."""
        tc, holder = config.train, []

        def make():
            rngs = FixedKeyRngs()
            model = training_model(config, shaped_base(config, rngs, dtype=DTYPES[tc.dtype], remat=tc.remat),
                                   load_stage1=False)
            lpips = LPIPS(param_dtype=storage_dtype(config), rngs=rngs) if tc.stage == "stage1" else None
            steps, state, frozen = Stage.create(model, tc, lpips)
            holder.append(steps)
            return state, frozen

        state, frozen = jax.eval_shape(make)
        return holder[0], state, frozen

    def runner(self, built: Built, config, stage: str, seed: int = 0) -> DODRunner:
        """A stage-1 model restores without DEMs."""
        return DODRunner(built.model, use_hde=stage == "stage2", seed=seed)

    def describe(self, model: DOD, config) -> dict:
        return {"dtype": jnp.dtype(model.unet.dtype).name, "latent": config.dod.latent,
                "mfm_size": config.dod.mfm_size, "mfm_resize": model.mfm_resize,
                "attention": config.base.attention}


METHOD = DODMethod()
