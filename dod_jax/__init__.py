"""dod-jax: DOD (one-step all-in-one image restoration on Stable Diffusion 2.1-base) in JAX.

Importing the package sets one XLA:CPU option before JAX starts its CPU backend:
`--xla_cpu_experimental_ynn_fusion_type=dot` routes matmuls and convolutions through
YNNPACK. Measured on a 2-core AMD EPYC (bench/README.md): the tiny stage-1 training step
1.60 -> 1.15 s, the tiny VAE pretraining step 1.16 -> 0.87 s. GPUs and TPUs ignore it. Set
DOD_JAX_CPU_FLAGS=0 to keep XLA's defaults, or put any ynn option in XLA_FLAGS yourself.
"""

import os

CPU_FLAGS = "--xla_cpu_experimental_ynn_fusion_type=dot"

if os.environ.get("DOD_JAX_CPU_FLAGS", "1") != "0" and "ynn" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {CPU_FLAGS}".strip()
