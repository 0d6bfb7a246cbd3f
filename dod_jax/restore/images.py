"""Any image in, the same kind of image out, around a model that takes (B, H, W, 3) in [-1, 1]
with H and W multiples of 8.

Rules:
- Values: uint8 and uint16 are read as full-scale integers, floats as [0, 1] (clipped). The
  result has the input's dtype.
- Channels: (H, W) and (H, W, 1) grey images are restored as RGB with equal channels and come
  back grey (mean of the restored channels); (H, W, 4) keeps its alpha channel untouched and
  restores RGB; (H, W, 3) is RGB. Other channel counts are refused.
- Size: a short side below `min_side` is first lifted to `min_side` (aspect kept), as the
  authors' code does. Then, by `fit`: 'pad' reflect-pads the sides to multiples of 8 (lifting
  bicubic); 'resize' resizes them down to multiples of 8 (lifting and resizing by Lanczos, as
  the runner of the authors' released model). Either way the result may be reflect-padded
  further to a bucket multiple, is restored, cropped, and resized back to the input's size.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from dod_jax.image_ops import resize_float

MULTIPLE = 8


def to_unit_rgb(image: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """(H, W, 3) float32 in [0, 1], and the alpha channel (or None)."""
    image = np.asarray(image)
    if image.dtype == np.uint8:
        unit = image.astype(np.float32) / 255.0
    elif image.dtype == np.uint16:
        unit = image.astype(np.float32) / 65535.0
    elif np.issubdtype(image.dtype, np.floating):
        unit = np.clip(image.astype(np.float32), 0.0, 1.0)
    else:
        raise ValueError(f"images must be uint8, uint16 or float in [0, 1], got {image.dtype}")
    if unit.ndim == 2:
        unit = unit[..., None]
    if unit.ndim != 3 or unit.shape[-1] not in (1, 3, 4):
        raise ValueError(f"images must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got shape {image.shape}")
    alpha = unit[..., 3] if unit.shape[-1] == 4 else None
    rgb = np.repeat(unit, 3, axis=-1) if unit.shape[-1] == 1 else unit[..., :3]
    return rgb, alpha


def from_unit_rgb(rgb: np.ndarray, alpha: np.ndarray | None, like: np.ndarray) -> np.ndarray:
    """Back to the layout and dtype of `like`."""
    rgb = np.clip(rgb, 0.0, 1.0)
    if like.ndim == 2 or like.shape[-1] == 1:
        out = rgb.mean(axis=-1)
        out = out if like.ndim == 2 else out[..., None]
    else:
        out = rgb if alpha is None else np.concatenate([rgb, alpha[..., None]], axis=-1)
    if like.dtype == np.uint8:
        return np.round(out * 255.0).astype(np.uint8)
    if like.dtype == np.uint16:
        return np.round(out * 65535.0).astype(np.uint16)
    return out.astype(like.dtype)


FITS = {"pad": "bicubic", "resize": "lanczos"}  # how sides become multiples of 8 -> the resampler it uses


@dataclasses.dataclass
class Prepared:
    """An image ready for the model: `padded` (H', W', 3) in [0, 1], sides multiples of the
    padding multiple; what `finish` needs to give the restoration the input's own form."""
    padded: np.ndarray
    lifted: tuple[int, int]        # size after lifting (and resizing), before padding
    alpha: np.ndarray | None
    original: np.ndarray           # the input, for its size, layout and dtype
    resampler: str = "bicubic"

    @property
    def rgb(self) -> np.ndarray:
        """The input as [0, 1] RGB at the lifted size, unpadded (what the MFM sees and colour
        fixes match against)."""
        return self.padded[:self.lifted[0], :self.lifted[1]]


def prepare(image: np.ndarray, *, min_side: int = 256, multiple: int = MULTIPLE, fit: str = "pad") -> Prepared:
    """Lift a short side below `min_side` (aspect kept), bring the sides to multiples of 8 by
    `fit` ('pad' or 'resize'), and reflect-pad to multiples of `multiple` (8, or a larger
    bucket so that nearby sizes share one compiled shape)."""
    if multiple % MULTIPLE:
        raise ValueError(f"the padding multiple must be a multiple of {MULTIPLE}, got {multiple}")
    if fit not in FITS:
        raise ValueError(f"fit must be one of {sorted(FITS)}, got {fit!r}")
    resampler = FITS[fit]
    rgb, alpha = to_unit_rgb(image)
    h, w = rgb.shape[:2]
    short = min(h, w)
    if short < max(min_side, MULTIPLE):
        if min_side < MULTIPLE:
            raise ValueError(f"image of {h}x{w} is smaller than {MULTIPLE} pixels on a side; set min_side to lift it")
        scale = min_side / short
        rgb = resize_float(rgb, (max(min_side, round(h * scale)), max(min_side, round(w * scale))), resampler)
    if fit == "resize":
        rgb = resize_float(rgb, (rgb.shape[0] // MULTIPLE * MULTIPLE, rgb.shape[1] // MULTIPLE * MULTIPLE), resampler)
    lh, lw = rgb.shape[:2]
    padded = np.pad(rgb, ((0, -lh % multiple), (0, -lw % multiple), (0, 0)), mode="reflect")
    return Prepared(padded, (lh, lw), alpha, np.asarray(image), resampler)


def finish(prepared: Prepared, restored: np.ndarray) -> np.ndarray:
    """The model's output for `prepared.padded` ((H', W', 3) in [0, 1]) cropped, resized back
    and in the input's layout and dtype."""
    lh, lw = prepared.lifted
    h, w = prepared.original.shape[:2]
    back = resize_float(np.clip(restored[:lh, :lw], 0.0, 1.0), (h, w), prepared.resampler)
    return from_unit_rgb(back, prepared.alpha, prepared.original)


def restore_image(restore: Callable[[np.ndarray], np.ndarray], image: np.ndarray, *, min_side: int = 256) -> np.ndarray:
    """Run `restore` ((1, H, W, 3) in [-1, 1] -> same) on an image of any size and layout."""
    prepared = prepare(image, min_side=min_side)
    restored = np.asarray(restore(prepared.padded[None] * 2.0 - 1.0), np.float32)[0]
    return finish(prepared, (restored + 1.0) / 2.0)
