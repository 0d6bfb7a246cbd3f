"""Loss curves as PNG images, from the records a run writes to log.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

from dod_jax.files import atomic_write

CURVES = ("loss", "mse", "lpips", "dmd", "ssim", "fake_loss")


def read_log(path: Path) -> list[dict]:
    """The records of a log.jsonl (none when it does not exist yet)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_losses(runs: dict[str, list[dict]], out: Path) -> Path:
    """One panel per run (title: its key), a curve per logged loss term against the step."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 3.6), squeeze=False)
    for axis, (title, records) in zip(axes[0], runs.items()):
        for key in CURVES:
            points = [(r["step"], r[key]) for r in records if key in r]
            if points:
                steps, values = zip(*points)
                axis.plot(steps, values, marker="." if len(points) < 30 else None, label=key)
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        if axis.lines:
            axis.legend(fontsize=8)
    figure.tight_layout()
    atomic_write(out, lambda p: figure.savefig(p, format="png", dpi=100))
    plt.close(figure)
    return out
