"""Plan a training run on devices this machine does not have: compile a stage's step for a TPU
slice (through libtpu: `pip install -e ".[tpu-aot]"`, no TPU needed) or for this host's CPU
devices, and report per device what the compiler says: argument, output, temp and alias bytes,
the peak and whether it fits the chip's memory, the step's FLOPs and a lower bound on its time
from the chip's peak bfloat16 FLOP/s, and the collectives with their bytes.

    python -m dod_jax.training.plan --config configs/aio3.py --topology v5e:4x4 \
        [--stage stage1 stage2] [--per-chip-batch 1] [--json plan.json] \
        [--config.parallel.fsdp=16 --config.parallel.shard_frozen=True --config.train.crop=256 ...]

The model is built without values (shapes only; no base weights are read), in the config's
shapes, mesh (parallel.data x parallel.fsdp over the slice's chips) and sharding rules. A
topology is a libtpu name (v5e:2x2, v5e:4x4, v4:2x2x2, v5p:2x2x2, ...) or cpu:N for N devices of
this host (start Python with XLA_FLAGS=--xla_force_host_platform_device_count=N for N > 1).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from dod_jax import parallel
from dod_jax import methods
from dod_jax.errors import ConfigError
from dod_jax.models.layers import remat_mode
from dod_jax.training.loop import compile_step

GIB = 2 ** 30
# Memory per chip and peak dense bfloat16 FLOP/s per chip (Google Cloud's TPU pages).
CHIPS = {"v4": (32 * GIB, 275e12), "v5e": (16 * GIB, 197e12), "v5litepod": (16 * GIB, 197e12),
         "v5p": (95 * GIB, 459e12), "v6e": (32 * GIB, 918e12)}
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "u8": 1, "f64": 8, "s64": 8, "u64": 8}


def topology_devices(topology: str) -> list:
    """The devices of a TPU slice by its libtpu name, or cpu:N."""
    if topology.startswith("cpu:"):
        n = int(topology[4:])
        devices = jax.devices("cpu")
        if len(devices) < n:
            raise ConfigError(f"--topology {topology}: this process has {len(devices)} CPU devices; start it with "
                              f"XLA_FLAGS=--xla_force_host_platform_device_count={n}")
        return devices[:n]
    if importlib.util.find_spec("libtpu") is None:  # the tpu-aot extra
        raise ConfigError(f"--topology {topology}: compiling for TPUs needs libtpu: pip install -e '.[tpu-aot]'")
    from jax.experimental import topologies
    try:
        return list(topologies.get_topology_desc(topology_name=topology, platform="tpu").devices)
    except Exception as e:  # libtpu's own message names what it did not understand
        raise ConfigError(f"--topology {topology}: libtpu does not know this slice ({str(e).splitlines()[0]})") from None


def chip_of(topology: str) -> tuple[int | None, float | None]:
    """(the chip's memory in bytes, its peak bfloat16 FLOP/s); None where unknown (CPU)."""
    return CHIPS.get(topology.split(":")[0], (None, None))


def abstract_stage(config):
    """(steps, state, frozen) of config.train.stage with ShapeDtypeStructs for values (the
    method's shaped_training: no weights read)."""
    return methods.of(config).shaped_training(config)


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
    """Count and result bytes of each collective in a compiled module (an async pair counted
    once, at its start, by its largest buffer)."""
    out = {name: {"count": 0, "bytes": 0} for name in COLLECTIVES}
    for line in hlo_text.splitlines():
        m = re.match(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.+?)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\(", line)
        if not m:
            continue
        shapes = re.findall(r"(\w+)\[([\d,]*)\]", m.group(1))
        sizes = [BYTES.get(dtype, 4) * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
                 for dtype, dims in shapes]
        # an async start's result tuple holds its operand (and context) too: its largest buffer is the result
        nbytes = max(sizes, default=0) if m.group(3) else sum(sizes)
        out[m.group(2)]["count"] += 1
        out[m.group(2)]["bytes"] += nbytes
    return out


def shard_bytes(tree, shardings) -> int:
    """Bytes of `tree`'s arrays on one device, by their shardings (even splits only)."""
    leaves, placed = jax.tree.leaves(tree), jax.tree.leaves(shardings)
    assert len(leaves) == len(placed), (len(leaves), len(placed))
    return sum(int(np.prod(sharding.shard_shape(x.shape))) * np.dtype(x.dtype).itemsize
               for x, sharding in zip(leaves, placed))


@dataclasses.dataclass
class StepPlan:
    """What the compiler reports for one stage's step, per device."""
    stage: str
    topology: str
    mesh: dict
    global_batch: int
    crop: int
    dtype: str                    # train.dtype: what the step computes in
    base_dtype: str               # base.dtype: what the frozen base and LPIPS are stored in
    shard_frozen: bool
    remat: str                    # train.remat: 'none', 'blocks' or 'dots'
    argument_arrays: int          # the arrays the step reads (jit drops the others)
    sharded_argument_bytes: int   # their bytes on one device by their shardings (the arithmetic)
    argument_bytes: int           # the compiler's: the same with its padding to the device's tiles
    output_bytes: int
    temp_bytes: int
    alias_bytes: int
    peak_bytes: int
    chip_memory_bytes: int | None
    fits: bool | None
    flops: float | None
    min_step_s: float | None
    collectives: dict
    compile_s: float

    def line(self) -> str:
        size = lambda n: f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2 ** 20:.1f} MiB"
        fit = "" if self.fits is None else (" fits" if self.fits else f" DOES NOT FIT {self.chip_memory_bytes / GIB:.0f} GiB")
        flops = "" if self.flops is None else f"  {self.flops / 1e12:.2f} TFLOP"
        bound = "" if self.min_step_s is None else f"  >= {self.min_step_s * 1e3:.1f} ms/step"
        gathers = ", ".join(f"{k} {v['count']} ({size(v['bytes'])})" for k, v in self.collectives.items() if v["count"])
        return (f"{self.stage} on {self.topology} mesh {self.mesh} batch {self.global_batch}x{self.crop}^2 {self.dtype}"
                f"{f' ({self.base_dtype} base)' if self.base_dtype != self.dtype else ''}"
                f"{' fsdp-sharded base' if self.shard_frozen else ''}"
                f"{f' remat {self.remat}' if self.remat != 'none' else ''}: "
                f"peak {size(self.peak_bytes)} per device (arguments {size(self.argument_bytes)}, "
                f"temp {size(self.temp_bytes)}, output {size(self.output_bytes)}, aliased "
                f"{size(self.alias_bytes)}){fit}{flops}{bound}; collectives: {gathers or 'none'}")


def plan_step(config, topology: str, per_chip_batch: int, devices=None, status=print) -> StepPlan:
    """Compile config.train.stage's step for `topology` (its devices, or `devices`) and read
    the compiler's report."""
    devices = topology_devices(topology) if devices is None else devices
    mesh = parallel.make_mesh(config.parallel.data, config.parallel.fsdp, devices)
    tc = config.train
    status(f"{tc.stage}: building the model's shapes ...")
    steps, state, frozen = abstract_stage(config)
    batch_size = per_chip_batch * mesh.size
    image = jax.ShapeDtypeStruct((batch_size, tc.crop, tc.crop, 3), jnp.float32)
    step = compile_step(steps, state, frozen, mesh, parallel.rules_dict(config.parallel.rules), config.parallel.shard_frozen)
    status(f"{tc.stage}: compiling the step for {topology} (mesh {dict(mesh.shape)}) ...")
    start = time.perf_counter()
    batch = {"lq": image, "gt": image, "task": jax.ShapeDtypeStruct((batch_size,), jnp.int32)}
    lowered = step.step.lower(state, frozen, batch)
    # the flat inputs jit keeps: it drops those the step never reads (stage 1 the DEMs); a
    # private field in jax 0.10.2, which the project pins
    kept = sorted(lowered._lowering.compile_args["kept_var_idx"])
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    batch_shardings = jax.tree.map(lambda _: parallel.batch_sharding(mesh), batch)
    arrays = jax.tree.leaves((state, frozen, batch))
    placed = jax.tree.leaves((step.state_shardings, step.frozen_shardings, batch_shardings))
    stored = shard_bytes([arrays[i] for i in kept], [placed[i] for i in kept])
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis() or {}
    cost = cost[0] if isinstance(cost, list) else cost
    flops = cost.get("flops")
    peak = memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes - memory.alias_size_in_bytes
    chip_memory, chip_flops = chip_of(topology)
    return StepPlan(
        stage=tc.stage, topology=topology, mesh=dict(mesh.shape), global_batch=batch_size, crop=tc.crop,
        dtype=tc.dtype, base_dtype=config.base.dtype, shard_frozen=bool(config.parallel.shard_frozen),
        remat=remat_mode(tc.remat) or "none",
        argument_arrays=len(kept), sharded_argument_bytes=stored,
        argument_bytes=memory.argument_size_in_bytes, output_bytes=memory.output_size_in_bytes,
        temp_bytes=memory.temp_size_in_bytes, alias_bytes=memory.alias_size_in_bytes, peak_bytes=peak,
        chip_memory_bytes=chip_memory, fits=None if chip_memory is None else peak <= chip_memory,
        flops=flops, min_step_s=flops / chip_flops if flops and chip_flops else None,
        collectives=collectives(compiled.as_text()), compile_s=compile_s)


def main(argv=None) -> int:
    from dod_jax.configs import apply_overrides, load_config
    from dod_jax.errors import reported
    parser = argparse.ArgumentParser(prog="python -m dod_jax.training.plan", description=__doc__.split("\n\n")[0],
                                     epilog="Any config value can follow as --config.<key>=<value>.")
    parser.add_argument("--config", default="configs/aio3.py", help="a config file (get_config())")
    parser.add_argument("--topology", required=True, help="a TPU slice (v5e:2x2, v5e:4x4, v4:2x2x2, ...) or cpu:N")
    parser.add_argument("--stage", nargs="+", help="the stages to plan (default: every stage of the config's method)")
    parser.add_argument("--per-chip-batch", type=int, default=1, help="crops per device (the global batch is this x devices)")
    parser.add_argument("--json", help="also write the plans to this file")
    args, rest = parser.parse_known_args(argv)
    unknown = [a for a in rest if not a.startswith("--config.")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    plans = []
    with reported(parser.prog):
        config = apply_overrides(load_config(args.config), [a[len("--config."):] for a in rest])
        devices = topology_devices(args.topology)
        for stage in args.stage or methods.of(config).stages:
            config.train.stage = stage
            plan = plan_step(config, args.topology, args.per_chip_batch, devices, status=lambda s: print(s, flush=True))
            print(plan.line(), flush=True)
            plans.append(plan)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dataclasses.asdict(p) for p in plans], f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
