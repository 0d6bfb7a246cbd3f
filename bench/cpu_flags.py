"""The opt-in XLA:CPU option (DOD_JAX_CPU_FLAGS=ynn_dot, dod_jax/__init__.py: not proven correct
for training), measured on the tiny stage-1 training step: train.py runs N steps with XLA's
defaults (what dod_jax sets) and with `--xla_cpu_experimental_ynn_fusion_type=dot`, one after the
other, each logging every step; the median time per step after the first (compiling) one is
compared.

    python bench/cpu_flags.py [--steps 10] [--out bench/results/cpu_flags.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dod_jax.machine import cpu_model  # noqa: E402


def step_seconds(flags_on: bool, steps: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "DOD_JAX_CPU_FLAGS"}
    if flags_on:
        env["DOD_JAX_CPU_FLAGS"] = "ynn_dot"
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split() if "ynn" not in f)
    with tempfile.TemporaryDirectory() as work:
        subprocess.run([sys.executable, "train.py", "--config", "configs/tiny.py", "--workdir", work,
                        f"--config.train.steps={steps}", "--config.train.log_every=1",
                        "--config.train.checkpoint_every=100000", "--config.train.sample_every=100000",
                        "--config.parallel.devices=1"], cwd=ROOT, env=env, check=True, capture_output=True)
        times = [json.loads(line)["time"] for line in (Path(work) / "log.jsonl").read_text().splitlines()]
    per_step = np.diff(times)
    return {"first_step_s": times[0], "median_step_s": float(np.median(per_step)), "steps": steps}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "cpu_flags.json")
    args = parser.parse_args()
    runs = {"xla_defaults": step_seconds(False, args.steps), "ynn_dot": step_seconds(True, args.steps)}
    result = {"what": "tiny stage-1 training step (train.py, configs/tiny.py, 1 device)", "cpu": cpu_model(),
              "cores": os.cpu_count(), "runs": runs,
              "ynn_over_defaults": runs["ynn_dot"]["median_step_s"] / runs["xla_defaults"]["median_step_s"]}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
