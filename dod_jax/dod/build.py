"""Building a DOD model from a config: the base weights from their files (an SD 2.1-base
pipeline folder, the converted ADM file, a prompt-embeddings file), or random base weights in
the config's shapes for tests and the demo."""

from __future__ import annotations

import dataclasses
import os

import jax.numpy as jnp
import numpy as np
from flax import nnx

from dod_jax.dod.model import DOD
from dod_jax.dod.prompts import load_prompt_embeddings
from dod_jax.models.adm import ADMConfig, ADMEncoder
from dod_jax.models.layers import FixedKeyRngs, NumpyRngs
from dod_jax.models.unet import UNet2DCondition, UNetConfig
from dod_jax.models.vae import AutoencoderKL, VAEConfig
from dod_jax.schedule import DDPMSchedule
from dod_jax.weights.adm import load_adm
from dod_jax.weights.diffusers import SDPipeline, load_pipeline


@dataclasses.dataclass
class BaseModels:
    """The frozen parts DOD builds on."""
    sd: SDPipeline
    adm: ADMEncoder
    prompt_embeddings: dict[str, np.ndarray]


def adm_config(config) -> ADMConfig:
    return ADMConfig(**{k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in config.adm.items()})


def base_networks(config, rngs, dtype) -> tuple[UNet2DCondition, AutoencoderKL, ADMEncoder]:
    """The SD UNet, VAE and ADM encoder of `config`, initialised from `rngs`."""
    return (UNet2DCondition(UNetConfig.from_diffusers(config.unet.to_dict()), dtype=dtype, rngs=rngs),
            AutoencoderKL(VAEConfig.from_diffusers(config.vae.to_dict()), dtype=dtype, rngs=rngs),
            ADMEncoder(adm_config(config), dtype=dtype, rngs=rngs))


def random_base(config, seed: int = 0, *, dtype=jnp.float32) -> BaseModels:
    """Base models with random weights in the config's shapes (PyTorch-style fan-in init) and
    random prompt embeddings: for tests and the demo, never for results."""
    rngs = NumpyRngs(seed)
    unet, vae, adm = base_networks(config, rngs, dtype)
    schedule = DDPMSchedule.from_config(config.scheduler.to_dict())
    shape = (config.prompt_length, unet.config.cross_attention_dim)
    generator = np.random.default_rng(seed)
    prompts = {k: generator.standard_normal(shape).astype(np.float32) for k in ("prompt", "negative_prompt")}
    return BaseModels(SDPipeline(unet, vae, schedule), adm, prompts)


def load_base(sd_folder: str | os.PathLike, adm_file: str | os.PathLike, prompts_file: str | os.PathLike,
              *, dtype=jnp.float32, remat: bool = False) -> BaseModels:
    sd = load_pipeline(sd_folder, dtype=dtype, remat=remat)
    return BaseModels(sd, load_adm(adm_file, dtype=dtype),
                      load_prompt_embeddings(prompts_file, sd.unet.config.cross_attention_dim))


def build_dod(config, base: BaseModels, seed: int = 0) -> DOD:
    """DOD on `base` with freshly initialised adapters, M_theta and DEMs (`config.dod`)."""
    return DOD(base.sd.unet, base.sd.vae, base.adm, base.sd.schedule, base.prompt_embeddings["prompt"],
               config.dod, rngs=NumpyRngs(seed + 1))


def abstract_dod(config, *, dtype=jnp.float32) -> DOD:
    """DOD in the config's shapes with no values (nnx.eval_shape): parameter counts, sharding
    plans, and the structure checkpoints restore into."""
    def make():
        rngs = FixedKeyRngs()
        unet, vae, adm = base_networks(config, rngs, dtype)
        prompt = jnp.zeros((config.prompt_length, unet.config.cross_attention_dim))
        return DOD(unet, vae, adm, DDPMSchedule.from_config(config.scheduler.to_dict()), prompt, config.dod, rngs=rngs)
    return nnx.eval_shape(make)
