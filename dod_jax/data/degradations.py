"""Synthetic degradations: pure functions of a clean image and a seed.

Every function takes an (H, W, 3) float32 RGB image in [0, 1] and returns one of the same shape,
clipped to [0, 1] unless stated. `seed` (an int or a sequence of ints) fixes every random
choice, so the same call gives the same image.
"""

from __future__ import annotations

import io
from typing import Sequence

import numpy as np
from PIL import Image

Seed = int | Sequence[int]


def _rng(seed: Seed) -> np.random.Generator:
    return np.random.default_rng(seed)


def gaussian_noise(clean: np.ndarray, sigma: float, seed: Seed) -> np.ndarray:
    """Additive white Gaussian noise with standard deviation `sigma` on the 0-255 scale (the
    denoising benchmarks' sigma 15 / 25 / 50), clipped to [0, 1]."""
    noise = _rng(seed).standard_normal(clean.shape).astype(np.float32) * (sigma / 255.0)
    return np.clip(clean + noise, 0.0, 1.0)


def default_depth(h: int, w: int) -> np.ndarray:
    """A scene depth for images without one: 1 at the top row (far, sky) falling linearly to 0.2
    at the bottom row (near ground). RESIDE synthesises haze from estimated depth; this is
    the simplest stand-in with the same near-to-far structure."""
    rows = np.linspace(1.0, 0.2, h, dtype=np.float32)
    return np.repeat(rows[:, None], w, axis=1)


def haze(clean: np.ndarray, beta: float, airlight: float, depth: np.ndarray | None = None) -> np.ndarray:
    """Atmospheric scattering: I = J t + A (1 - t), t = exp(-beta d), with global airlight A and
    depth d (`default_depth` when none is given). RESIDE OTS uses beta in [0.04, 0.2] with its
    own depth scale and A in [0.8, 1.0]; with d in [0.2, 1] here, beta of 0.5-2.5 gives similar
    haze densities."""
    depth = default_depth(*clean.shape[:2]) if depth is None else depth
    t = np.exp(-beta * depth)[..., None].astype(np.float32)
    return np.clip(clean * t + airlight * (1.0 - t), 0.0, 1.0)


def motion_blur_kernel(length: int, angle_degrees: float) -> np.ndarray:
    """A normalised line kernel of `length` pixels at `angle_degrees` (odd size)."""
    size = length if length % 2 else length + 1
    kernel = np.zeros((size, size), np.float32)
    c = size // 2
    theta = np.deg2rad(angle_degrees)
    for s in np.linspace(-(length - 1) / 2, (length - 1) / 2, 4 * length):
        y, x = int(round(c - s * np.sin(theta))), int(round(c + s * np.cos(theta)))
        kernel[y, x] = 1.0
    return kernel / kernel.sum()


def convolve(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Per-channel 2D correlation with reflect padding (FFT-free, for small kernels)."""
    k = kernel.shape[0] // 2
    padded = np.pad(image, ((k, k), (k, k), (0, 0)), mode="reflect")
    out = np.zeros_like(image)
    h, w = image.shape[:2]
    for dy, dx in zip(*np.nonzero(kernel)):
        out += kernel[dy, dx] * padded[dy:dy + h, dx:dx + w]
    return out


def motion_blur(clean: np.ndarray, length: int, angle_degrees: float) -> np.ndarray:
    """Uniform linear motion blur (a stand-in for GoPro's averaged frames)."""
    return np.clip(convolve(clean, motion_blur_kernel(length, angle_degrees)), 0.0, 1.0)


def rain(clean: np.ndarray, seed: Seed, density: float = 0.004, length: int = 15, angle_degrees: float = 75.0,
         intensity: float = 0.8) -> np.ndarray:
    """Rain streaks: sparse random drops smeared along one direction (Rain100L-like light rain),
    added to the image: out = clip(clean + intensity * streaks)."""
    rng = _rng(seed)
    h, w = clean.shape[:2]
    drops = (rng.uniform(size=(h, w)) < density).astype(np.float32) * rng.uniform(0.5, 1.0, (h, w)).astype(np.float32)
    streaks = convolve(drops[..., None], motion_blur_kernel(length, angle_degrees))[..., 0]
    streaks /= max(float(streaks.max()), 1e-6)
    return np.clip(clean + intensity * streaks[..., None], 0.0, 1.0)


def low_light(clean: np.ndarray, gamma: float, scale: float, sigma: float, seed: Seed) -> np.ndarray:
    """Under-exposure: scale * clean ** gamma plus Gaussian noise of `sigma` on the 0-255 scale
    (LOL-like: darker and noisier)."""
    dark = scale * np.power(clean, gamma)
    return gaussian_noise(dark.astype(np.float32), sigma, seed)


def jpeg(clean: np.ndarray, quality: int) -> np.ndarray:
    """JPEG compression at `quality` (1-95) through Pillow, 4:2:0 chroma subsampling."""
    buffer = io.BytesIO()
    Image.fromarray(np.round(np.clip(clean, 0, 1) * 255).astype(np.uint8)).save(buffer, "JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"), np.float32) / 255.0
