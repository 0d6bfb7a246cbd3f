"""Where the time of the authors' DOD goes, dod-jax against PyTorch, at the full SD 2.1-base +
ADM-256 config (the models and weights of bench/official.py), one image, float32.

Two views, both sides:
- components: the degradation feature and M_theta (MFM), the VAE encoder with its LoRA, the
  UNet step, the decoder with the DEMs, each timed alone (jitted on the dod-jax side), and on
  the dod-jax side the per-image CLoRA fold and the restore with folded weights;
- operations: one whole restore profiled (jax.profiler's trace of XLA:CPU's thunks, classified
  by the compiled HLO; torch.profiler's self times by aten op) and summed into convolution,
  attention (dots with batch dimensions: QK^T and AV), other matrix products (projections,
  feed-forward), normalisation and reductions, and the rest (element-wise, copies, layout).
  Shares are of the summed operation time (XLA:CPU may run independent thunks at once).

    python bench/official_profile.py [--size 256] [--reps 3]

Writes bench/results/official_profile_<backend>.json.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import re
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from bench.forward import median_seconds  # noqa: E402
from bench.official import both_models, jax_restorers  # noqa: E402
from dod_jax.machine import cpu_model  # noqa: E402

CATEGORIES = ("convolution", "attention", "other matmul", "normalisation/reduction", "element-wise/other")
CONTAINERS = {"while", "conditional", "call"}  # thunks that run others: their time is their children's


def hlo_categories(hlo_text: str) -> dict[str, tuple[str, str]]:
    """Instruction name -> (category, what it computes) for every instruction of a compiled HLO
    module; a fusion (XLA's or YNNPACK's) by the instructions of the computation it calls, and
    described by its convolution or dot where it has one."""
    computations: dict[str, list[tuple[str, str]]] = {}  # computation -> its (opcode, line)s
    instructions: dict[str, tuple[str, str | None, str]] = {}  # name -> (opcode, called computation, line)
    current = None
    for line in hlo_text.splitlines():
        header = re.match(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s[^=]*\{\s*$", line)
        if header:
            current = computations.setdefault(header.group(1), [])
            continue
        m = re.match(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(?:\([^=]*?\)|\S+)\s+([a-z][\w\-]*)\(", line)
        if m and current is not None:
            name, opcode = m.groups()
            called = re.search(r"calls=%?([\w.\-]+)", line)
            current.append((opcode, line))
            instructions[name] = (opcode, called.group(1) if called else None, line)

    def category(body: list[tuple[str, str]]) -> str:
        ops = {opcode for opcode, _ in body}
        if "convolution" in ops:
            return "convolution"
        if "dot" in ops:
            batched = any(opcode == "dot" and "lhs_batch_dims" in line for opcode, line in body)
            return "attention" if batched else "other matmul"
        if ops & {"reduce", "reduce-window"}:
            return "normalisation/reduction"
        return "element-wise/other"

    def described(body: list[tuple[str, str]], line: str) -> str:
        main = [body_line for opcode, body_line in body if opcode in ("convolution", "dot")]
        return re.sub(r",?\s*metadata=\{.*", "", (main or [line])[0].strip())[:240]

    out = {}
    for name, (opcode, called, line) in instructions.items():
        body = computations[called] if opcode == "fusion" and called in computations else [(opcode, line)]
        out[name] = ("container" if opcode in CONTAINERS else category(body), described(body, line))
    return out


def jax_operation_times(compiled, call, trace_dir: Path, top: int = 12) -> dict:
    """Seconds per category of one `call()` of `compiled`, from a jax.profiler trace, and the
    `top` instructions by their summed time."""
    instructions = hlo_categories(compiled.as_text())
    jax.profiler.start_trace(str(trace_dir), create_perfetto_trace=True)
    jax.block_until_ready(call())
    jax.profiler.stop_trace()
    trace = sorted(trace_dir.rglob("*.trace.json.gz"))[-1]
    events = json.load(gzip.open(trace))
    events = events["traceEvents"] if isinstance(events, dict) else events
    seconds, unknown, per_instruction = collections.Counter(), collections.Counter(), collections.Counter()
    for event in events:
        if event.get("ph") != "X":
            continue
        kind = instructions.get(event["name"], (None,))[0]
        if kind is None:
            unknown[event["name"]] += event.get("dur", 0) / 1e6
        elif kind != "container":
            seconds[kind] += event.get("dur", 0) / 1e6
            per_instruction[event["name"]] += event.get("dur", 0) / 1e6
    return {"seconds": {k: seconds[k] for k in CATEGORIES},
            "top_instructions": [{"name": name, "seconds": t, "category": instructions[name][0],
                                  "hlo": instructions[name][1]} for name, t in per_instruction.most_common(top)],
            "unclassified_events_top": dict(unknown.most_common(5))}


def torch_operation_times(run) -> dict:
    """Seconds per category of one `run()`, from torch.profiler's self CPU time per aten op."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    seconds, ops = collections.Counter(), collections.Counter()
    for item in prof.key_averages():
        name, self_s = item.key, item.self_cpu_time_total / 1e6
        ops[name] += self_s
        if "conv" in name:
            kind = "convolution"
        elif any(k in name for k in ("scaled_dot_product", "flash_attention", "bmm", "baddbmm", "_softmax")):
            kind = "attention"
        elif any(k in name for k in ("addmm", "aten::mm", "linear", "matmul")):
            kind = "other matmul"
        elif any(k in name for k in ("norm", "mean", "sum", "var")):
            kind = "normalisation/reduction"
        else:
            kind = "element-wise/other"
        seconds[kind] += self_s
    return {"seconds": {k: seconds[k] for k in CATEGORIES}, "top_ops": dict(ops.most_common(10))}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--perturbation", type=float, default=0.02)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()

    import torch
    torch.set_num_threads(os.cpu_count())
    with tempfile.TemporaryDirectory(prefix="dod_profile.") as scratch:
        reference, loaded = both_models(Path(scratch), args.perturbation)
        model = loaded.model
        lq = np.random.default_rng(0).uniform(-1, 1, (1, args.size, args.size, 3)).astype(np.float32)
        lq_j, lq_t = jnp.asarray(lq), torch.from_numpy(lq.transpose(0, 3, 1, 2).copy())

        # components, dod-jax
        graphdef, state = nnx.split(model)
        on = lambda f: jax.jit(lambda state, *a: f(nnx.merge(graphdef, state), *a))
        film = on(lambda m, x: m.film(x))
        encode = on(lambda m, x, c: m.encode(x, c))
        unet = on(lambda m, z, c: m.generate_latent(z, c))
        decode = on(lambda m, x0, skips: m.decode(x0, skips))
        c = film(state, lq_j)
        z, skips = encode(state, lq_j, c)
        x0 = unet(state, z, c)
        timed = lambda f, *a: median_seconds(lambda: jax.block_until_ready(f(state, *a)), args.reps)[0]
        jax_parts = {"MFM (ADM features + M_theta)": timed(film, lq_j), "VAE encoder + LoRA": timed(encode, lq_j, c),
                     "UNet + CLoRA": timed(unet, z, c), "decoder + DEMs": timed(decode, x0, skips)}
        unmerged, merged, _ = jax_restorers(model)
        compiled = unmerged.lower(state, lq_j).compile()
        jax_parts["whole restore"] = median_seconds(lambda: jax.block_until_ready(compiled(state, lq_j)), args.reps)[0]
        folds = []
        total = median_seconds(lambda: folds.append(jax.block_until_ready(merged(state, lq_j))[1]), args.reps)[0]
        jax_parts["CLoRA fold (MFM + merge)"] = float(np.median(folds[-args.reps:]))
        jax_parts["restore with folded weights"] = total - jax_parts["CLoRA fold (MFM + merge)"]
        jax_ops = jax_operation_times(compiled, lambda: compiled(state, lq_j), Path(scratch) / "trace")

        # components, PyTorch (the steps of AuthorsDOD.forward, each alone)
        with torch.no_grad():
            def mfm():
                reference.film = reference.mtheta(reference.adm(lq_t, torch.zeros(1)).mean(dim=(2, 3)))
            mfm()
            zt, skips_t = reference.encode(lq_t)
            context = reference.prompt.expand(1, -1, -1)
            def unet_t():
                eps = reference.unet(zt, torch.full((1,), 999), encoder_hidden_states=context).sample
                return (zt - (1 - reference.abar) ** 0.5 * eps) / reference.abar ** 0.5
            x0_t = unet_t()
            torch_time = lambda f: median_seconds(f, args.reps)[0]
            torch_parts = {"MFM (ADM features + M_theta)": torch_time(mfm),
                           "VAE encoder + LoRA": torch_time(lambda: reference.encode(lq_t)),
                           "UNet + CLoRA": torch_time(unet_t),
                           "decoder + DEMs": torch_time(lambda: reference.decode(x0_t, skips_t, True)),
                           "whole restore": torch_time(lambda: reference(lq_t))}
            torch_ops = torch_operation_times(lambda: reference(lq_t))

    results = {"what": __doc__.split("\n\n")[0].replace("\n", " "), "size": args.size, "batch": 1,
               "cpu": cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
               "versions": {"jax": jax.__version__, "torch": torch.__version__},
               "xla_flags": os.environ.get("XLA_FLAGS", ""), "reps": args.reps,
               "components_s": {"dod_jax": jax_parts, "pytorch": torch_parts},
               "operations": {"dod_jax": jax_ops, "pytorch": torch_ops}}
    path = args.out / f"official_profile_{jax.devices()[0].platform}.json"
    path.write_text(json.dumps(results, indent=2))
    for side, parts in results["components_s"].items():
        print(side, "  ".join(f"{k} {v:.2f}s" for k, v in parts.items()))
    for side, ops in results["operations"].items():
        total = sum(ops["seconds"].values())
        print(side, "  ".join(f"{k} {v:.2f}s ({v / total:.0%})" for k, v in ops["seconds"].items()))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
