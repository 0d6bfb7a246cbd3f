"""SSIM (Wang et al. 2004) with an 11-tap Gaussian window, sigma 1.5, K1 = 0.01, K2 = 0.03, over
the valid region (windows entirely inside the image), per channel and averaged: the
definition of scikit-image (gaussian_weights=True, use_sample_covariance=False), pytorch-msssim
and pyiqa. Differentiable, so usable as the stage-2 loss 1 - SSIM.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

WINDOW = 11
SIGMA = 1.5


def gaussian_window(size: int = WINDOW, sigma: float = SIGMA) -> np.ndarray:
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    g = np.exp(-(x ** 2) / (2 * sigma ** 2))
    return (g / g.sum()).astype(np.float32)


def _filter(x, window):
    """Separable Gaussian filter of (B, H, W, C), valid region only."""
    c = x.shape[-1]
    size = window.shape[0]
    dn = ("NHWC", "HWIO", "NHWC")
    rows = jnp.tile(jnp.asarray(window).reshape(size, 1, 1, 1), (1, 1, 1, c))
    cols = jnp.tile(jnp.asarray(window).reshape(1, size, 1, 1), (1, 1, 1, c))
    x = jax.lax.conv_general_dilated(x, rows, (1, 1), "VALID", dimension_numbers=dn, feature_group_count=c,
                                     precision=jax.lax.Precision.HIGHEST)
    return jax.lax.conv_general_dilated(x, cols, (1, 1), "VALID", dimension_numbers=dn, feature_group_count=c,
                                        precision=jax.lax.Precision.HIGHEST)


def batch_ssim(x, y, *, data_range: float, window_size: int = WINDOW, sigma: float = SIGMA,
         k1: float = 0.01, k2: float = 0.03, nonnegative_cs: bool = False):
    """Per-image SSIM of (B, H, W, C) images whose values span `data_range` (2 for [-1, 1]
    images, 1 for [0, 1], 255 for 8-bit values). Computed in float32; returns (B,).
    `nonnegative_cs` clips the contrast-structure term at 0, as pyiqa's metric does."""
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"batch_ssim needs two (B, H, W, C) arrays of one shape, got {x.shape} and {y.shape}")
    if min(x.shape[1:3]) < window_size:
        raise ValueError(f"batch_ssim needs images of at least {window_size}x{window_size}, got {x.shape[1:3]}")
    x, y = x.astype(jnp.float32), y.astype(jnp.float32)
    window = gaussian_window(window_size, sigma)
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    mu_x, mu_y = _filter(x, window), _filter(y, window)
    var_x = _filter(x * x, window) - mu_x ** 2
    var_y = _filter(y * y, window) - mu_y ** 2
    cov = _filter(x * y, window) - mu_x * mu_y
    cs = (2 * cov + c2) / (var_x + var_y + c2)
    if nonnegative_cs:
        cs = jnp.maximum(cs, 0.0)
    ssim_map = (2 * mu_x * mu_y + c1) / (mu_x ** 2 + mu_y ** 2 + c1) * cs
    return ssim_map.mean(axis=(1, 2, 3))


def ssim_loss(restored, target, *, data_range: float = 2.0):
    """1 - mean SSIM, the stage-2 loss term (data range 2 for [-1, 1] images)."""
    return 1.0 - batch_ssim(restored, target, data_range=data_range).mean()
