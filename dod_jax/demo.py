"""The main job: DOD in small, end to end on this machine.

    python -m dod_jax.demo --workdir runs/demo [--config configs/tiny.py]

1. writes the built-in demo set (AIO-5 layout, dod_jax.data.demo);
2. trains stage 1 (CLoRA, M_theta, conv_in, encoder LoRA with MSE + LPIPS + DMD) and then
   stage 2 (skip convs and DEMs with MSE + SSIM) of the config's DOD on it, with checkpoints,
   logs, TensorBoard scalars and sample sheets under workdir/stage1 and workdir/stage2;
3. evaluates the trained model on the demo test photos (dehaze, derain, denoise at sigma
   15 / 25 / 50)
   with the LQ input as baseline: PSNR and SSIM (RGB, no border crop, [0, 1]) and LPIPS-VGG,
   written as workdir/eval/results.json, results.md and LQ | restored | GT sheets.

The base models are random (configs/tiny.py: base.random_seed), so the numbers show that
training moves the losses and the pipeline works end to end, not restoration quality.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import jax.numpy as jnp
from absl import logging as absl_logging
import numpy as np
from flax import nnx
from PIL import Image
from tqdm import tqdm

from dod_jax.configs import load_config
from dod_jax.data import degradations as deg
from dod_jax.data.layouts import checked_pairs, read_rgb
from dod_jax.dod.build import build_dod
from dod_jax.dod.images import restore_image
from dod_jax.image_ops import to_uint8
from dod_jax.losses.lpips import load_lpips
from dod_jax.losses.ssim import ssim
from dod_jax.training.checkpoints import load_trained_params
from dod_jax.training.loop import base_models, demo_root, run

ROOT = Path(__file__).resolve().parent.parent
EVAL_TASKS = ("dehaze", "derain", "denoise")
EVAL_SIGMA = 25.0  # denoising pairs without a sigma of their own


def psnr(x: np.ndarray, y: np.ndarray) -> float:
    """PSNR in dB of images in [0, 1]."""
    mse = float(np.mean((x.astype(np.float64) - y.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(1.0 / mse)


def evaluate(config, checkpoints: Path, data_root: Path, out: Path, per_task: int | None = None) -> dict:
    """Per-image and per-task PSNR / SSIM / LPIPS of the LQ input and of DOD's restoration
    (the first `per_task` test pairs of each task; all by default)."""
    out.mkdir(parents=True, exist_ok=True)
    base, _ = base_models(config)
    model = build_dod(config, base, config.train.seed)
    load_trained_params(model, checkpoints, stages=("stage1", "stage2"))
    graphdef, state = nnx.split(model)
    restore = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    lpips = load_lpips(config.train.lpips_weights)
    lpips_fn = jax.jit(lambda a, b: lpips(a, b))
    ssim_fn = jax.jit(lambda a, b: ssim(a, b, data_range=1.0))
    rows = []
    pairs = [p for p in checked_pairs(data_root, "aio5", "test") if p.task in EVAL_TASKS]
    pairs = [p for t in EVAL_TASKS for p in [q for q in pairs if q.task == t][:per_task]]
    for index, pair in enumerate(tqdm(pairs, desc="evaluate")):
        gt = read_rgb(pair.gt)
        sigma = pair.sigma or EVAL_SIGMA
        lq = read_rgb(pair.lq) if pair.lq is not None else deg.gaussian_noise(gt, sigma, seed=[index])
        restored = np.clip(restore_image(lambda x: np.asarray(restore(state, jnp.asarray(x))), lq), 0.0, 1.0)
        row = {"task": pair.task, "image": Path(pair.lq or pair.gt).name}
        if pair.lq is None:
            row["sigma"] = sigma
        for name, image in (("lq", lq), ("dod", restored)):
            a, b = jnp.asarray(image[None], jnp.float32), jnp.asarray(gt[None], jnp.float32)
            row[f"{name}_psnr"] = psnr(image, gt)
            row[f"{name}_ssim"] = float(ssim_fn(a, b)[0])
            row[f"{name}_lpips"] = float(lpips_fn(a * 2 - 1, b * 2 - 1)[0])
        rows.append(row)
        sheet = np.concatenate([lq, restored, gt], axis=1)
        Image.fromarray(to_uint8(sheet * 2 - 1)).save(out / f"{index:03d}_{pair.task}_{Path(row['image']).stem}.png")
    tasks = {t: {k: float(np.mean([r[k] for r in rows if r["task"] == t])) for k in rows[0] if k.endswith(
        ("psnr", "ssim", "lpips"))} for t in EVAL_TASKS}
    tasks["average"] = {k: float(np.mean([tasks[t][k] for t in EVAL_TASKS])) for k in tasks[EVAL_TASKS[0]]}
    results = {"images": rows, "tasks": tasks, "color": "RGB", "crop_border": 0,
               "note": "random base weights: a pipeline check, not restoration quality"}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(markdown_table(tasks))
    return results


def markdown_table(tasks: dict) -> str:
    lines = ["| task | input | PSNR ↑ | SSIM ↑ | LPIPS ↓ |", "|---|---|---|---|---|"]
    for task, values in tasks.items():
        for name, label in (("lq", "LQ"), ("dod", "DOD")):
            lines.append(f"| {task} | {label} | {values[f'{name}_psnr']:.2f} | {values[f'{name}_ssim']:.4f} | "
                         f"{values[f'{name}_lpips']:.4f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("runs/demo"))
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "tiny.py")
    parser.add_argument("--stage1-steps", type=int, default=None, help="default: the config's train.steps")
    parser.add_argument("--stage2-steps", type=int, default=None, help="default: the config's train.steps")
    parser.add_argument("--eval-per-task", type=int, default=None, help="evaluate this many test pairs per task")
    args = parser.parse_args(argv)
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax reports every save step at INFO
    config = load_config(args.config)
    config.parallel.devices = 1  # the demo's batches are small; one device holds them
    work = args.workdir.resolve()
    summaries = {}
    for stage, steps in (("stage1", args.stage1_steps), ("stage2", args.stage2_steps)):
        stage_config = config.copy_and_resolve_references()
        stage_config.train.stage = stage
        if steps is not None:
            stage_config.train.steps = steps
        if stage == "stage2":
            stage_config.train.init_from = str(work / "stage1" / "checkpoints")
        print(f"== {stage}: {stage_config.train.steps} steps", flush=True)
        summaries[stage] = run(stage_config, work / stage)
    print("== evaluation on the demo test photos", flush=True)
    results = evaluate(config, work / "stage2" / "checkpoints", demo_root(work / "stage2"), work / "eval",
                       args.eval_per_task)
    losses = {s: {"first": v["losses"][0], "last": v["losses"][-1]} for s, v in summaries.items() if v["losses"]}
    summary = {"training": losses, "evaluation": results["tasks"]["average"], "workdir": str(work)}
    (work / "summary.json").write_text(json.dumps(summary, indent=2))
    print((work / "eval" / "results.md").read_text())
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
