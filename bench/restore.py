"""Restore at scale: a 4096x3072 photo in tiles, tiled against whole, and per-image latency.

On a DOD of the given config with random weights (no trained weights exist offline):
1. a 4096x3072 image through the tiled path (512-pixel tiles, overlap 64): wall time and the
   process's peak resident memory;
2. a mid-size image restored whole and in tiles: the PSNR between the two;
3. `evaluate.py --time`'s measurement at 512x512 (batch 1, merged and unmerged CLoRA).
Writes bench/results/restore_<config>_<backend>.json.

    python bench/restore.py [--config configs/tiny.py] [--skip-4k]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dod_jax.configs import load_config  # noqa: E402
from dod_jax.data.demo import demo_photos  # noqa: E402
from dod_jax.machine import peak_rss_gib  # noqa: E402
from dod_jax.methods.dod.build import base_models, build_dod  # noqa: E402
from dod_jax.methods.dod.restore import DODRunner  # noqa: E402
from dod_jax.restore.engine import Restorer, RestoreSettings  # noqa: E402


def photo_of_size(height: int, width: int) -> np.ndarray:
    """A demo photo tiled (mirrored) up to the size: natural content at any size."""
    photo = demo_photos()["coffee"]
    reps = (-(-height // photo.shape[0]), -(-width // photo.shape[1]))
    rows = [np.concatenate([photo if (i + j) % 2 == 0 else photo[:, ::-1] for j in range(reps[1])], 1)
            for i in range(reps[0])]
    return np.concatenate(rows, 0)[:height, :width]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "tiny.py")
    parser.add_argument("--skip-4k", action="store_true")
    parser.add_argument("--time-runs", type=int, default=5)
    args = parser.parse_args()
    config = load_config(args.config)
    model = build_dod(config, base_models(config), 0)
    result = {"config": args.config.stem, "device": str(jax.devices()[0]), "backend": jax.default_backend()}

    if not args.skip_4k:
        image = photo_of_size(3072, 4096)
        restorer = Restorer(DODRunner(model), RestoreSettings(tile=512, tile_overlap=64))
        start = time.perf_counter()
        out = restorer.restore([image])[0]
        result["4k"] = {"size": [3072, 4096], "tile": 512, "overlap": 64, "seconds": time.perf_counter() - start,
                        "peak_rss_gib": peak_rss_gib(), "output_shape": list(out.shape),
                        "finite": bool(np.isfinite(out.astype(np.float32)).all())}
        print(json.dumps(result["4k"]), flush=True)

    image = photo_of_size(512, 768)
    whole = Restorer(DODRunner(model), RestoreSettings()).restore([image])[0].astype(np.float64)
    result["tiled_vs_whole"] = {"size": [512, 768]}
    for tile, overlap in ((256, 64), (256, 128), (384, 128)):
        tiled = Restorer(DODRunner(model), RestoreSettings(tile=tile, tile_overlap=overlap, tile_above=0)).restore([image])[0]
        psnr = 10 * np.log10(255.0 ** 2 / np.mean((tiled - whole) ** 2))
        result["tiled_vs_whole"][f"tile{tile}_overlap{overlap}_psnr_db"] = float(psnr)
    print(json.dumps(result["tiled_vs_whole"]), flush=True)

    timer = DODRunner(model)
    result["latency_512"] = [timer.time(512, 1, args.time_runs), timer.time(512, 1, args.time_runs, merged=True)]
    print(json.dumps(result["latency_512"]), flush=True)
    out = ROOT / "bench" / "results" / f"restore_{args.config.stem}_{jax.default_backend()}.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
