"""What limits XLA:CPU on the authors' DOD: its convolution kernels against PyTorch's (oneDNN),
shape by shape, over every convolution the restore runs.

The convolutions are read from the jaxpr of dod-jax's restore at the SD 2.1-base + ADM-256
config (as bench/official.py runs it: stage 1+2, MFM at full resolution, posterior mode; an
abstract model, no weights), one image of --size pixels. Each distinct convolution (input shape,
kernel shape, stride, padding) is timed alone, jitted in XLA and eager in PyTorch on the same
random float32 data with torch threads = cores, and the time is weighted by how often the restore
runs it: the total is the restore's convolution time on each library's kernels. Two tried
alternatives are timed too: convolutions of 512+ input channels at 128x128 or more as two over
halves of their input, and, for the 3x3 convolutions with the most time, Winograd F(2x2, 3x3)
written in jax.numpy (input and output transforms as sums of strided slices, 16 batched matrix
products). Medians of --reps after a warm-up. Writes bench/results/conv_kernels_<backend>.json.

    python bench/conv_kernels.py [--size 256] [--reps 5]

Needs the test extra (torch).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
from pathlib import Path

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
from flax import nnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.forward import median_seconds  # noqa: E402
from dod_jax.configs import load_config  # noqa: E402
from dod_jax.methods.dod.build import abstract_dod  # noqa: E402
from dod_jax.machine import cpu_model  # noqa: E402
from dod_jax.schedule import DDPMSchedule  # noqa: E402

WINOGRAD_LARGEST = 6  # Winograd is timed at this many 3x3 shapes, those with the most convolution time
SPLIT_CHANNELS = 512  # inputs of at least this many channels are also timed as two convolutions over halves

# F(2x2, 3x3) (Lavin and Gray 2016): input transform B^T, kernel transform G, output transform A^T
WINOGRAD_BT = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], np.float32)
WINOGRAD_G = np.array([[1, 0, 0], [.5, .5, .5], [.5, -.5, .5], [0, 0, 1]], np.float32)
WINOGRAD_AT = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.float32)


def restore_convolutions(size: int) -> collections.Counter:
    """Counter of (input shape, kernel shape, strides, padding) over the convolutions in the
    jaxpr of one size x size restore (sub-jaxprs included)."""
    config = load_config(ROOT / "configs" / "dod.py")
    config.dod.update({"mfm_size": 0, "latent": "mode"})
    model = abstract_dod(config)
    model.schedule = DDPMSchedule.from_config(config.scheduler.to_dict())  # numbers, not shapes, in eps_to_x0
    graphdef, state = nnx.split(model)
    lq = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    jaxpr = jax.make_jaxpr(lambda state, lq: nnx.merge(graphdef, state)(lq))(state, lq)
    found = collections.Counter()

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "conv_general_dilated":
                p = eqn.params
                spec = p["dimension_numbers"]
                if (spec.lhs_spec, spec.rhs_spec) != ((0, 3, 1, 2), (3, 2, 0, 1)) or p["feature_group_count"] != 1:
                    raise SystemExit(f"a convolution other than NHWC/HWIO, ungrouped: {spec}")
                found[(tuple(eqn.invars[0].aval.shape), tuple(eqn.invars[1].aval.shape),
                       tuple(p["window_strides"]), tuple(map(tuple, p["padding"])))] += 1
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)
    walk(jaxpr.jaxpr)
    return found


def kind(row) -> str:
    """Which part of the network a convolution shape is (for the summary)."""
    if row["strides"] != [1, 1]:
        return "stride 2 (VAE downsampling and its adapter)"
    if row["kernel"][3] <= 8:
        return "adapter A of rank 8"
    if row["kernel"][3] == 32:
        return "dense-block growth (32 out, DEMs)"
    if row["kernel"][2] >= SPLIT_CHANNELS and row["input"][1] >= 128:
        return f"input of {SPLIT_CHANNELS}+ channels at 128x128 or more"
    return "other"


def winograd_3x3(x, kernel):
    """A 3x3, stride-1, padding-1 convolution of NHWC `x` with an HWIO kernel, as F(2x2, 3x3)."""
    b, h, w, c = x.shape
    nh, nw = -(-h // 2), -(-w // 2)
    padded = jnp.pad(x, ((0, 0), (1, 2 * nh + 1 - h), (1, 2 * nw + 1 - w), (0, 0)))

    def combine(coefficients, arrays):
        return sum(float(k) * a for k, a in zip(coefficients, arrays) if k)

    rows = [padded[:, i:i + 2 * nh - 1:2] for i in range(4)]
    transformed = []
    for i in range(4):
        row = combine(WINOGRAD_BT[i], rows)
        cols = [row[:, :, j:j + 2 * nw - 1:2] for j in range(4)]
        transformed += [combine(WINOGRAD_BT[j], cols) for j in range(4)]
    v = jnp.stack(transformed).reshape(16, b * nh * nw, c)
    u = jnp.einsum("ik,jl,klcd->ijcd", WINOGRAD_G, WINOGRAD_G, kernel).reshape(16, c, -1)
    m = jnp.einsum("ptc,pcd->ptd", v, u).reshape(4, 4, b, nh, nw, -1)
    half = [combine(WINOGRAD_AT[r], list(m)) for r in range(2)]  # (4, b, nh, nw, d) each
    y = jnp.stack([jnp.stack([combine(WINOGRAD_AT[s], list(half[r])) for s in range(2)]) for r in range(2)])
    return y.transpose(2, 3, 0, 4, 1, 5).reshape(b, 2 * nh, 2 * nw, -1)[:, :h, :w]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    import torch
    torch.set_num_threads(os.cpu_count())

    convolutions = restore_convolutions(args.size)
    print(f"{sum(convolutions.values())} convolutions in {len(convolutions)} shapes", flush=True)
    rng = np.random.default_rng(0)
    rows = []
    for (x_shape, k_shape, strides, padding), count in sorted(convolutions.items(), key=lambda kv: -np.prod(kv[0][0])):
        x = rng.standard_normal(x_shape, np.float32)
        kernel = (rng.standard_normal(k_shape, np.float32) / np.sqrt(np.prod(k_shape[:3]))).astype(np.float32)
        xla = jax.jit(lambda x, k, s=strides, p=padding: jax.lax.conv_general_dilated(
            x, k, s, p, dimension_numbers=("NHWC", "HWIO", "NHWC")))
        expected = np.asarray(xla(x, kernel))
        x_t, k_t = torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(kernel).permute(3, 2, 0, 1).contiguous()
        if padding[0][0] == padding[0][1] and padding[1][0] == padding[1][1]:
            torch_conv = lambda: torch.nn.functional.conv2d(x_t, k_t, stride=strides, padding=(padding[0][0], padding[1][0]))
        else:  # asymmetric (the VAE's stride-2 downsampling pads right and bottom only)
            pad = (padding[1][0], padding[1][1], padding[0][0], padding[0][1])
            torch_conv = lambda: torch.nn.functional.conv2d(torch.nn.functional.pad(x_t, pad), k_t, stride=strides)
        with torch.no_grad():
            got = torch_conv().permute(0, 2, 3, 1).numpy()
            torch_s = median_seconds(torch_conv, args.reps)[0]
        if not np.allclose(got, expected, atol=1e-3):
            raise SystemExit(f"PyTorch's convolution differs from XLA's at {x_shape} x {k_shape}")
        xla_s = median_seconds(lambda: jax.block_until_ready(xla(x, kernel)), args.reps)[0]
        (b, _, _, c), (kh, kw, _, d) = x_shape, k_shape
        out_positions = b * expected.shape[1] * expected.shape[2]
        flops = 2 * out_positions * kh * kw * c * d
        rows.append({"input": list(x_shape), "kernel": list(k_shape), "strides": list(strides),
                     "padding": [list(p) for p in padding], "count": count, "gflop": flops / 1e9,
                     "xla_ms": xla_s * 1e3, "torch_ms": torch_s * 1e3, "xla_over_torch": xla_s / torch_s,
                     "xla_gflops_per_s": flops / xla_s / 1e9, "torch_gflops_per_s": flops / torch_s / 1e9})
        print(f"{count:3d} x {x_shape} * {k_shape}: XLA {xla_s * 1e3:.1f} ms, PyTorch {torch_s * 1e3:.1f} ms", flush=True)

    for row in rows:
        if row["kernel"][2] >= SPLIT_CHANNELS and row["input"][1] >= 128:
            x = rng.standard_normal(row["input"], np.float32)
            kernel = rng.standard_normal(row["kernel"], np.float32)
            half = row["kernel"][2] // 2
            split = jax.jit(lambda x, k, s=tuple(row["strides"]), p=tuple(map(tuple, row["padding"])): sum(
                jax.lax.conv_general_dilated(x[..., i:i + half], k[:, :, i:i + half], s, p,
                                             dimension_numbers=("NHWC", "HWIO", "NHWC")) for i in (0, half)))
            row["split_input_ms"] = median_seconds(lambda: jax.block_until_ready(split(x, kernel)), args.reps)[0] * 1e3
            print(f"split input at {row['input']} * {row['kernel']}: {row['split_input_ms']:.1f} ms "
                  f"(whole {row['xla_ms']:.1f})", flush=True)

    winograd = jax.jit(winograd_3x3)
    three_by_three = [r for r in rows if r["kernel"][:2] == [3, 3] and r["strides"] == [1, 1] and r["padding"] == [[1, 1], [1, 1]]]
    for row in sorted(three_by_three, key=lambda r: -r["count"] * r["xla_ms"])[:WINOGRAD_LARGEST]:
        x = rng.standard_normal(row["input"], np.float32)
        kernel = (rng.standard_normal(row["kernel"], np.float32) / np.sqrt(9 * row["kernel"][2])).astype(np.float32)
        direct = np.asarray(jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)),
                                                         dimension_numbers=("NHWC", "HWIO", "NHWC")))
        row["winograd_max_abs_diff"] = float(np.abs(np.asarray(winograd(x, kernel)) - direct).max())
        row["winograd_ms"] = median_seconds(lambda: jax.block_until_ready(winograd(x, kernel)), args.reps)[0] * 1e3
        print(f"Winograd at {row['input']} * {row['kernel']}: {row['winograd_ms']:.1f} ms "
              f"(XLA's convolution {row['xla_ms']:.1f}), off by {row['winograd_max_abs_diff']:.1e}", flush=True)

    total = {side: sum(r["count"] * r[f"{side}_ms"] for r in rows) / 1e3 for side in ("xla", "torch")}
    by_kind = {}
    for row in rows:
        entry = by_kind.setdefault(kind(row), {"convolutions": 0, "xla_s": 0.0, "torch_s": 0.0})
        entry["convolutions"] += row["count"]
        entry["xla_s"] += row["count"] * row["xla_ms"] / 1e3
        entry["torch_s"] += row["count"] * row["torch_ms"] / 1e3
    for name, entry in by_kind.items():
        entry["xla_over_torch"] = entry["xla_s"] / entry["torch_s"]
        print(f"{name}: {entry['convolutions']} convolutions, XLA {entry['xla_s']:.2f} s, PyTorch {entry['torch_s']:.2f} s")
    results = {"what": f"the convolutions of dod-jax's restore of one {args.size}x{args.size} image (SD 2.1-base + "
                       "ADM-256, MFM at full resolution), each timed alone in XLA and in PyTorch, float32",
               "cpu": cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
               "versions": {"jax": jax.__version__, "torch": torch.__version__}, "xla_flags": os.environ.get("XLA_FLAGS", ""),
               "reps": args.reps, "convolutions": sum(convolutions.values()), "gflop": sum(r["count"] * r["gflop"] for r in rows),
               "total_s": total, "xla_over_torch": total["xla"] / total["torch"], "by_kind": by_kind, "shapes": rows}
    print(f"convolution time over the restore: XLA {total['xla']:.2f} s, PyTorch {total['torch']:.2f} s "
          f"({results['xla_over_torch']:.2f}x)")
    path = args.out / f"conv_kernels_{jax.default_backend()}.json"
    path.write_text(json.dumps(results, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
