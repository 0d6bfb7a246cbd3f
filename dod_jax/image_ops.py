"""Host-side image operations shared by the input pipeline, restore and the image writers."""

from __future__ import annotations

import numpy as np
from PIL import Image


RESAMPLERS = {"bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS}


def resize_float(image: np.ndarray, size: tuple[int, int], method: str = "bicubic") -> np.ndarray:
    """Resize (Pillow, `method` bicubic or lanczos, antialiased when shrinking) an (H, W, C)
    float image in [0, 1] to `size` = (height, width), clipped to [0, 1]."""
    if image.shape[:2] == tuple(size):
        return image
    h, w = size
    channels = [np.asarray(Image.fromarray(np.ascontiguousarray(image[..., c], np.float32)).resize(
        (w, h), RESAMPLERS[method])) for c in range(image.shape[-1])]
    return np.clip(np.stack(channels, axis=-1), 0.0, 1.0)


def to_uint8(image) -> np.ndarray:
    """Images in [-1, 1] -> uint8 (clipped, rounded)."""
    return np.round((np.clip(np.asarray(image, np.float32), -1, 1) + 1) * 127.5).astype(np.uint8)
