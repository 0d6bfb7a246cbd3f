"""Building a DOD model from a config: the base weights from their files (an SD 2.1-base
pipeline folder, the converted ADM file, a prompt-embeddings file), or random base weights in
the config's shapes for tests and the demo."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from dod_jax.methods.dod.model import DOD
from dod_jax.methods.dod.prompts import load_prompt_embeddings
from dod_jax.errors import ConfigError
from dod_jax.files import file_identity
from dod_jax.models.adm import ADMConfig, ADMEncoder
from dod_jax.models.layers import ATTENTION_IMPLEMENTATIONS, DTYPES, FixedKeyRngs, NumpyRngs
from dod_jax.models.unet import UNet2DCondition, UNetConfig
from dod_jax.models.vae import AutoencoderKL, VAEConfig
from dod_jax.schedule import DDPMSchedule
from dod_jax.weights.adm import load_adm
from dod_jax.weights.diffusers import SDPipeline, WeightsError, load_pipeline


@dataclasses.dataclass
class BaseModels:
    """The frozen parts DOD builds on."""
    sd: SDPipeline
    adm: ADMEncoder
    prompt_embeddings: dict[str, np.ndarray]


def adm_config(config) -> ADMConfig:
    return ADMConfig(**{k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in config.adm.items()})




def attention(config) -> str:
    """base.attention, checked: how the base networks compute attention."""
    name = config.base.attention
    if name not in ATTENTION_IMPLEMENTATIONS or name is None:
        raise ConfigError(f"base.attention must be one of {[n for n in ATTENTION_IMPLEMENTATIONS if n]}, got {name!r}")
    return name


def storage_dtype(config):
    """base.dtype: the dtype the frozen base networks and LPIPS are stored in (configs/dod.py)."""
    name = config.base.dtype
    if name not in DTYPES:
        raise ConfigError(f"base.dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def base_networks(config, rngs, dtype, remat: bool | str = False, *,
                  param_dtype=jnp.float32) -> tuple[UNet2DCondition, AutoencoderKL, ADMEncoder]:
    """The SD UNet, VAE and ADM encoder of `config`, initialised from `rngs`, computing in
    `dtype` (attention as base.attention) with weights stored in `param_dtype`."""
    kw = dict(dtype=dtype, param_dtype=param_dtype, attention_impl=attention(config), rngs=rngs)
    return (UNet2DCondition(UNetConfig.from_diffusers(config.unet.to_dict()), remat=remat, **kw),
            AutoencoderKL(VAEConfig.from_diffusers(config.vae.to_dict()), remat=remat, **kw),
            ADMEncoder(adm_config(config), **kw))


def random_base(config, seed: int = 0, *, dtype=jnp.float32, param_dtype=jnp.float32,
                remat: bool | str = False) -> BaseModels:
    """Base models with random weights in the config's shapes (PyTorch-style fan-in init, drawn
    in float64 and rounded to `param_dtype`) and random prompt embeddings: for tests and the
    demo, never for results."""
    rngs = NumpyRngs(seed)
    unet, vae, adm = base_networks(config, rngs, dtype, remat, param_dtype=param_dtype)
    schedule = DDPMSchedule.from_config(config.scheduler.to_dict())
    shape = (config.prompt_length, unet.config.cross_attention_dim)
    generator = np.random.default_rng(seed)
    prompts = {k: generator.standard_normal(shape).astype(np.float32) for k in ("prompt", "negative_prompt")}
    return BaseModels(SDPipeline(unet, vae, schedule), adm, prompts)


def load_base(sd_folder: str | os.PathLike, adm_file: str | os.PathLike, prompts_file: str | os.PathLike,
              *, dtype=jnp.float32, param_dtype=jnp.float32, remat: bool | str = False,
              attention_impl: str = "auto") -> BaseModels:
    sd = load_pipeline(sd_folder, dtype=dtype, param_dtype=param_dtype, remat=remat, attention_impl=attention_impl)
    return BaseModels(sd, load_adm(adm_file, dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl),
                      load_prompt_embeddings(prompts_file, sd.unet.config.cross_attention_dim))


BASE_FILES = {"sd": "the SD 2.1-base pipeline folder", "adm": "the converted ADM file",
              "prompts": "the prompt-embeddings file"}


def base_models(config, *, dtype: str | None = None) -> BaseModels:
    """The frozen base `config.base` names (random weights when base.random_seed >= 0), computing
    in `dtype` (default config.train.dtype), stored in base.dtype."""
    kw = dict(dtype=DTYPES[dtype or config.train.dtype], param_dtype=storage_dtype(config),
              remat=config.train.remat)
    if config.base.random_seed >= 0:
        return random_base(config, config.base.random_seed, **kw)
    missing = [f"base.{k} ({what})" for k, what in BASE_FILES.items() if not config.base[k]]
    if missing:
        raise ConfigError(f"the config names no {', '.join(missing)}; or set base.random_seed >= 0 for random weights")
    absent = [f"base.{k} = {config.base[k]} ({what})" for k, what in BASE_FILES.items()
              if not Path(config.base[k]).exists()]
    if absent:
        raise WeightsError("base weights not found: " + "; ".join(absent))
    return load_base(config.base.sd, config.base.adm, config.base.prompts, attention_impl=attention(config), **kw)


def base_identity(config, root: Path | None = None) -> dict:
    """What checkpoints and restore bundles record of the base: the random seed, or the path,
    size and sha256 of every base weights file. Relative paths are taken from `root` (a
    bundle holding its own base files) and recorded relative to it."""
    if config.base.random_seed >= 0:
        return {"random_seed": config.base.random_seed}
    return {k: file_identity(config.base[k], root) for k in BASE_FILES}


def build_dod(config, base: BaseModels, seed: int = 0) -> DOD:
    """DOD on `base` with freshly initialised adapters, M_theta and DEMs (`config.dod`)."""
    return DOD(base.sd.unet, base.sd.vae, base.adm, base.sd.schedule, base.prompt_embeddings["prompt"],
               config.dod, rngs=NumpyRngs(seed + 1))


def shaped_base(config, rngs, *, dtype=jnp.float32, remat: bool | str = False) -> BaseModels:
    """The base of `config` for shape-only builds (under nnx.eval_shape / jax.eval_shape; with
    FixedKeyRngs): its networks stored in base.dtype, zero prompt embeddings."""
    unet, vae, adm = base_networks(config, rngs, dtype, remat, param_dtype=storage_dtype(config))
    shape = (config.prompt_length, unet.config.cross_attention_dim)
    prompts = {k: np.zeros(shape, np.float32) for k in ("prompt", "negative_prompt")}
    return BaseModels(SDPipeline(unet, vae, DDPMSchedule.from_config(config.scheduler.to_dict())), adm, prompts)


def abstract_dod(config, *, dtype=jnp.float32) -> DOD:
    """DOD in the config's shapes with no values (nnx.eval_shape): parameter counts, sharding
    plans, and the structure checkpoints restore into."""
    def make():
        rngs = FixedKeyRngs()
        base = shaped_base(config, rngs, dtype=dtype)
        return DOD(base.sd.unet, base.sd.vae, base.adm, base.sd.schedule, base.prompt_embeddings["prompt"],
                   config.dod, rngs=rngs)
    return nnx.eval_shape(make)
