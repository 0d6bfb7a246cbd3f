"""The main job: DOD in small, end to end on this machine.

    python -m dod_jax.demo --workdir runs/demo [--config configs/demo.py]

1. writes the built-in demo set (AIO-5 layout, dod_jax.data.demo);
2. loads the demo's base: a tiny AutoencoderKL and UNet2DCondition of the SD 2.x family that
   the project pretrained on the demo's training photos (dod_jax/assets/demo_base, in the
   diffusers folder layout; dod_jax.methods.dod.pretrain_base reproduces it), a random ADM
   encoder for the MFM and fixed prompt embeddings;
3. trains stage 1 (CLoRA, M_theta, conv_in, encoder LoRA with MSE + LPIPS + DMD) and then
   stage 2 (skip convs and DEMs with MSE + SSIM) of the config's DOD on top, with
   checkpoints, logs, loss curves, TensorBoard scalars and sample sheets under
   workdir/stage1 and workdir/stage2;
4. evaluates the trained model on the held-out demo test photos (dehaze, derain, denoise at
   sigma 15 / 25 / 50) with the LQ input as baseline, as evaluate.py does: PSNR and SSIM
   (RGB, no border crop), LPIPS-VGG, and pyiqa's metrics where installed and cached, written
   as workdir/eval/results.json, results.md, restored/ and LQ | restored | GT sheets/;
5. draws both stages' losses in workdir/losses.png and writes workdir/summary.json.

Running it again continues from what is there: finished stages are not trained again.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from absl import logging as absl_logging

from dod_jax import compilation_cache
from dod_jax.configs import load_config
from dod_jax.errors import reported
from dod_jax.evaluation.iqa import PyiqaMetrics
from dod_jax.evaluation.run import Model, Scorer, evaluate as evaluate_items, first_per_column, layout_items
from dod_jax.restore.bundle import load_model
from dod_jax.restore.engine import RestoreSettings
from dod_jax.training.loop import demo_root, run
from dod_jax.training.plots import plot_losses, read_log

ROOT = Path(__file__).resolve().parent.parent
EVAL_TASKS = ("dehaze", "derain", "denoise")
# What "DOD restores" means in the summary: its average over the test columns beats the LQ input.
HIGHER_IS_BETTER = {"psnr": True, "ssim": True, "lpips_vgg": False}


def evaluate(config, checkpoints: Path, data_root: Path, out: Path, per_task: int | None = None) -> dict:
    """The trained model and the LQ input on the demo test photos (the first `per_task` of each
    table column; all by default): evaluate.py's tables, JSON and images in `out`."""
    loaded = load_model(checkpoints, dtype="float32")
    restorer = loaded.restorer(RestoreSettings.from_config(loaded.config, batch_size=2))
    items, problems = layout_items(data_root, "aio5", EVAL_TASKS)
    items = first_per_column(items, per_task)
    scorer = Scorer("rgb", 0, config.train.lpips_weights, PyiqaMetrics())
    model = Model(loaded.method.name, loaded.method.label, restorer)
    return evaluate_items([model], items, out, scorer, problems,
                          {"ckpt": str(checkpoints), "base": config.base.to_dict()})


def verdict(average: dict) -> dict[str, bool]:
    """For each of PSNR, SSIM and LPIPS-VGG: is DOD's average better than the LQ input's?"""
    dod, lq = average["dod"], average["lq"]
    return {k: (dod[k] > lq[k]) if higher else (dod[k] < lq[k]) for k, higher in HIGHER_IS_BETTER.items() if k in dod}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="dod_jax.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("runs/demo"))
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.py")
    parser.add_argument("--stage1-steps", type=int, default=None, help="default: the config's demo.<stage>.steps, else train.steps")
    parser.add_argument("--stage2-steps", type=int, default=None, help="default: the config's demo.<stage>.steps, else train.steps")
    parser.add_argument("--eval-per-task", type=int, default=None, help="evaluate this many test pairs per task")
    compilation_cache.add_argument(parser)
    args = parser.parse_args(argv)
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax reports every save step at INFO
    with reported(parser.prog):
        compilation_cache.enable(args.compilation_cache)
        return demo(load_config(args.config), args.workdir.resolve(),
                    {"stage1": args.stage1_steps, "stage2": args.stage2_steps}, args.eval_per_task)


def demo(config, work: Path, steps: dict[str, int | None], eval_per_task: int | None) -> int:
    config.parallel.devices = 1  # the demo's batches are small; one device holds them
    stages = ("stage1", "stage2")
    for stage in stages:
        stage_config = config.copy_and_resolve_references()
        stage_config.train.stage = stage
        stage_config.train.update(config.demo[stage] if "demo" in config else {})
        if steps[stage] is not None:
            stage_config.train.steps = steps[stage]
        if stage == "stage2":
            stage_config.train.init_from = str(work / "stage1" / "checkpoints")
        print(f"== {stage}: {stage_config.train.steps} steps", flush=True)
        if run(stage_config, work / stage)["interrupted"]:  # SIGTERM / Ctrl-C: a checkpoint is saved
            print(f"{stage} stopped early; running the demo again with --workdir {work} continues it", flush=True)
            return 1
    print("== evaluation on the demo test photos", flush=True)
    results = evaluate(config, work / "stage2" / "checkpoints", demo_root(work / "stage2"), work / "eval",
                       eval_per_task)
    logs = {stage: read_log(work / stage / "log.jsonl") for stage in stages}
    plot_losses(logs, work / "losses.png")
    average = results["tasks"]["average"]
    better = verdict(average)
    terms = lambda record: {k: record[k] for k in ("loss", "mse")}  # mse: the term both stages have
    summary = {"training": {s: {"first": terms(r[0]), "last": terms(r[-1])} for s, r in logs.items() if r},
               "evaluation": average, "dod_better_than_lq": better, "workdir": str(work)}
    (work / "summary.json").write_text(json.dumps(summary, indent=2))
    print((work / "eval" / "results.md").read_text())
    print("DOD against the LQ input on average: " + ", ".join(
        f"{k} {average['dod'][k]:.4g} vs {average['lq'][k]:.4g} ({'better' if ok else 'NOT better'})"
        for k, ok in better.items()))
    print(f"written: {work / 'eval'} (results.md, sheets/), {work / 'losses.png'}, {work / 'summary.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
