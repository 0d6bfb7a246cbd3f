"""evaluate.py: trained models (of any method) on a test set, side by side, with the LQ input
as baseline beside them.

    python evaluate.py --ckpt CKPT [CKPT ...] --data ROOT --out DIR   metrics, tables, images
    python evaluate.py --ckpt CKPT --input DIR --output DIR           restore a folder (no GT)
    python evaluate.py --ckpt CKPT --time                              latency at 512x512

--data is an AIO-3 / AIO-5 / CDD11 root (its test split; the layout is detected, or given
with --layout) or any folder of LQ images, with their GTs (same file stems) in --gt if there
are any. Denoising tests add Gaussian noise at sigma 15, 25 and 50 to the clean images, seeded
per image. Written to --out:

    results.json            every image's and every task's numbers, the settings, what was
                            unavailable and why, and the files that could not be used
    results.md              the paper's table shapes: PSNR / SSIM per task, then every metric
                            on average; the LQ input and each model in rows (a model's row is
                            named by its method's label, and by its checkpoint when two models
                            share a method)
    restored/<task>/*.png   the restorations (8-bit; the metrics are computed on these); with
                            several models restored/<row>/<task>/*.png
    sheets/<task>/*.png     LQ | each model's restoration | GT

PSNR and SSIM (dod_jax.losses.metrics) are computed in the colour space of --color (the
other one is in results.json too) after cutting --crop-border pixels. LPIPS-VGG is this
package's; LPIPS (AlexNet), DISTS, FID, CLIPIQA, NIQE, MUSIQ and MANIQA come from pyiqa when
their weights are cached (dod_jax.evaluation.iqa). Files that cannot be read are reported and
skipped; the command then exits with status 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import zlib
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from dod_jax import compilation_cache
from dod_jax.data import degradations as deg
from dod_jax.data import layouts
from dod_jax.losses import metrics
from dod_jax.errors import InputError, reported
from dod_jax.evaluation.iqa import LOWER_IS_BETTER, PER_IMAGE, PER_SET, PyiqaMetrics
from dod_jax.image_ops import ImageReadError, read_image, read_rgb, to_uint8, write_image
from dod_jax.losses.lpips import load_lpips
from dod_jax.restore import cli
from dod_jax.restore.engine import Restorer, restored_in_batches

LQ_ROW = ("lq", "Input (LQ)")
TABLE_METRICS = ("psnr", "ssim", "lpips_vgg") + PER_IMAGE + PER_SET


@dataclasses.dataclass(frozen=True)
class Item:
    task: str                 # the table column: a task, a CDD11 type, or denoise_<sigma>
    name: str                 # output file stem
    lq: Path | None           # None: noise is added to the GT (denoising at `sigma`)
    gt: Path | None
    sigma: float | None = None


def detect_layout(root: Path) -> str:
    test = root / "test"
    if (test / "clear").is_dir():
        return "cdd11"
    if (test / "deblur").is_dir() or (test / "lowlight").is_dir():
        return "aio5"
    if any((test / t).is_dir() for t in layouts.AIO3_TASKS):
        return "aio3"
    return "folder"


def layout_items(root: Path, layout: str, tasks=None) -> tuple[list[Item], list[str]]:
    report = layouts.scan(root, layout, "test", tasks)
    items = []
    for pair in report.pairs:
        task = f"{pair.task}_{pair.sigma:g}" if pair.sigma is not None else pair.task
        items.append(Item(task, Path(pair.lq or pair.gt).stem, pair.lq, pair.gt, pair.sigma))
    return items, report.problems


def folder_items(folder: Path, gt_folder: Path | None) -> tuple[list[Item], list[str]]:
    if not folder.is_dir():
        return [], [f"{folder}: no such folder"]
    problems = []
    gts = {p.stem: p for p in layouts.images_in(gt_folder)} if gt_folder else {}
    if gt_folder and not gt_folder.is_dir():
        problems.append(f"{gt_folder}: no such GT folder")
    items = []
    for lq in layouts.images_in(folder):
        if gt_folder and lq.stem not in gts:
            problems.append(f"{lq}: no GT named {lq.stem}.* in {gt_folder}; scored without reference")
        items.append(Item(folder.name, lq.stem, lq, gts.get(lq.stem)))
    return items, problems


def _quantised(image: np.ndarray) -> np.ndarray:
    """[0, 1] -> the 8-bit image that is written and scored."""
    return to_uint8(image * 2.0 - 1.0)


def first_per_column(items: list[Item], limit: int | None) -> list[Item]:
    """At most `limit` items of each table column, in their order (all when limit is None)."""
    columns = dict.fromkeys(i.task for i in items)
    return [i for task in columns for i in [j for j in items if j.task == task][:limit]]


def _read(item: Item) -> tuple[np.ndarray, np.ndarray | None]:
    """(LQ, GT or None) as float [0, 1] RGB; denoising noise is seeded by sigma and file name,
    so an image gets the same noise whatever else is evaluated."""
    gt = read_rgb(item.gt) if item.gt is not None else None
    if item.lq is None:
        return deg.gaussian_noise(gt, item.sigma, seed=[int(item.sigma), zlib.crc32(item.name.encode())]), gt
    return read_rgb(item.lq), gt


class Scorer:
    """Per-image scores of an image against its GT (or without one)."""

    def __init__(self, color: str, crop_border: int, lpips_weights: str | None, pyiqa: PyiqaMetrics):
        self.color, self.crop_border, self.pyiqa = color, crop_border, pyiqa
        self.lpips = load_lpips(lpips_weights) if lpips_weights and Path(lpips_weights).is_file() else None
        self.lpips_missing = None if self.lpips else f"LPIPS-VGG weights not found at {lpips_weights} (make writes them)"

    def scores(self, image: np.ndarray, gt: np.ndarray | None) -> dict[str, float]:
        out = {}
        if gt is not None:
            for color in metrics.COLORS:
                out[f"psnr_{color}"] = metrics.psnr(image, gt, color=color, crop_border=self.crop_border)
                out[f"ssim_{color}"] = metrics.ssim(image, gt, color=color, crop_border=self.crop_border)
            out["psnr"], out["ssim"] = out[f"psnr_{self.color}"], out[f"ssim_{self.color}"]
            if self.lpips is not None:
                a, b = (jnp.asarray(x[None] * 2.0 - 1.0, jnp.float32) for x in (image, gt))
                out["lpips_vgg"] = float(self.lpips(a, b)[0])
        out.update(self.pyiqa.image_scores(image, gt))
        return out


@dataclasses.dataclass
class Model:
    """A table row restored by a model."""
    key: str                  # its name in results.json and the restored/ folders
    label: str                # its name in the tables
    restorer: Restorer


def model_rows(loaded: list) -> list[tuple[str, str]]:
    """(key, label) of each loaded model: its method's name and label, with the checkpoint's
    folder name added where two models share a method."""
    names = [m.method.name for m in loaded]
    rows = []
    for m in loaded:
        if names.count(m.method.name) == 1:
            rows.append((m.method.name, m.method.label))
        else:
            folder = Path(m.source).name
            rows.append((f"{m.method.name}_{folder}", f"{m.method.label} ({folder})"))
    if len({key for key, _ in rows}) < len(rows):
        raise InputError("two --ckpt have the same method and folder name; their rows would share a name")
    return rows


def evaluate(models: list[Model], items: list[Item], out: Path, scorer: Scorer, problems: list[str],
             settings: dict) -> dict:
    """Restore `items` with each model (writing its restorations), then score them and the LQ
    input; write sheets, results.json and results.md into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    restored_dir = lambda model: out / "restored" / (model.key if len(models) > 1 else "")
    unreadable = {}
    for model in models:
        skip = lambda item, error: unreadable.setdefault(item, str(error))
        for item, _, _, restored, _ in restored_in_batches(model.restorer, items, _read, desc=f"evaluate {model.key}",
                                                           skipped=(ImageReadError,), on_skip=skip):
            write_image(_quantised(restored), restored_dir(model) / item.task / f"{item.name}.png")
    rows, problems = [], list(problems) + list(unreadable.values())
    keys = [LQ_ROW[0]] + [m.key for m in models]
    for item in items:
        if item in unreadable:
            continue
        lq, gt = _read(item)
        images = {"lq": _quantised(lq)}
        images.update({m.key: read_image(restored_dir(m) / item.task / f"{item.name}.png") for m in models})
        sheet = list(images.values()) + ([_quantised(gt)] if gt is not None else [])
        write_image(np.concatenate(sheet, axis=1), out / "sheets" / item.task / f"{item.name}.png")
        row = {"task": item.task, "image": item.name, "lq_file": str(item.lq) if item.lq else None,
               "gt_file": str(item.gt) if item.gt else None, "sigma": item.sigma}
        for key, image in images.items():
            row[key] = scorer.scores(image.astype(np.float32) / 255.0, gt)
        rows.append(row)
        if gt is not None and scorer.pyiqa.metrics.keys() & set(PER_SET):
            for key, image in images.items():
                write_image(image, out / "sets" / key / item.task / f"{item.name}.png")
            write_image(_quantised(gt), out / "sets" / "gt" / item.task / f"{item.name}.png")
    tasks = aggregate(rows, keys)
    for name in PER_SET:
        for task in list(tasks):
            if task == "average" or not (out / "sets" / "gt" / task).is_dir():
                continue
            for key in keys:
                value = scorer.pyiqa.set_score(name, out / "sets" / key / task, out / "sets" / "gt" / task)
                if value is not None:
                    tasks[task][key][name] = value
    if len(tasks) > 1:
        tasks["average"] = average(tasks, keys)
    unavailable = dict(scorer.pyiqa.unavailable)
    if scorer.lpips_missing:
        unavailable["lpips_vgg"] = scorer.lpips_missing
    results = {"settings": settings, "color": scorer.color, "crop_border": scorer.crop_border,
               "rows": dict([LQ_ROW] + [(m.key, m.label) for m in models]),
               "tasks": tasks, "images": rows, "unavailable": unavailable, "problems": problems}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(markdown(results))
    return results


def aggregate(rows: list[dict], keys: list[str]) -> dict:
    """Mean of every score per task and table row (`keys`)."""
    tasks = {}
    for task in dict.fromkeys(r["task"] for r in rows):
        mine = [r for r in rows if r["task"] == task]
        tasks[task] = {m: {k: float(np.mean([r[m][k] for r in mine if k in r[m]]))
                           for k in dict.fromkeys(k for r in mine for k in r[m])} for m in keys}
    return tasks


def average(tasks: dict, keys: list[str]) -> dict:
    """Mean over tasks of each per-task mean (every task weighs the same, as the papers average)."""
    return {m: {k: float(np.mean([t[m][k] for t in tasks.values() if k in t[m]]))
                for k in dict.fromkeys(k for t in tasks.values() for k in t[m])} for m in keys}


def _cell(values: dict, key: str, digits: int) -> str:
    return f"{values[key]:.{digits}f}" if key in values else "—"


def markdown(results: dict) -> str:
    tasks = results["tasks"]
    names = [t for t in tasks if t != "average"]
    columns = names + (["average"] if "average" in tasks else [])
    lines = [f"PSNR (dB) / SSIM, {results['color'].upper()}, crop border {results['crop_border']}", "",
             "| Method | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for m, label in results["rows"].items():
        cells = [f"{_cell(tasks[c][m], 'psnr', 2)} / {_cell(tasks[c][m], 'ssim', 4)}" for c in columns]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    summary = tasks.get("average", tasks[names[0]]) if names else {}
    arrows = {k: "↓" if k in LOWER_IS_BETTER or k == "lpips_vgg" else "↑" for k in TABLE_METRICS}
    header = " | ".join(f"{k.upper().replace('_VGG', '-VGG')} {arrows[k]}" for k in TABLE_METRICS)
    lines += ["", f"All metrics, {'average over tasks' if 'average' in tasks else columns[0] if columns else ''}", "",
              f"| Method | {header} |", "|---|" + "---|" * len(TABLE_METRICS)]
    for m, label in results["rows"].items():
        values = summary.get(m, {})
        digits = {"psnr": 2, "fid": 2, "musiq": 2, "niqe": 4}
        lines.append(f"| {label} | " + " | ".join(_cell(values, k, digits.get(k, 4)) for k in TABLE_METRICS) + " |")
    if results["unavailable"]:
        lines += ["", "— unavailable:"] + [f"- {k}: {v}" for k, v in results["unavailable"].items()]
    if results["problems"]:
        lines += ["", f"{len(results['problems'])} file(s) skipped (results.json lists them)."]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- command line

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="evaluate.py", description=__doc__.split("\n\n")[0])
    cli.add_settings_arguments(parser, several=True)
    parser.add_argument("--data", type=Path, help="a test-set root (AIO-3 / AIO-5 / CDD11) or a folder of LQ images")
    parser.add_argument("--layout", default="auto", choices=("auto", "folder", *layouts.LAYOUT_TASKS))
    parser.add_argument("--tasks", nargs="*", help="only these tasks of the layout")
    parser.add_argument("--gt", type=Path, help="GT folder for a folder of LQ images (same stems)")
    parser.add_argument("--out", type=Path, help="where results and images go")
    parser.add_argument("--limit", type=int, help="evaluate at most this many images per table column")
    parser.add_argument("--color", default="rgb", choices=metrics.COLORS, help="PSNR/SSIM colour space in tables")
    parser.add_argument("--crop-border", type=int, default=0)
    parser.add_argument("--lpips-weights", help="LPIPS-VGG safetensors (default: the checkpoint config's)")
    parser.add_argument("--pyiqa", nargs="*", default=list(PER_IMAGE + PER_SET),
                        help="pyiqa metrics to try (none: no pyiqa)")
    parser.add_argument("--input", type=Path, help="restore this folder without GT (with --output)")
    parser.add_argument("--output", type=Path)
    parser.add_argument("--time", action="store_true", help="time restores at --time-size on this device")
    parser.add_argument("--time-size", type=int, default=512)
    parser.add_argument("--time-runs", type=int, default=10)
    parser.add_argument("--time-warmup", type=int, default=2)
    args = parser.parse_args(argv)
    modes = [bool(args.data), bool(args.input), args.time]
    if sum(modes) != 1:
        parser.error("give one of --data (evaluate), --input (restore) or --time")
    if args.input and not args.output:
        parser.error("--input needs --output")
    if (args.input or args.time) and len(args.ckpt) > 1:
        parser.error("--input and --time take one --ckpt")
    if args.data and not args.out:
        parser.error("--data needs --out")
    with reported(parser.prog):
        compilation_cache.enable(args.compilation_cache)
        return run_mode(args)


def run_mode(args) -> int:
    """The mode the arguments ask for (restore a folder, time, or evaluate) -> exit status."""
    if args.input:
        return cli.restore_command(args, [args.input], args.output, args.ckpt[0])
    if args.time:
        restorer, _, loaded = cli.restorer_from(args, args.ckpt[0])
        if not hasattr(restorer.runner, "timings"):
            raise InputError(f"--time: method {loaded.method.name} has no timing")
        report = restorer.runner.timings(args.time_size, restorer.settings.batch_size, args.time_runs,
                                         args.time_warmup)
        for r in report:
            print(f"{r['device']}: {r['size']}x{r['size']}, batch {r['batch']}, {r['variant']}: "
                  f"{r['seconds_per_image'] * 1e3:.1f} ms per image, {r['images_per_second']:.2f} images/s")
        print(json.dumps(report, indent=2))
        return 0
    loaded = [cli.restorer_from(args, ckpt) for ckpt in args.ckpt]  # (restorer, settings, Loaded) each
    models = [Model(key, label, restorer)
              for (key, label), (restorer, _, _) in zip(model_rows([m for _, _, m in loaded]), loaded)]
    layout = detect_layout(args.data) if args.layout == "auto" else args.layout
    items, problems = (folder_items(args.data, args.gt) if layout == "folder"
                       else layout_items(args.data, layout, tuple(args.tasks) if args.tasks else None))
    items = first_per_column(items, args.limit)
    if not items:
        raise InputError(f"{args.data}: no test images found (layout {layout})"
                         + (f": {'; '.join(problems[:3])}" if problems else ""))
    lpips_weights = args.lpips_weights or loaded[0][2].config.train.lpips_weights
    scorer = Scorer(args.color, args.crop_border, lpips_weights, PyiqaMetrics(args.pyiqa or ()))
    settings = loaded[0][1] if len(models) == 1 else {m.key: s for m, (_, s, _) in zip(models, loaded)}
    results = evaluate(models, items, args.out, scorer, problems, dict(settings, data=str(args.data), layout=layout))
    print((args.out / "results.md").read_text())
    if results["problems"]:
        print(f"{len(results['problems'])} problem(s):\n  " + "\n  ".join(results["problems"]), file=sys.stderr)
        return 1
    return 0
