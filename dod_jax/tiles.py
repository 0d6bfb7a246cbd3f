"""Tiles over an image or latent, and their Gaussian blending weights.

A tiled pass runs one function on overlapping windows of one fixed size and blends the
outputs with weights that fall off towards each window's border, so seams vanish and the
function compiles once whatever the image size.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

SIGMA_FRACTION = 0.3  # Gaussian sigma as a fraction of the tile side


def starts(length: int, tile: int, overlap: int, multiple: int = 1) -> list[int]:
    """Window starts along one axis: windows of `tile` that cover `length` and overlap by at
    least `overlap`, evenly spread, each start a multiple of `multiple`. One window (at 0)
    when the axis is not longer than the tile."""
    if tile <= 0 or overlap < 0 or overlap >= tile:
        raise ValueError(f"tiles need 0 <= overlap < tile, got tile {tile} and overlap {overlap}")
    if length <= tile:
        return [0]
    count = math.ceil((length - overlap) / (tile - overlap))
    last = length - tile
    if last % multiple:
        raise ValueError(f"length {length} minus tile {tile} is not a multiple of {multiple}")
    return sorted({round(i * last / (count - 1) / multiple) * multiple for i in range(count)})


def gaussian_weights(height: int, width: int) -> np.ndarray:
    """(height, width, 1) weights, largest at the centre, never zero."""
    def axis(n):
        x = np.arange(n, dtype=np.float64) - (n - 1) / 2
        return np.exp(-x ** 2 / (2 * (SIGMA_FRACTION * n) ** 2))
    return np.outer(axis(height), axis(width)).astype(np.float32)[..., None]


def blend(run: Callable[[int, int], np.ndarray], size: tuple[int, int], tile: tuple[int, int], overlap: int,
          scale: int = 1, multiple: int = 1) -> np.ndarray:
    """Blend `run(y, x)` over the windows of an input of `size` = (H, W): `run` returns the
    output for the input window at (y, x) of size `tile`, `scale` times larger on each side
    (8 for a latent decoded to pixels). Returns the (H*scale, W*scale, C) blend."""
    (h, w), (th, tw) = size, tile
    total = weight_sum = None
    weights = gaussian_weights(th * scale, tw * scale)
    for y in starts(h, th, overlap, multiple):
        for x in starts(w, tw, overlap, multiple):
            out = np.asarray(run(y, x), np.float32)
            if total is None:
                total = np.zeros((h * scale, w * scale, out.shape[-1]), np.float32)
                weight_sum = np.zeros((h * scale, w * scale, 1), np.float32)
            window = (slice(y * scale, (y + th) * scale), slice(x * scale, (x + tw) * scale))
            total[window] += out * weights
            weight_sum[window] += weights
    return total / weight_sum
