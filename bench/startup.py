"""Start-up of the `restore` command with and without the persistent compilation cache.

Runs `restore` (a fresh process each time) on one photo three ways: the cache off, a cold cache
(an empty folder: compiles and stores), and the same cache warm (loads). Records each run's
wall time and, from the command's own log, the seconds spent in the restore call (compile
included on a miss). Writes bench/results/startup_<backend>.json.

    python bench/startup.py [--ckpt runs/demo/stage2/checkpoints] [--size 512] [--reps 2]

The default checkpoint is the one `make demo` trains.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.restore import photo_of_size  # noqa: E402
from dod_jax.machine import cpu_model  # noqa: E402


def restore_once(ckpt: Path, photo: Path, output: Path, cache: str) -> dict:
    """One `restore` process: its wall time and the seconds its log gives the image."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "dod_jax.restore.cli", str(photo), "--output", str(output),
                    "--ckpt", str(ckpt), "--compilation-cache", cache], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    record = json.loads((output / "restore_log.json").read_text())["files"][0]
    return {"wall_s": wall, "restore_s": record["seconds"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", type=Path, default=ROOT / "runs" / "demo" / "stage2" / "checkpoints")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--reps", type=int, default=2, help="runs of each kind (medians recorded)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    if not args.ckpt.exists():
        parser.error(f"{args.ckpt}: no such checkpoint (run `make demo`, or give --ckpt)")
    runs = {"cache off": [], "cold cache": [], "warm cache": []}
    with tempfile.TemporaryDirectory(prefix="dod_startup.") as scratch:
        scratch = Path(scratch)
        photo = scratch / "photo.png"
        Image.fromarray(photo_of_size(args.size, args.size)).save(photo)
        for rep in range(args.reps):
            cache = scratch / f"cache{rep}"
            for kind, folder in (("cache off", "off"), ("cold cache", str(cache)), ("warm cache", str(cache))):
                runs[kind].append(restore_once(args.ckpt, photo, scratch / "out", folder))
                print(f"{kind}: {runs[kind][-1]}", flush=True)
        cache_mib = sum(f.stat().st_size for f in (scratch / "cache0").rglob("*") if f.is_file()) / 2 ** 20
    results = {
        "what": f"`restore` on one {args.size}x{args.size} photo, a fresh process per run",
        "ckpt": str(args.ckpt), "cpu": cpu_model(), "cpu_count": os.cpu_count(), "reps": args.reps,
        "cache_mib": cache_mib,
        "runs": {kind: {"median_wall_s": float(np.median([r["wall_s"] for r in rs])),
                        "median_restore_s": float(np.median([r["restore_s"] for r in rs])), "each": rs}
                 for kind, rs in runs.items()},
    }
    path = args.out / f"startup_{jax.default_backend()}.json"
    args.out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2))
    print(json.dumps(results["runs"], indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
