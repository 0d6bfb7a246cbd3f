"""PSNR and SSIM as the field computes them with pyiqa, in JAX / NumPy.

Images are (H, W, 3) float arrays in [0, 1] (evaluation passes the 8-bit images it writes,
divided by 255). `color` is "rgb" (all three channels) or "y" (pyiqa's luma: the Y of YIQ,
0.299 R + 0.587 G + 0.114 B); `crop_border` pixels are cut from every side first.

- PSNR: 10 log10(1 / (MSE + 1e-8)) over the float values (pyiqa's psnr / psnry).
- SSIM: on values scaled to [0, 255] and rounded, as MATLAB reads 8-bit images, with an
  11-tap Gaussian window (sigma 1.5), the valid region only and the contrast-structure term
  clipped at 0 (pyiqa's ssimc / ssim).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dod_jax.losses.ssim import batch_ssim

COLORS = ("rgb", "y")
Y_WEIGHTS = np.array([0.299, 0.587, 0.114])


def _prepare(image: np.ndarray, color: str, crop_border: int) -> np.ndarray:
    if color not in COLORS:
        raise ValueError(f"color must be one of {COLORS}, got {color!r}")
    image = np.asarray(image, np.float64)
    if crop_border:
        image = image[crop_border:-crop_border, crop_border:-crop_border]
    return image @ Y_WEIGHTS[:, None] if color == "y" else image


def psnr(restored: np.ndarray, reference: np.ndarray, *, color: str = "rgb", crop_border: int = 0) -> float:
    x, y = _prepare(restored, color, crop_border), _prepare(reference, color, crop_border)
    return float(10.0 * np.log10(1.0 / (np.mean((x - y) ** 2) + 1e-8)))


_ssim_255 = jax.jit(lambda x, y: batch_ssim(x, y, data_range=255.0, nonnegative_cs=True))


def ssim(restored: np.ndarray, reference: np.ndarray, *, color: str = "rgb", crop_border: int = 0) -> float:
    x, y = (np.round(_prepare(a, color, crop_border) * 255.0) for a in (restored, reference))
    return float(_ssim_255(jnp.asarray(x[None], jnp.float32), jnp.asarray(y[None], jnp.float32))[0])
