"""Colour fixes: give a restoration the colours of its input while keeping its detail.

- adain: per channel, the restoration's mean and standard deviation become the input's.
- wavelet: the restoration's high frequencies plus the input's low frequencies, split by an
  a-trous decomposition (a 3x3 binomial blur at dilations 1, 2, 4, 8, 16; StableSR's fix).

Images are (H, W, 3) float arrays in [0, 1] of one size.
"""

from __future__ import annotations

import numpy as np

WAVELET_LEVELS = 5
_BINOMIAL = np.array([0.25, 0.5, 0.25])


def adain(restored: np.ndarray, reference: np.ndarray) -> np.ndarray:
    axes = (0, 1)
    mean, std = restored.mean(axes), restored.std(axes) + 1e-6
    ref_mean, ref_std = reference.mean(axes), reference.std(axes)
    return np.clip((restored - mean) / std * ref_std + ref_mean, 0.0, 1.0)


def _blur(image: np.ndarray, dilation: int) -> np.ndarray:
    """3x3 binomial blur with taps `dilation` apart, edges replicated (separable)."""
    out = image.astype(np.float64)
    for axis in (0, 1):
        pad = [(0, 0)] * out.ndim
        pad[axis] = (dilation, dilation)
        padded = np.pad(out, pad, mode="edge")
        n = out.shape[axis]
        out = sum(weight * np.take(padded, np.arange(n) + k * dilation, axis=axis) for k, weight in enumerate(_BINOMIAL))
    return out


def split_frequencies(image: np.ndarray, levels: int = WAVELET_LEVELS) -> tuple[np.ndarray, np.ndarray]:
    """(high, low) with high + low == image."""
    low = image.astype(np.float64)
    for level in range(levels):
        low = _blur(low, 2 ** level)
    return image - low, low


def wavelet(restored: np.ndarray, reference: np.ndarray) -> np.ndarray:
    high, _ = split_frequencies(restored)
    _, low = split_frequencies(reference)
    return np.clip(high + low, 0.0, 1.0).astype(np.float32)


COLOR_FIXES = {"none": None, "adain": adain, "wavelet": wavelet}
