"""XLA:CPU's convolution against the same convolution as one matrix product over its k*k
shifted views (im2col: `dod_jax.models.layers.conv2d`, which takes that path at most
IM2COL_MAX_POSITIONS output positions, here at every size), forward and with the input gradient, at SD 2.1 UNet shapes from its innermost
level on small crops to the VAE's outer levels. Jitted, float32, medians after a warm-up call.

    python bench/conv_im2col.py [--reps 5]

Writes bench/results/conv_im2col_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.forward import median_seconds  # noqa: E402
from dod_jax.machine import cpu_model  # noqa: E402
from dod_jax.models.layers import conv2d  # noqa: E402

# (batch, positions per side, in channels, out channels) of 3x3, stride-1, padding-1 convolutions
SHAPES = [(4, 1, 1280, 1280), (4, 2, 1280, 1280), (4, 2, 2560, 1280), (4, 4, 1280, 1280), (4, 8, 640, 640),
          (4, 16, 320, 320), (2, 32, 320, 320), (2, 64, 128, 128)]


def xla_conv(x, kernel):
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))


def im2col_conv(x, kernel):
    """dod-jax's conv2d with its im2col path taken at every size."""
    return conv2d(x, kernel, 1, 1, im2col_max_positions=1 << 30)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    for b, s, cin, cout in SHAPES:
        x = jnp.asarray(rng.standard_normal((b, s, s, cin)), jnp.float32)
        kernel = jnp.asarray(rng.standard_normal((3, 3, cin, cout)) * 0.02, jnp.float32)
        row = {"batch": b, "positions": f"{s}x{s}", "in": cin, "out": cout}
        for name, conv in (("xla", xla_conv), ("im2col", im2col_conv)):
            forward = jax.jit(conv)
            backward = jax.jit(lambda x, k, conv=conv: jax.grad(lambda x: (conv(x, k) ** 2).sum())(x))
            row[f"{name}_forward_s"] = median_seconds(lambda: jax.block_until_ready(forward(x, kernel)), args.reps)[0]
            row[f"{name}_input_gradient_s"] = median_seconds(lambda: jax.block_until_ready(backward(x, kernel)),
                                                             args.reps)[0]
        row["max_abs_diff"] = float(jnp.abs(jax.jit(xla_conv)(x, kernel) - jax.jit(im2col_conv)(x, kernel)).max())
        row["im2col_over_xla_forward"] = row["im2col_forward_s"] / row["xla_forward_s"]
        row["im2col_over_xla_input_gradient"] = row["im2col_input_gradient_s"] / row["xla_input_gradient_s"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = ROOT / "bench" / "results" / "conv_im2col_cpu.json"
    out.write_text(json.dumps({"cpu": cpu_model(), "cores": os.cpu_count(), "jax": jax.__version__,
                               "xla_flags": os.environ.get("XLA_FLAGS", ""), "cases": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
