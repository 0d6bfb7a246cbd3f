"""The built-in demo set: nine natural photos shipped inside installed wheels (scikit-image,
matplotlib, scikit-learn), degraded synthetically for each AIO-5 task and written in the AIO-5
folder layout (dod_jax.data.layouts), so the code that reads the real sets reads this one.

    python -m dod_jax.data.demo runs/demo_data

Photos are resized to a short side of 256. Seven photos train, two test. The set is written
to a temporary folder and renamed into place, so a reader never sees half of it.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
from PIL import Image

from dod_jax.data import degradations as deg
from dod_jax.files import atomic_folder

TEST_PHOTOS = ("chelsea", "coffee")
SHORT_SIDE = 256


def demo_photos() -> dict[str, np.ndarray]:
    """name -> (H, W, 3) uint8, short side SHORT_SIDE."""
    import matplotlib.cbook
    import skimage.data
    from sklearn.datasets import load_sample_image

    photos = {name: getattr(skimage.data, name)() for name in ("astronaut", "chelsea", "coffee", "rocket")}
    left, right, _ = skimage.data.stereo_motorcycle()
    photos.update(motorcycle_left=left, motorcycle_right=right)
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        photos["grace_hopper"] = np.asarray(Image.open(f).convert("RGB"))
    photos.update(china=load_sample_image("china.jpg"), flower=load_sample_image("flower.jpg"))
    resized = {}
    for name, photo in photos.items():
        h, w = photo.shape[:2]
        scale = SHORT_SIDE / min(h, w)
        size = (max(SHORT_SIDE, round(w * scale)), max(SHORT_SIDE, round(h * scale)))
        resized[name] = np.asarray(Image.fromarray(photo[..., :3]).resize(size, Image.Resampling.LANCZOS))
    return resized


def _save(path: Path, image: np.ndarray):
    path.parent.mkdir(parents=True, exist_ok=True)
    if image.dtype != np.uint8:
        image = np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)
    Image.fromarray(image).save(path, compress_level=1)


def write_demo_set(root: str | os.PathLike, seed: int = 0) -> Path:
    """Write the demo set under `root` (replacing a previous demo set there)."""
    def fill(staging: Path):
        for index, (name, photo) in enumerate(sorted(demo_photos().items())):
            split = "test" if name in TEST_PHOTOS else "train"
            clean = photo.astype(np.float32) / 255.0
            rng = np.random.default_rng([seed, index])
            rained = deg.rain(clean, seed=[seed, index, 1], density=rng.uniform(0.003, 0.006),
                              angle_degrees=rng.uniform(60, 120))
            airlight, beta = round(rng.uniform(0.8, 1.0), 2), round(rng.uniform(0.8, 2.0), 2)
            hazy = deg.haze(clean, beta=beta, airlight=airlight)
            blurred = deg.motion_blur(clean, length=int(rng.integers(9, 16)), angle_degrees=rng.uniform(0, 180))
            dark = deg.low_light(clean, gamma=rng.uniform(2.0, 3.0), scale=rng.uniform(0.3, 0.5), sigma=5.0,
                                 seed=[seed, index, 2])
            file, scene = f"{name}.png", f"{index:04d}"  # RESIDE names hazy images <scene>_<airlight>_<beta>
            hazy_name = f"{scene}_{airlight}_{beta}.png"
            # (degraded image, its path, the ground truth's path) in the AIO-5 layout
            if split == "train":
                files = [(None, None, f"Train/Denoise/{file}"),
                         (rained, f"Train/Derain/rainy/rain-{name}.png", f"Train/Derain/gt/norain-{name}.png"),
                         (hazy, f"Train/Dehaze/synthetic/part1/{hazy_name}", f"Train/Dehaze/original/{scene}.png"),
                         (blurred, f"Train/Deblur/demo/blur/{file}", f"Train/Deblur/demo/sharp/{file}"),
                         (dark, f"Train/Lowlight/low/{file}", f"Train/Lowlight/high/{file}")]
            else:
                files = [(None, None, f"test/denoise/bsd68/{file}"),
                         (rained, f"test/derain/Rain100L/input/{file}", f"test/derain/Rain100L/target/{file}"),
                         (hazy, f"test/dehaze/input/{hazy_name}", f"test/dehaze/target/{scene}.png"),
                         (blurred, f"test/deblur/demo/blur/{file}", f"test/deblur/demo/sharp/{file}"),
                         (dark, f"test/lowlight/low/{file}", f"test/lowlight/high/{file}")]
            for degraded, lq_path, gt_path in files:
                _save(staging / gt_path, photo)
                if degraded is not None:
                    _save(staging / lq_path, degraded)

    return atomic_folder(root, fill, replace=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Write the built-in AIO-5 demo set.")
    parser.add_argument("root", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(f"wrote {write_demo_set(args.root, args.seed)}")


if __name__ == "__main__":
    main()
