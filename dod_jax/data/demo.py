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
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from dod_jax.data import degradations as deg

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
    root = Path(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
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
            file = f"{name}.png"
            scene = f"{index:04d}"  # RESIDE names hazy images <scene>_<airlight>_<beta>
            if split == "train":
                _save(staging / "Train/Denoise" / file, photo)
                _save(staging / "Train/Derain/rainy" / f"rain-{name}.png", rained)
                _save(staging / "Train/Derain/gt" / f"norain-{name}.png", photo)
                _save(staging / "Train/Dehaze/synthetic/part1" / f"{scene}_{airlight}_{beta}.png", hazy)
                _save(staging / "Train/Dehaze/original" / f"{scene}.png", photo)
                _save(staging / "Train/Deblur/demo/blur" / file, blurred)
                _save(staging / "Train/Deblur/demo/sharp" / file, photo)
                _save(staging / "Train/Lowlight/low" / file, dark)
                _save(staging / "Train/Lowlight/high" / file, photo)
            else:
                _save(staging / "test/denoise/bsd68" / file, photo)
                _save(staging / "test/derain/Rain100L/input" / file, rained)
                _save(staging / "test/derain/Rain100L/target" / file, photo)
                _save(staging / "test/dehaze/input" / f"{scene}_{airlight}_{beta}.png", hazy)
                _save(staging / "test/dehaze/target" / f"{scene}.png", photo)
                _save(staging / "test/deblur/demo/blur" / file, blurred)
                _save(staging / "test/deblur/demo/sharp" / file, photo)
                _save(staging / "test/lowlight/low" / file, dark)
                _save(staging / "test/lowlight/high" / file, photo)
        if root.exists():
            shutil.rmtree(root)
        staging.rename(root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return root


def main(argv=None):
    parser = argparse.ArgumentParser(description="Write the built-in AIO-5 demo set.")
    parser.add_argument("root", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(f"wrote {write_demo_set(args.root, args.seed)}")


if __name__ == "__main__":
    main()
