"""Restoring images of any size with a method's runner (dod_jax.methods), compiled shapes reused.

Each image is lifted to a minimum short side, brought to multiples of 8 (reflect padding, or
with `fit='resize'` a Lanczos resize down, as the runner of DOD's released model) and
reflect-padded to a multiple of `bucket` (dod_jax.restore.images.prepare), so images of nearby
sizes share one compiled shape. Images at or below `tile_above` padded pixels are restored
whole, in batches of `batch_size` images of one shape (a short batch is filled with repeats, so
it reuses the compiled batch). Larger images go to the runner's own tiled restore (DOD's:
dod_jax.methods.dod.restore), or else are restored in pixel tiles of `tile` overlapping by
`tile_overlap`, blended with Gaussian weights. The colour fix (none / adain / wavelet) matches
the restoration to the input at the end.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from dod_jax.errors import ConfigError
from dod_jax.restore.color import COLOR_FIXES
from dod_jax.restore.images import FITS, MULTIPLE, Prepared, finish, prepare
from dod_jax.tiles import blend

TILINGS = ("pixel", "latent")  # large images: pixel tiles, or a latent method's latent tiles


@dataclasses.dataclass
class RestoreSettings:
    batch_size: int = 1
    bucket: int = 64               # pad sides to multiples of this (a multiple of 8)
    tile: int = 512                # tile side in pixels (a multiple of 8)
    tile_overlap: int = 64         # pixels (a multiple of 8)
    tile_above: int = 1024 * 1024  # padded pixels above which an image is restored in tiles; 0 = always
    color_fix: str = "none"        # none | adain | wavelet
    min_side: int = 256            # shorter sides are lifted to this first, as the authors' code
    fit: str = "pad"               # sides to multiples of 8: pad (reflect) | resize (Lanczos, down)
    tiling: str = "pixel"          # pixel (VAE and UNet in pixel tiles) | latent (the UNet alone, as the authors)
    seed: int = 0                  # the posterior noise of dod.latent 'sample'

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
        if self.fit not in FITS:
            raise ConfigError(f"fit must be one of {sorted(FITS)}, got {self.fit!r}")
        if self.tiling not in TILINGS:
            raise ConfigError(f"tiling must be one of {TILINGS}, got {self.tiling!r}")
        for name in ("bucket", "tile", "tile_overlap"):
            if getattr(self, name) % MULTIPLE:
                raise ConfigError(f"{name} must be a multiple of {MULTIPLE}, got {getattr(self, name)}")
        if not 0 <= self.tile_overlap < self.tile:
            raise ConfigError(f"tile_overlap must be in [0, tile), got {self.tile_overlap} with tile {self.tile}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {self.batch_size}")


def restored_in_batches(restorer: "Restorer", items: Sequence, read: Callable, *, desc: str,
                        skipped: tuple[type[Exception], ...] = (), on_skip: Callable | None = None) -> Iterator[tuple]:
    """(item, image, extra, restoration, seconds per image of its batch) for each of `items`,
    restored in batches of the restorer's batch size under a progress bar named `desc` (which
    also shows when a new shape compiles). `read(item)` gives (image, extra); an item whose
    read raises one of `skipped` goes to `on_skip(item, error)` and is left out."""
    size = restorer.settings.batch_size
    progress = tqdm(total=len(items), desc=desc, unit="image", dynamic_ncols=True)
    restorer.status = progress.set_postfix_str
    try:
        for start in range(0, len(items), size):
            chunk = []
            for item in items[start:start + size]:
                try:
                    chunk.append((item, *read(item)))
                except skipped as e:
                    on_skip(item, e)
                    progress.update(1)
            if not chunk:
                continue
            began = time.perf_counter()
            restored = restorer.restore([image for _, image, _ in chunk])
            seconds = (time.perf_counter() - began) / len(chunk)
            for (item, image, extra), result in zip(chunk, restored):
                yield item, image, extra, result, seconds
                progress.update(1)
    finally:
        progress.close()


class Restorer:
    """`restore(images)` for a list of images (any size, layout, dtype; see restore.images)
    with a method's runner (Method.runner). `status(text)`, when given, hears "compiling ..."
    before a call that compiles a new shape and "" once it has run (progress bars show it, as
    the first image of a shape can take a minute)."""

    def __init__(self, runner, settings: RestoreSettings | None = None, *,
                 status: Callable[[str], None] | None = None):
        self.runner = runner
        self.settings = settings or RestoreSettings()
        self.settings.check()
        self.status = status
        self._compiled: set[tuple] = set()

    def restore(self, images: Iterable[np.ndarray]) -> list[np.ndarray]:
        """The restorations, each in its input's size, layout and dtype."""
        s = self.settings
        prepared = [prepare(image, min_side=s.min_side, multiple=s.bucket, fit=s.fit) for image in images]
        restored: list[np.ndarray | None] = [None] * len(prepared)
        whole: dict[tuple[int, int], list[int]] = {}
        for i, p in enumerate(prepared):
            if self.tiled(p.padded.shape[:2]):
                restored[i] = self._restore_tiled(p)
            else:
                whole.setdefault(p.padded.shape[:2], []).append(i)
        for indices in whole.values():
            for start in range(0, len(indices), s.batch_size):
                chunk = indices[start:start + s.batch_size]
                filled = [prepared[i] for i in chunk + [chunk[-1]] * (s.batch_size - len(chunk))]
                lq = jnp.asarray(np.stack([p.padded for p in filled]) * 2.0 - 1.0)
                out = np.asarray(self.runner.restore_batch(lq, filled, self), np.float32)
                for j, i in enumerate(chunk):
                    restored[i] = (out[j] + 1.0) / 2.0
        return [self._finish(p, r) for p, r in zip(prepared, restored)]

    def compiling(self, fn: Callable, name: str, *args):
        """fn(*args), reporting the compile when this (function, shapes) pair is new."""
        shapes = tuple(a.shape for a in args if hasattr(a, "shape"))
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

    def _restore_tiled(self, prepared: Prepared) -> np.ndarray:
        """One large image -> its restoration (H', W', 3) in [0, 1]: the runner's own tiling, or
        pixel tiles restored as batches of one and blended."""
        if hasattr(self.runner, "restore_tiled"):
            return self.runner.restore_tiled(prepared, self)
        s, padded = self.settings, prepared.padded
        h, w = padded.shape[:2]
        tile = (min(s.tile, h), min(s.tile, w))
        overlap = min(s.tile_overlap, min(tile) - 1)

        def one(y, x):
            lq = jnp.asarray(padded[None, y:y + tile[0], x:x + tile[1]] * 2.0 - 1.0)
            return np.asarray(self.runner.restore_batch(lq, [prepared], self)[0], np.float32)

        return (blend(one, (h, w), tile, overlap) + 1.0) / 2.0

    def _finish(self, prepared: Prepared, restored: np.ndarray) -> np.ndarray:
        fix = COLOR_FIXES[self.settings.color_fix]
        if fix is not None:
            lh, lw = prepared.lifted
            restored = fix(np.clip(restored[:lh, :lw], 0.0, 1.0), prepared.rgb)
        return finish(prepared, restored)
