"""dod-jax: DOD (one-step all-in-one image restoration on Stable Diffusion 2.1-base) in JAX,
and the all-in-one restorers around it behind one method interface (LoRA-IR so far).

Layers, lowest first (tests/test_layering.py holds every import to them): base helpers
(errors, files, configs, image_ops for image files, schedule, parallel, compilation_cache,
tiles, optim); models (Flax ports, no method logic); adapters (LoRA, CLoRA, injection,
merging); weights, losses with the metrics that are losses too, data, and checkpoint I/O
(dod_jax.checkpoints: below both training and restore, so inference never imports the
trainer); the methods (dod_jax.methods: the registry and the method interface; DOD in
dod_jax.methods.dod, LoRA-IR in dod_jax.methods.lorair); training and restore; evaluation
(over restore); the commands (the demo, the converters of the authors' checkpoints). A module
imports its own layer and those below it, and training, restore and evaluation are
method-free: they reach a method through the registry (`dod_jax.methods.of(config)`), never
by importing its package.

Importing the package sets no XLA option: every run gets XLA's defaults.

One experimental XLA:CPU option is an opt-in, `DOD_JAX_CPU_FLAGS=ynn_dot` (before the first
import of dod_jax), which adds `--xla_cpu_experimental_ynn_fusion_type=dot` to XLA_FLAGS: matmuls
and convolutions go through YNNPACK fusions. It made the tiny stage-1 training step 0.72x as long
on a 2-core AMD EPYC (bench/results/README.md, cpu_flags.json); GPUs and TPUs ignore it. Known
failure (jax 0.10.2): a dot whose result feeds another dot's operand in the same compiled
function is fused into one YNNPACK call that returns garbage at some shapes, e.g.

    XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=dot python -c "import numpy as np, jax; \
    r = np.random.default_rng(0); x, A, B = (r.standard_normal(s).astype('f4') for s in \
    ((64, 1280), (1280, 8), (8, 1280))); ref = x.astype('f8') @ (A.astype('f8') @ B); \
    print(abs(np.asarray(jax.jit(lambda x, A, B: x @ (A @ B))(x, A, B)) - ref).max() / abs(ref).max())"

prints a relative error near 1.5 (6e-7 without it); widths 320 and 1280 at 64 tokens and ranks
4 to 16 fail. That is merged CLoRA's `x (W0 + s A diag(gamma) B)` in one jit, so dod-jax merges
in its own compiled function (dod_jax.methods.dod.restore.merge_generator) and passes the merged
weights to the forward as inputs. tests/test_xla_options.py holds restore, merged and unmerged,
under the opt-in against XLA's defaults; training under it is not proven (README, "XLA options").
"""

import os

YNN_DOT = "--xla_cpu_experimental_ynn_fusion_type=dot"
OPT_INS = {"ynn_dot": YNN_DOT}  # DOD_JAX_CPU_FLAGS values -> the XLA option each adds

_choice = os.environ.get("DOD_JAX_CPU_FLAGS", "")
if _choice:
    if _choice not in OPT_INS:
        raise SystemExit(f"DOD_JAX_CPU_FLAGS={_choice!r}: not an opt-in (those are {sorted(OPT_INS)}; "
                         "unset it for XLA's defaults)")
    if OPT_INS[_choice].split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {OPT_INS[_choice]}".strip()
