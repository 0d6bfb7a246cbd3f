"""DOD's runner for the restore engine (dod_jax.restore.engine; the interface in
dod_jax.methods): the compiled pieces of DOD's forward and what it needs per image.

Per image, before the model runs:
- M_theta's modulation from the unpadded image (the MFM never sees padding): a copy resized
  to dod.mfm_size (one compiled shape), or with mfm_size 0 the image at full resolution
  (restored whole) or its ADM features c averaged over tiles inside the unpadded image (tiled);
- the posterior noise (dod.latent 'sample', as the authors' code) from the restore seed and
  the image's content, so one image gets one noise whatever its batch, order or tiling.

Large images are restored in tiles by the restore settings' `tiling`:
- 'pixel': pixel tiles of `tile` pixels overlapping by `tile_overlap`; the VAE encoder on each
  pixel tile, latents blended with Gaussian weights; the UNet step on each latent tile, x0
  blended the same way; the decoder on each latent tile, its DEMs fed by the encoder skips of
  the same pixel tile (encoded again, so no full-size skip maps are held), the pixels blended.
  Every tile has one shape, so a 4K photo compiles the tile functions once and holds only one
  tile's activations at a time.
- 'latent' (the authors' code): the VAE runs whole, the UNet alone on latent tiles of
  tile / 8 latents overlapping by tile_overlap / 8, blended with Gaussian weights in float32.

PRESETS name sets of settings; 'official' is the authors' inference in one word.
"""

from __future__ import annotations

import dataclasses
import functools
import time
import zlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dod_jax.methods.dod.model import DOD
from dod_jax.tiles import blend, starts

MULTIPLE = 8  # DOD's sides: multiples of the VAE's downscale

# The authors' inference (REFERENCE.md, "Inference in the authors' code"): `restore` overrides
# the restore settings, `config` the model's config. Sides resized (Lanczos) down to multiples of
# 8 and not padded; the UNet alone tiled in latent tiles of 96 overlapping by 32 (OSEDiff's
# defaults, the code DOD's is built on) above 96 x 96 latents; the MFM on a bicubic, antialiased
# 256 x 256 copy; the latent a posterior sample.
PRESETS = {
    "official": {
        "restore": {"fit": "resize", "bucket": MULTIPLE, "tiling": "latent", "tile": 768, "tile_overlap": 256,
                    "tile_above": 768 * 768, "min_side": 256, "color_fix": "none"},
        "config": {"dod": {"mfm_size": 256, "mfm_resize": "bicubic", "latent": "sample"}},
    },
}


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class _Paths:
    """State paths, returned from a compiled function as static data (no arrays)."""
    paths: tuple


def state_arrays(state: nnx.State) -> dict:
    """{path: array} of a state (each Variable's value): which arrays two states share."""
    return {path: entry.get_value() if isinstance(entry, nnx.Variable) else entry
            for path, entry in nnx.to_flat_state(state)}


def fold_for(graphdef: nnx.GraphDef, state: nnx.State, film):
    """The generator of the DOD model (graphdef, state) folded for the modulation `film` of one
    image: (merged graphdef, the state entries the fold wrote, the paths of those it left as they
    were). Compiled, only written entries are outputs: an output that is an unchanged input is
    still a copy, and the whole state at SD 2.1's size is 5 GB an image."""
    given = state_arrays(state)
    model = nnx.merge(graphdef, state)
    model.merge_generator(film)
    merged_graphdef, merged = nnx.split(model)
    merged_arrays = state_arrays(merged)
    written = [(path, entry) for path, entry in nnx.to_flat_state(merged) if merged_arrays[path] is not given.get(path)]
    kept = tuple(path for path, array in merged_arrays.items() if array is given.get(path))
    return merged_graphdef, nnx.from_flat_state(written), _Paths(kept)


@functools.partial(jax.jit, static_argnums=0)
def _fold(graphdef: nnx.GraphDef, state: nnx.State, lq):
    """fold_for with M_theta's modulation of `lq`, in one compiled call."""
    return fold_for(graphdef, state, nnx.merge(graphdef, state).film(lq))


def merge_generator(graphdef: nnx.GraphDef, state: nnx.State, lq) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, state) of the DOD model (graphdef, state) with its generator folded into the
    base weights for one image `lq` (dod.model.DOD.merge_generator, M_theta's modulation from
    what the MFM sees of it), compiled on its own: pass its output to the restore as inputs. A fold
    computed in the same compiled function as the forward puts `x @ (W0 + A diag(gamma) B)` in
    one XLA computation, which the opt-in YNNPACK dot fusion gets wrong at SD 2.1 widths
    (dod_jax/__init__.py). The merged state shares the arrays the fold leaves alone with `state`."""
    merged_graphdef, written, kept = _fold(graphdef, state, lq)
    given = dict(nnx.to_flat_state(state))
    return merged_graphdef, nnx.from_flat_state(list(nnx.to_flat_state(written)) + [(p, given[p]) for p in kept.paths])


def content_seed(image: np.ndarray) -> int:
    """A number drawn from an image's pixels: its posterior noise is folded from it."""
    return zlib.crc32(np.ascontiguousarray(image).tobytes()) & 0x7FFFFFFF


def image_key(seed: int, content):
    """The key of one image's posterior noise: the run's seed folded with its content_seed."""
    return jax.random.fold_in(jax.random.key(seed), content)


class DODRunner:
    """DOD restoring prepared images for the restore engine. `use_hde=False` decodes without
    DEMs (a stage-1 model); `seed` draws the posterior noise of dod.latent 'sample'."""

    def __init__(self, model: DOD, *, use_hde: bool = True, seed: int = 0):
        self.mfm_size, self.use_hde, self.conditional = model.mfm_size, use_hde, model.conditional
        self.sample_latent, self.seed = model.sample_latent, seed
        self.mfm_input = model.mfm_input  # the resize runs eagerly: its input's shape varies per image
        self.latent_scale = model.vae.config.downscale  # pixels per latent
        self.latent_channels = model.vae.config.latent_channels
        graphdef, self.state = nnx.split(model)
        self.graphdef = graphdef
        dod = lambda state: nnx.merge(graphdef, state)

        def noise(m, lq, seeds):
            if not m.sample_latent:
                return None
            return m.latent_noise(jax.vmap(lambda s: image_key(seed, s))(seeds), lq.shape)

        def whole(state, lq, film, seeds):
            m = dod(state)
            return m.restore(lq, film, noise(m, lq, seeds), use_hde)

        def merged(merged_graphdef, merged_state, lq, seeds):
            m = nnx.merge(merged_graphdef, merged_state)
            return m.restore(lq, None, noise(m, lq, seeds), use_hde)

        def decode_tile(state, lq, x0, film):
            m = dod(state)
            skips = m.encoder(lq, film)[1] if (use_hde and m.hde is not None) else None
            return m.decode(x0, skips, use_hde)

        def decode_whole(state, x0, skips):
            return dod(state).decode(x0, skips, use_hde)

        self._whole = jax.jit(whole)
        self._merged = jax.jit(merged, static_argnums=0)
        self._film = jax.jit(lambda state, mfm_input: dod(state).film(mfm_input))
        self._feature = jax.jit(lambda state, lq: dod(state).degradation_feature(lq))
        self._modulate = jax.jit(lambda state, c: dod(state).modulator(c))
        self._encode = jax.jit(lambda state, lq, film, noise: dod(state).encode(lq, film, noise)[0])
        self._encode_with_skips = jax.jit(lambda state, lq, film, noise: dod(state).encode(lq, film, noise))
        self._latent = jax.jit(lambda state, z, film: dod(state).generate_latent(z, film))
        self._decode_tile = jax.jit(decode_tile)
        self._decode_whole = jax.jit(decode_whole)

    def restore_batch(self, lq, prepared: list, engine) -> np.ndarray:
        """lq (B, H, W, 3) in [-1, 1] of the padded `prepared` images -> their restorations."""
        films = [self._film_of(p, engine) for p in prepared]
        film = None if films[0] is None else jnp.concatenate(films, axis=1)  # (prompts, batch, 2r)
        seeds = jnp.asarray([content_seed(p.padded) for p in prepared], jnp.uint32)
        return engine.compiling(self._whole, "restore step", self.state, lq, film, seeds)

    def _film_of(self, prepared, engine):
        """M_theta's output (prompts, 1, 2r) for one image, from its unpadded pixels; None when
        CLoRA is off."""
        if not self.conditional:
            return None
        compiling, s = engine.compiling, engine.settings
        unpadded = jnp.asarray(prepared.rgb[None] * 2.0 - 1.0)
        if self.mfm_size:
            return compiling(self._film, "modulation", self.state, self.mfm_input(unpadded))
        if not engine.tiled(prepared.padded.shape[:2]):
            return compiling(self._film, "modulation", self.state, unpadded)
        # Full resolution on a large image: c averaged over tiles inside the unpadded image.
        (h, w), tile = prepared.lifted, s.tile
        th, tw = min(tile, h), min(tile, w)
        overlap = min(s.tile_overlap, th - 1, tw - 1)
        features = [compiling(self._feature, "MFM tile", self.state, unpadded[:, y:y + th, x:x + tw])
                    for y in starts(h, th, overlap) for x in starts(w, tw, overlap)]
        return compiling(self._modulate, "modulation", self.state, jnp.mean(jnp.stack(features), axis=0))

    def _noise_of(self, prepared):
        """The posterior noise (H'/8, W'/8, C) of one padded image, as the whole path draws it;
        None for dod.latent 'mode'."""
        if not self.sample_latent:
            return None
        h, w = (n // self.latent_scale for n in prepared.padded.shape[:2])
        key = image_key(self.seed, content_seed(prepared.padded))
        return np.asarray(jax.random.normal(key, (h, w, self.latent_channels)))

    def time(self, size: int = 512, batch: int = 1, runs: int = 10, warmup: int = 2, merged: bool = False) -> dict:
        """Latency of the whole-image path on random images of size x size (after `warmup`
        compiled calls): seconds per batch and per image, images per second. `merged` folds
        CLoRA into the weights for the image (its own compiled call, timed with the restore; batch
        1, as per-image merging needs) and restores with the merged weights."""
        if merged and batch != 1:
            raise ValueError("merged CLoRA restores one image per call: batch must be 1")
        lq = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (batch, size, size, 3)), jnp.float32)
        seeds = jnp.arange(batch, dtype=jnp.uint32)
        if merged:
            def call():
                merged_graphdef, merged_state = merge_generator(self.graphdef, self.state, lq)
                return self._merged(merged_graphdef, merged_state, lq, seeds)
        else:
            film = self._film(self.state, lq) if self.conditional else None
            call = lambda: self._whole(self.state, lq, film, seeds)
        for _ in range(warmup):
            jax.block_until_ready(call())
        seconds = []
        for _ in range(runs):
            start = time.perf_counter()
            jax.block_until_ready(call())
            seconds.append(time.perf_counter() - start)
        per_batch = float(np.median(seconds))
        return {"variant": f"{'merged' if merged else 'unmerged'} CLoRA", "size": size, "batch": batch,
                "merged_clora": merged, "runs": runs, "warmup": warmup,
                "seconds_per_batch": per_batch, "seconds_per_image": per_batch / batch,
                "images_per_second": batch / per_batch, "device": str(jax.devices()[0]),
                "backend": jax.default_backend()}

    def timings(self, size: int, batch_size: int, runs: int, warmup: int) -> list[dict]:
        """`time` of one image unmerged and merged, and of a batch of `batch_size` when it is larger."""
        report = [self.time(size, 1, runs, warmup), self.time(size, 1, runs, warmup, merged=True)]
        if batch_size > 1:
            report.append(self.time(size, batch_size, runs, warmup))
        return report

    def restore_tiled(self, prepared, engine) -> np.ndarray:
        """One large image in tiles (by settings.tiling) -> its restoration (H', W', 3) in [0, 1]."""
        s, compiling = engine.settings, engine.compiling
        padded = prepared.padded
        h, w = padded.shape[:2]
        lq = padded * 2.0 - 1.0
        scale = self.latent_scale
        size = (h // scale, w // scale)
        tile = (min(s.tile, h) // scale, min(s.tile, w) // scale)
        overlap = min(s.tile_overlap // scale, min(tile) - 1)
        film, noise = self._film_of(prepared, engine), self._noise_of(prepared)

        def latent_tile(array, y, x):
            return None if array is None else jnp.asarray(array[None, y:y + tile[0], x:x + tile[1]])

        if s.tiling == "latent":  # the VAE whole, the UNet alone in latent tiles
            z, skips = compiling(self._encode_with_skips, "encoder", self.state, jnp.asarray(lq[None]), film,
                                 None if noise is None else jnp.asarray(noise[None]))
            z = np.asarray(z[0], np.float32)
            x0 = blend(lambda y, x: compiling(self._latent, "UNet tile", self.state, latent_tile(z, y, x),
                                                    film)[0], size, tile, overlap)
            out = np.asarray(compiling(self._decode_whole, "decoder", self.state, jnp.asarray(x0[None]),
                                             skips)[0], np.float32)
            return (out + 1.0) / 2.0

        def pixels(y, x):
            return jnp.asarray(lq[None, y * scale:(y + tile[0]) * scale, x * scale:(x + tile[1]) * scale])

        z = blend(lambda y, x: compiling(self._encode, "encoder tile", self.state, pixels(y, x), film,
                                               latent_tile(noise, y, x))[0], size, tile, overlap)
        x0 = blend(lambda y, x: compiling(self._latent, "UNet tile", self.state, latent_tile(z, y, x), film)[0],
                   size, tile, overlap)
        out = blend(lambda y, x: compiling(self._decode_tile, "decoder tile", self.state, pixels(y, x),
                                                 latent_tile(x0, y, x), film)[0],
                    size, tile, overlap, scale=scale)
        return (out + 1.0) / 2.0
