"""The assembled DOD model: MFM -> PLA (CLoRA) -> one UNet step -> HDE.

    c     = mean-pool(ADM middle block(LQ, t=0))                      (B, 1024)
    film  = M_theta(c)                                                (prompts, B, 2r)
    z     = VAE_enc+LoRA(LQ) * scaling_factor, skips kept
    eps   = UNet+CLoRA(z, t=999, prompt embedding)
    x0    = (z - sqrt(1 - abar) eps) / sqrt(abar)
    image = VAE_dec(x0 / scaling_factor) with a DEM before each up-block

Images are NHWC in [-1, 1] with sides that are multiples of 8 (dod_jax.restore.images handles
any other input). The base SD, VAE and ADM weights are frozen; what each training stage
trains is named by STAGE_GROUPS.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dod_jax import adapters
from dod_jax.methods.dod.hde import HDE
from dod_jax.methods.dod.modulator import UNET_GROUPS, Modulator, unet_block_group
from dod_jax.errors import ConfigError
from dod_jax.models.adm import ADMEncoder
from dod_jax.models.layers import normal_per_sample
from dod_jax.models.unet import UNet2DCondition
from dod_jax.models.vae import AutoencoderKL
from dod_jax.schedule import DDPMSchedule

GENERATOR = "gen"  # the adapter set of the restorer (UNet CLoRA and VAE-encoder LoRA)


class PromptEmbedding(nnx.Variable):
    """A fixed text embedding: part of the model's state, never trained."""


LATENTS = ("sample", "mode")
MFM_RESIZES = ("bicubic", "bilinear")


def resize_images(images, size: tuple[int, int], method: str):
    """NHWC images resized (antialiased when shrinking) to `size` by `method` (bicubic or bilinear)."""
    return jax.image.resize(images, images.shape[:1] + tuple(size) + images.shape[3:], method, antialias=True)


class DOD(nnx.Module):
    """`cfg` is the `dod` section of a config (configs/dod.py documents every key); `rngs`
    initialises what DOD adds (nnx.Rngs, or layers.NumpyRngs for a fast host-side init)."""

    def __init__(self, unet: UNet2DCondition, vae: AutoencoderKL, adm: ADMEncoder, schedule: DDPMSchedule,
                 prompt_embedding, cfg: Any, *, rngs):
        self.unet, self.vae, self.adm = unet, vae, adm
        self.schedule = nnx.data(schedule)
        self.prompt_embedding = PromptEmbedding(jnp.asarray(prompt_embedding, jnp.float32))
        if cfg.latent not in LATENTS:
            raise ConfigError(f"dod.latent must be one of {LATENTS}, got {cfg.latent!r}")
        mfm_resize = cfg.mfm_resize
        if mfm_resize not in MFM_RESIZES:
            raise ConfigError(f"dod.mfm_resize must be one of {MFM_RESIZES}, got {mfm_resize!r}")
        self.timestep, self.sample_latent = cfg.timestep, cfg.latent == "sample"
        self.mfm_size, self.mfm_resize = cfg.mfm_size, mfm_resize

        unet_paths = [p for p, _ in adapters.layers(unet) if adapters.matches(p, cfg.unet_targets)]
        if cfg.prompts == "group":
            unet_key, num_prompts = unet_block_group, UNET_GROUPS
        elif cfg.prompts == "layer":
            index = {p: i for i, p in enumerate(unet_paths)}
            unet_key, num_prompts = index.__getitem__, len(unet_paths)
        else:
            raise ConfigError(f"dod.prompts must be 'group' or 'layer', got {cfg.prompts!r}")
        vae_key = None
        if cfg.clora and cfg.clora_in_vae:
            vae_key, num_prompts = (lambda _, k=num_prompts: k), num_prompts + 1  # one more prompt for the encoder
        spec = dict(rank=cfg.rank, alpha=cfg.alpha, literal_gamma=cfg.literal_gamma)
        self.unet_adapted = tuple(adapters.inject(unet, adapters.AdapterSpec(
            GENERATOR, tuple(cfg.unet_targets), film_key=unet_key if cfg.clora else None, **spec), rngs))
        adapters.add_trained_copy(unet, "conv_in", GENERATOR, rngs)  # the generator's trained conv_in
        self.vae_adapted = tuple(adapters.inject(vae, adapters.AdapterSpec(
            GENERATOR, tuple(cfg.vae_targets), scope="encoder.", film_key=vae_key, **spec), rngs))
        self.conditional = cfg.clora
        init = cfg.init
        self.modulator = (Modulator(num_prompts, cfg.rank, feature_dim=adm.config.out_channels, init=init,
                                    rngs=rngs, **cfg.modulator) if cfg.clora else None)
        boc = list(vae.config.block_out_channels)
        skip_channels = ([boc[0]] + boc[:-1])[::-1]
        decoder_inputs = [boc[-1]] + boc[::-1][:-1]
        self.hde = (HDE(skip_channels, decoder_inputs, skip_init=cfg.hde.skip_init, w_init=cfg.hde.w_init,
                        growth=cfg.hde.growth, groups=vae.config.norm_num_groups, official_init=init == "official",
                        dtype=vae.dtype, rngs=rngs) if cfg.hde.enabled else None)

    # ------------------------------------------------------------------------------ pieces

    def mfm_input(self, lq):
        """What the MFM sees of the (unpadded) LQ images: a copy resized to mfm_size x mfm_size by
        mfm_resize, or with mfm_size 0 the images themselves (full resolution)."""
        if not self.mfm_size or lq.shape[1:3] == (self.mfm_size, self.mfm_size):
            return lq
        return resize_images(lq, (self.mfm_size, self.mfm_size), self.mfm_resize)

    def degradation_feature(self, lq):
        """MFM: c of shape (B, 1024) from `mfm_input(lq)`."""
        return jax.lax.stop_gradient(self.adm.features(self.mfm_input(lq)))

    def film(self, lq):
        """M_theta's output for the LQ images, or None when CLoRA is off."""
        return self.modulator(self.degradation_feature(lq)) if self.conditional else None

    def latent_noise(self, keys, lq_shape):
        """The posterior noise for LQ images of `lq_shape` (B, H, W, 3): one key, or one key per
        image (then image i's noise depends on keys[i] alone)."""
        b, h, w, _ = lq_shape
        scale = self.vae.config.downscale
        return normal_per_sample(keys, (b, h // scale, w // scale, self.vae.config.latent_channels))

    def encoder(self, lq, film):
        """The VAE encoder through its LoRA: (posterior, skip features)."""
        with adapters.select(GENERATOR, film):
            return self.vae.encode(lq, return_skips=True)

    def encode(self, lq, film, noise=None):
        """z (scaled latent) and the encoder's skip features, through the encoder LoRA. With
        dod.latent 'sample' (the authors' code) z is the posterior mean + std * `noise`, and
        the noise must be given (latent_noise draws it); with 'mode' z is the mean."""
        posterior, skips = self.encoder(lq, film)
        if self.sample_latent:
            if noise is None:
                raise ValueError("dod.latent is 'sample' (the posterior sample, as the authors' code): pass the "
                                 "posterior noise (DOD.latent_noise) or a key, or set dod.latent='mode'")
            z = posterior.mean + posterior.std * noise.astype(posterior.mean.dtype)
        else:
            z = posterior.mode()
        return z * self.vae.config.scaling_factor, skips

    def generate_latent(self, z, film):
        """x0 of one UNet+CLoRA step at the generator timestep, float32."""
        t = jnp.full((z.shape[0],), self.timestep)
        with adapters.select(GENERATOR, film):
            eps = self.unet(z, t, self.context(z.shape[0]))
        return self.schedule.eps_to_x0(z.astype(jnp.float32), eps.astype(jnp.float32), t)

    def context(self, batch: int, embedding=None):
        """A prompt embedding (the model's own by default) for each of `batch` images, in the
        UNet's compute dtype."""
        embedding = self.prompt_embedding if embedding is None else embedding
        return jnp.broadcast_to(embedding[...], (batch,) + embedding.shape).astype(self.unet.dtype)

    def decode(self, x0, skips, use_hde: bool = True):
        hook = self.hde.hook(skips) if (use_hde and self.hde is not None) else None
        return self.vae.decode(x0 / self.vae.config.scaling_factor, before_up_block=hook).astype(jnp.float32)

    # ---------------------------------------------------------------------------- restore

    def __call__(self, lq, key=None, use_hde: bool = True):
        """Restore NHWC images in [-1, 1] (sides multiples of 8) -> float32 images in [-1, 1]
        (not clipped). `key` (one, or one per image) draws the posterior sample that dod.latent
        'sample' needs; 'mode' ignores it. `use_hde=False` decodes without DEMs (stage 1 trains
        and evaluates the decoder untouched)."""
        noise = self.latent_noise(key, lq.shape) if (self.sample_latent and key is not None) else None
        return self.restore(lq, self.film(lq), noise, use_hde)

    def restore(self, lq, film, noise=None, use_hde: bool = True):
        """As __call__, with M_theta's output `film` computed by the caller (restore computes it
        from the unpadded image) and the posterior `noise` given."""
        _check_size(lq.shape)
        z, skips = self.encode(lq, film, noise)
        return self.decode(self.generate_latent(z, film), skips, use_hde)

    def merge_generator(self, film):
        """Fold the generator's adapters into the base weights for one image's modulation `film`
        (M_theta's output for a batch of 1; None when CLoRA is off); afterwards the model
        restores that image without adapter branches."""
        if film is not None and film.shape[1] != 1:
            raise ValueError(f"merging CLoRA is per image: batch must be 1, got {film.shape[1]}")
        folded = adapters.merge(self.unet, GENERATOR, film) + adapters.merge(self.vae, GENERATOR, film)
        self.conditional = False  # the modulation is in the weights now: restoring skips MFM and M_theta
        return folded


def _check_size(shape):
    if len(shape) != 4 or shape[-1] != 3 or shape[1] % 8 or shape[2] % 8:
        raise ValueError(f"DOD takes (B, H, W, 3) images with H and W multiples of 8, got {tuple(shape)}; "
                         "dod_jax.restore.images.restore_image pads any image")


# ----------------------------------------------------------------------- parameter groups

def _under(*prefix):
    def match(path, _):
        return tuple(path[:len(prefix)]) == prefix
    return match


STAGE_GROUPS = {
    "stage1": {
        "modulator": _under("modulator"),
        "unet_clora": nnx.All(_under("unet"), nnx.Not(_under("unet", "conv_in")), adapters.adapter_filter(GENERATOR)),
        "unet_conv_in": nnx.All(_under("unet", "conv_in"), adapters.adapter_filter(GENERATOR)),
        "vae_encoder_lora": nnx.All(_under("vae", "encoder"), adapters.adapter_filter(GENERATOR)),
    },
    "stage2": {
        "hde": _under("hde"),
    },
}


def trainable(stage: str):
    """The NNX filter of what `stage` ('stage1' or 'stage2') trains."""
    if stage not in STAGE_GROUPS:
        raise ConfigError(f"stage must be one of {sorted(STAGE_GROUPS)}, got {stage!r}")
    return nnx.All(nnx.Param, nnx.Any(*STAGE_GROUPS[stage].values()))


ALL_TRAINED = nnx.Any(*(trainable(s) for s in STAGE_GROUPS))  # what checkpoints and restore bundles hold


def all_trained(model: DOD) -> nnx.State:
    """Every parameter some stage trains (ALL_TRAINED)."""
    return nnx.state(model, ALL_TRAINED)


def parameter_counts(model: DOD) -> dict[str, int]:
    """Parameters per training group, plus the frozen rest."""
    counts = {}
    for stage, groups in STAGE_GROUPS.items():
        for name, f in groups.items():
            counts[f"{stage}/{name}"] = _count(nnx.state(model, nnx.All(nnx.Param, f)))
    everything = _count(nnx.state(model, nnx.Param))
    counts["frozen"] = everything - sum(counts.values())
    return counts


def _count(state) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(state))


def parameter_report(model: DOD) -> str:
    counts = parameter_counts(model)
    width = max(map(len, counts))
    return "\n".join(f"{name:<{width}}  {n:>13,}" for name, n in counts.items())
