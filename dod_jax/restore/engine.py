"""DOD restoring images of any size, with compiled shapes reused.

Each image is lifted to a minimum short side and reflect-padded to a multiple of `bucket`
(dod_jax.dod.images.prepare), so images of nearby sizes share one compiled shape. Images at or
below `tile_above` padded pixels are restored whole, in batches of `batch_size` images of one
shape (a short batch is filled with repeats, so it reuses the compiled batch). Larger images
are restored in tiles of `tile` pixels that overlap by `tile_overlap`:

1. M_theta's modulation from the whole image: the MFM resizes it to dod.mfm_size, or with
   mfm_size 0 (full resolution) its features c are averaged over the tiles, so that the ADM
   sees pixels at the scale of training crops and no full-size activations are held;
2. the VAE encoder on each pixel tile; the latents are blended with Gaussian weights;
3. the UNet step on each latent tile, x0 blended the same way;
4. the decoder on each latent tile, its DEMs fed by the encoder skips of the same pixel
   tile (encoded again, so no full-size skip maps are held), the pixels blended.

Every tile has one shape, so a 4K photo compiles the three tile functions once and holds only
one tile's activations at a time. The colour fix (none / adain / wavelet) matches the
restoration to the input at the end.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dod_jax.dod.images import MULTIPLE, Prepared, finish, prepare
from dod_jax.dod.model import DOD
from dod_jax.errors import ConfigError
from dod_jax.restore.color import COLOR_FIXES
from dod_jax.restore.tiles import blend, starts

@dataclasses.dataclass
class RestoreSettings:
    batch_size: int = 1
    bucket: int = 64               # pad sides to multiples of this (a multiple of 8)
    tile: int = 512                # tile side in pixels (a multiple of 8)
    tile_overlap: int = 64         # pixels (a multiple of 8)
    tile_above: int = 1024 * 1024  # padded pixels above which an image is restored in tiles; 0 = always
    color_fix: str = "none"        # none | adain | wavelet
    min_side: int = 256            # shorter sides are lifted to this first (bicubic), as the authors' code

    @classmethod
    def from_config(cls, config, **overrides) -> "RestoreSettings":
        """The settings a model's config recommends (its `restore` section, when it has one;
        configs/dod.py documents it), then `overrides`."""
        recommended = dict(config.restore) if "restore" in config else {}
        unknown = set(recommended) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"restore.{sorted(unknown)[0]}: not a restore setting "
                              f"(those are {[f.name for f in dataclasses.fields(cls)]})")
        return cls(**{**recommended, **overrides})

    def check(self):
        if self.color_fix not in COLOR_FIXES:
            raise ConfigError(f"color_fix must be one of {sorted(COLOR_FIXES)}, got {self.color_fix!r}")
        for name in ("bucket", "tile", "tile_overlap"):
            if getattr(self, name) % MULTIPLE:
                raise ConfigError(f"{name} must be a multiple of {MULTIPLE}, got {getattr(self, name)}")
        if not 0 <= self.tile_overlap < self.tile:
            raise ConfigError(f"tile_overlap must be in [0, tile), got {self.tile_overlap} with tile {self.tile}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {self.batch_size}")


class Restorer:
    """`restore(images)` for a list of images (any size, layout, dtype; see dod.images).
    `use_hde=False` decodes without DEMs (a stage-1 model). `status(text)`, when given, hears
    "compiling ..." before a call that compiles a new shape and "" once it has run (progress
    bars show it, as the first image of a shape can take a minute)."""

    def __init__(self, model: DOD, settings: RestoreSettings | None = None, *, use_hde: bool = True,
                 status: Callable[[str], None] | None = None):
        self.settings = settings or RestoreSettings()
        self.settings.check()
        self.status = status
        self._compiled: set[tuple] = set()
        self.mfm_size, self.use_hde, self.conditional = model.mfm_size, use_hde, model.conditional
        self.latent_scale = 2 ** (len(model.vae.config.block_out_channels) - 1)  # pixels per latent
        graphdef, self.state = nnx.split(model)
        dod = lambda state: nnx.merge(graphdef, state)

        def decode(state, lq, x0, film):
            m = dod(state)
            skips = m.encode(lq, film)[1] if (use_hde and m.hde is not None) else None
            return m.decode(x0, skips, use_hde)

        def merged(state, lq):
            m = dod(state)
            m.merge_generator(lq)
            return m(lq, use_hde=use_hde)

        self._whole = jax.jit(lambda state, lq: dod(state)(lq, use_hde=use_hde))
        self._merged = jax.jit(merged)
        self._film = jax.jit(lambda state, lq: dod(state).film(lq))
        self._feature = jax.jit(lambda state, lq: dod(state).degradation_feature(lq))
        self._modulate = jax.jit(lambda state, c: dod(state).modulator(c))
        self._encode = jax.jit(lambda state, lq, film: dod(state).encode(lq, film)[0])
        self._latent = jax.jit(lambda state, z, film: dod(state).generate_latent(z, film))
        self._decode = jax.jit(decode)

    # ------------------------------------------------------------------------------ public

    def restore(self, images: Iterable[np.ndarray]) -> list[np.ndarray]:
        """The restorations, each in its input's size, layout and dtype."""
        s = self.settings
        prepared = [prepare(image, min_side=s.min_side, multiple=s.bucket) for image in images]
        restored: list[np.ndarray | None] = [None] * len(prepared)
        whole: dict[tuple[int, int], list[int]] = {}
        for i, p in enumerate(prepared):
            if self.tiled(p.padded.shape[:2]):
                restored[i] = self._restore_tiled(p.padded)
            else:
                whole.setdefault(p.padded.shape[:2], []).append(i)
        for indices in whole.values():
            for start in range(0, len(indices), s.batch_size):
                chunk = indices[start:start + s.batch_size]
                batch = np.stack([prepared[i].padded for i in chunk])
                filled = np.concatenate([batch, np.repeat(batch[-1:], s.batch_size - len(chunk), 0)])
                lq = jnp.asarray(filled * 2.0 - 1.0)
                out = np.asarray(self._compiling(self._whole, "restore step", self.state, lq), np.float32)
                for j, i in enumerate(chunk):
                    restored[i] = (out[j] + 1.0) / 2.0
        return [self._finish(p, r) for p, r in zip(prepared, restored)]

    def _compiling(self, fn: Callable, name: str, *args):
        """fn(*args), reporting the compile when this (function, shapes) pair is new."""
        shapes = tuple(a.shape for a in args[1:] if hasattr(a, "shape"))
        key = (name,) + shapes
        if key in self._compiled or self.status is None:
            return fn(*args)
        self.status(f"compiling the {name} ({'x'.join(map(str, shapes[0]))})")
        out = jax.block_until_ready(fn(*args))
        self._compiled.add(key)
        self.status("")
        return out

    def tiled(self, padded_size: tuple[int, int]) -> bool:
        return padded_size[0] * padded_size[1] > self.settings.tile_above

    def time(self, size: int = 512, batch: int = 1, runs: int = 10, warmup: int = 2, merged: bool = False) -> dict:
        """Latency of the whole-image path on random images of size x size (after `warmup`
        compiled calls): seconds per batch and per image, images per second. `merged` folds
        CLoRA into the weights inside the timed call (batch 1, as per-image merging needs)."""
        if merged and batch != 1:
            raise ValueError("merged CLoRA restores one image per call: batch must be 1")
        fn = self._merged if merged else self._whole
        lq = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (batch, size, size, 3)), jnp.float32)
        for _ in range(warmup):
            jax.block_until_ready(fn(self.state, lq))
        seconds = []
        for _ in range(runs):
            start = time.perf_counter()
            jax.block_until_ready(fn(self.state, lq))
            seconds.append(time.perf_counter() - start)
        per_batch = float(np.median(seconds))
        return {"size": size, "batch": batch, "merged_clora": merged, "runs": runs, "warmup": warmup,
                "seconds_per_batch": per_batch, "seconds_per_image": per_batch / batch,
                "images_per_second": batch / per_batch, "device": str(jax.devices()[0]),
                "backend": jax.default_backend()}

    # ------------------------------------------------------------------------------ tiles

    def _restore_tiled(self, padded: np.ndarray) -> np.ndarray:
        """(H, W, 3) in [0, 1], H and W multiples of 8 -> the restoration in [0, 1]."""
        s = self.settings
        h, w = padded.shape[:2]
        lq = padded * 2.0 - 1.0
        scale = self.latent_scale
        size = (h // scale, w // scale)
        tile = (min(s.tile, h) // scale, min(s.tile, w) // scale)
        overlap = min(s.tile_overlap // scale, min(tile) - 1)

        def pixels(y, x):
            return jnp.asarray(lq[None, y * scale:(y + tile[0]) * scale, x * scale:(x + tile[1]) * scale])

        if self.mfm_size or not self.conditional:  # the MFM resizes the whole image itself
            film = self._compiling(self._film, "modulation", self.state, jnp.asarray(lq[None]))
        else:  # full resolution, as the MFM saw training crops: c averaged over the tiles
            features = [self._compiling(self._feature, "MFM tile", self.state, pixels(y, x))
                        for y in starts(size[0], tile[0], overlap) for x in starts(size[1], tile[1], overlap)]
            film = self._compiling(self._modulate, "modulation", self.state, jnp.mean(jnp.stack(features), axis=0))

        def latent_tile(array, y, x):
            return jnp.asarray(array[None, y:y + tile[0], x:x + tile[1]])

        z = blend(lambda y, x: self._compiling(self._encode, "encoder tile", self.state, pixels(y, x), film)[0],
                  size, tile, overlap)
        x0 = blend(lambda y, x: self._compiling(self._latent, "UNet tile", self.state, latent_tile(z, y, x), film)[0],
                   size, tile, overlap)
        out = blend(lambda y, x: self._compiling(self._decode, "decoder tile", self.state, pixels(y, x),
                                                 latent_tile(x0, y, x), film)[0],
                    size, tile, overlap, scale=scale)
        return (out + 1.0) / 2.0

    def _finish(self, prepared: Prepared, restored: np.ndarray) -> np.ndarray:
        fix = COLOR_FIXES[self.settings.color_fix]
        if fix is not None:
            lh, lw = prepared.lifted
            restored = fix(np.clip(restored[:lh, :lw], 0.0, 1.0), prepared.rgb)
        return finish(prepared, restored)
