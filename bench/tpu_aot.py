"""The training steps at the full SD 2.1-base + ADM-256 config (or --config's) compiled for TPU
slices (or cpu:N) on this CPU host (dod_jax.training.plan, through libtpu: the tpu-aot extra): per chip the peak bytes,
whether it fits, FLOPs, collectives, for each slice x layout x stage x crop asked for.

    JAX_PLATFORMS=cpu python bench/tpu_aot.py [--topologies v5e:2x4 v5e:4x4] [--crops 256 512]
        [--layouts replicated fsdp fsdp-bf16] [--remats none blocks dots] [--stages stage1 stage2]
        [--per-chip-batch 1]

Layouts: replicated (float32 base on every chip), fsdp (the base and LPIPS split over all
chips), fsdp-bf16 (the same stored in bfloat16: base.dtype). Each case is appended to
bench/results/tpu_aot.json as it finishes (a cut run keeps what it compiled); a case compiled
again replaces its row.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dod_jax.configs import load_config  # noqa: E402
from dod_jax.machine import cpu_model  # noqa: E402
from dod_jax.models.layers import REMAT_POLICIES  # noqa: E402
from dod_jax.training.plan import plan_step, topology_devices  # noqa: E402

# (parallel.fsdp, with -1 for every chip; parallel.shard_frozen; base.dtype)
LAYOUTS = {"replicated": (1, False, "float32"), "fsdp": (-1, True, "float32"), "fsdp-bf16": (-1, True, "bfloat16")}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "dod.py"))
    parser.add_argument("--topologies", nargs="+", default=["v5e:2x4"])
    parser.add_argument("--crops", type=int, nargs="+", default=[256])
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    parser.add_argument("--remats", nargs="+", default=["none"], choices=["none", *REMAT_POLICIES])
    parser.add_argument("--stages", nargs="+", default=["stage1", "stage2"], choices=["stage1", "stage2"])
    parser.add_argument("--per-chip-batch", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "tpu_aot.json")
    args = parser.parse_args()

    key = lambda r: (r["topology"], r["crop"], r["layout"], r["stage"], r["global_batch"], r["dtype"],
                     r.get("base_dtype", "float32"), r["remat"])
    rows = json.loads(args.out.read_text())["runs"] if args.out.exists() else []
    for topology in args.topologies:
        devices = topology_devices(topology)
        for crop in args.crops:
            for layout, remat, stage in itertools.product(args.layouts, args.remats, args.stages):
                config = load_config(args.config)
                config.base.random_seed = 0  # shapes only: no base weights are read
                config.train.update(stage=stage, crop=crop, remat=remat)
                fsdp, shard_frozen, config.base.dtype = LAYOUTS[layout]
                fsdp = len(devices) if fsdp == -1 else fsdp
                config.parallel.update(data=len(devices) // fsdp, fsdp=fsdp, shard_frozen=shard_frozen)
                result = plan_step(config, topology, args.per_chip_batch, devices,
                                   status=lambda s: print(s, flush=True))
                print(result.line(), f"(compiled in {result.compile_s:.0f} s)", flush=True)
                row = {"layout": layout, "config": Path(args.config).name, **dataclasses.asdict(result)}
                rows = [r for r in rows if key(r) != key(row)] + [row]
                args.out.write_text(json.dumps({"what": __doc__.split("\n\n")[0].replace("\n", " "),
                                                "host_cpu": cpu_model(), "runs": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
