"""Host-side image files and operations, below data, restore and evaluation: reading (as stored,
or as float RGB), atomic writing, resizing, conversion to 8 bits."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from dod_jax.errors import InputError
from dod_jax.files import atomic_write

READ_FAILURES = (UnidentifiedImageError, OSError, SyntaxError, ValueError)  # what Pillow raises on a bad file


class ImageReadError(InputError):
    """A file that is not a readable image; the message names the file."""


def read_image(path: Path) -> np.ndarray:
    """An image as stored (EXIF orientation applied): uint8 grey, RGB or RGBA, or uint16 grey."""
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            image.load()
            if image.mode in ("I;16", "I;16B", "I;16L"):
                return np.asarray(image).astype(np.uint16)
            if image.mode in ("L", "RGB", "RGBA"):
                return np.asarray(image)
            has_alpha = "A" in image.mode or "transparency" in image.info
            return np.asarray(image.convert("RGBA" if has_alpha else "RGB"))
    except READ_FAILURES as e:
        raise ImageReadError(f"{path}: not a readable image ({type(e).__name__}: {e})") from e


def read_rgb(file) -> np.ndarray:
    """(H, W, 3) float32 in [0, 1] from a path, or from (encoded bytes, name) as prepared records
    hold them. Grey is replicated, alpha dropped, palettes expanded, and 16-bit images scaled by
    65535; anything else is an ImageReadError naming the file."""
    source, name = (io.BytesIO(file[0]), file[1]) if isinstance(file, tuple) else (file, file)
    try:
        with Image.open(source) as image:
            image.load()
            mode = image.mode
            if mode in ("I;16", "I;16B", "I;16L", "I"):
                grey = np.asarray(image, np.float32) / 65535.0
                return np.repeat(np.clip(grey, 0, 1)[..., None], 3, axis=-1)
            if mode not in ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr"):
                raise ImageReadError(f"{name}: image mode {mode} is not supported")
            return np.asarray(image.convert("RGB"), np.float32) / 255.0
    except READ_FAILURES as e:
        if isinstance(e, ImageReadError):
            raise
        raise ImageReadError(f"{name}: not a readable image ({type(e).__name__}: {e})") from e


def write_image(image: np.ndarray, path: Path) -> Path:
    """Write atomically; an image with alpha goes to PNG when the suffix cannot hold alpha."""
    if image.ndim == 3 and image.shape[-1] == 4 and path.suffix.lower() in (".jpg", ".jpeg", ".bmp"):
        path = path.with_suffix(".png")
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    options = {"quality": 95} if path.suffix.lower() in (".jpg", ".jpeg") else {}
    return atomic_write(path, lambda temporary: Image.fromarray(image).save(temporary, **options))


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
