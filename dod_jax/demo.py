"""The main job: DOD in small, end to end on this machine.

    python -m dod_jax.demo --workdir runs/demo [--config configs/tiny.py]

1. writes the built-in demo set (AIO-5 layout, dod_jax.data.demo);
2. trains stage 1 (CLoRA, M_theta, conv_in, encoder LoRA with MSE + LPIPS + DMD) and then
   stage 2 (skip convs and DEMs with MSE + SSIM) of the config's DOD on it, with checkpoints,
   logs, TensorBoard scalars and sample sheets under workdir/stage1 and workdir/stage2;
3. evaluates the trained model on the demo test photos (dehaze, derain, denoise at sigma
   15 / 25 / 50) with the LQ input as baseline, as evaluate.py does: PSNR and SSIM (RGB, no
   border crop), LPIPS-VGG, and pyiqa's metrics where their weights are cached, written as
   workdir/eval/results.json, results.md, restored/ and LQ | restored | GT sheets/.

The base models are random (configs/tiny.py: base.random_seed), so the numbers show that
training moves the losses and the pipeline works end to end, not restoration quality.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from absl import logging as absl_logging

from dod_jax.configs import load_config
from dod_jax.evaluation.iqa import PyiqaMetrics
from dod_jax.evaluation.run import Scorer, evaluate as evaluate_items, first_per_column, layout_items
from dod_jax.restore.bundle import load_model
from dod_jax.restore.engine import Restorer, RestoreSettings
from dod_jax.training.loop import demo_root, run

ROOT = Path(__file__).resolve().parent.parent
EVAL_TASKS = ("dehaze", "derain", "denoise")


def evaluate(config, checkpoints: Path, data_root: Path, out: Path, per_task: int | None = None) -> dict:
    """The trained model and the LQ input on the demo test photos (the first `per_task` of each
    table column; all by default): evaluate.py's tables, JSON and images in `out`."""
    loaded = load_model(checkpoints, dtype="float32")
    restorer = Restorer(loaded.model, RestoreSettings(batch_size=2), use_hde=loaded.use_hde)
    items, problems = layout_items(data_root, "aio5", EVAL_TASKS)
    items = first_per_column(items, per_task)
    scorer = Scorer("rgb", 0, config.train.lpips_weights, PyiqaMetrics())
    return evaluate_items(restorer, items, out, scorer, problems,
                          {"ckpt": str(checkpoints), "note": "random base weights: a pipeline check, not quality"})


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
