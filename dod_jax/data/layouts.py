"""The folder layouts of the all-in-one restoration sets, scanned into (LQ, GT) pairs and checked.

AIO-3 / AIO-5 root (PromptIR's layout, extended by GoPro and LOL-v1 for AIO-5):

    Train/Denoise/**/*                       clean images (BSD400 + WED); noise is added on the fly
    Train/Derain/rainy/rain-N.png            Rain100L; GT Train/Derain/gt/norain-N.png
    Train/Dehaze/synthetic/**/ID_A_B.jpg     RESIDE OTS; GT Train/Dehaze/original/ID.<any ext>
    Train/Deblur/<sequence>/blur/F.png       GoPro train; GT .../<sequence>/sharp/F.png      (AIO-5)
    Train/Lowlight/low/F.png                 LOL-v1 our485; GT Train/Lowlight/high/F.png     (AIO-5)
    test/denoise/bsd68/*                     BSD68 clean; tested at sigma 15, 25 and 50
    test/derain/Rain100L/input/F             GT test/derain/Rain100L/target/F
    test/dehaze/input/ID_A_B.<ext>           SOTS outdoor; GT test/dehaze/target/ID.<any ext>
    test/deblur/<sequence>/blur/F.png        GoPro test; GT .../sharp/F.png                  (AIO-5)
    test/lowlight/low/F.png                  LOL-v1 eval15; GT test/lowlight/high/F.png      (AIO-5)

CDD11 root: {train,test}/<type>/F with GT {train,test}/clear/F, types haze, haze_rain,
haze_snow, low, low_haze, low_haze_rain, low_haze_snow, low_rain, low_snow, rain, snow.

`scan` returns every pair or raises DataError listing every problem: a missing folder, an LQ
without its GT, a GT no LQ uses, an unreadable image, LQ and GT of different sizes. Grey,
grey+alpha, palette, RGBA and 16-bit images are readable (see dod_jax.image_ops.read_rgb) and listed as notes.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from dod_jax.errors import InputError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
DENOISE_SIGMAS = (15.0, 25.0, 50.0)
AIO3_TASKS = ("denoise", "derain", "dehaze")
AIO5_TASKS = AIO3_TASKS + ("deblur", "lowlight")
CDD11_TYPES = ("haze", "haze_rain", "haze_snow", "low", "low_haze", "low_haze_rain", "low_haze_snow", "low_rain",
               "low_snow", "rain", "snow")
LAYOUT_TASKS = {"aio3": AIO3_TASKS, "aio5": AIO5_TASKS, "cdd11": CDD11_TYPES}
SPLITS = ("train", "test")


class DataError(InputError):
    """A data folder that cannot be used as it is; the message lists every problem and file."""


@dataclasses.dataclass(frozen=True)
class Pair:
    task: str
    gt: Path
    lq: Path | None = None        # None: synthesised from gt (denoise)
    sigma: float | None = None    # test-time noise level of a denoise pair


@dataclasses.dataclass
class ScanReport:
    pairs: list[Pair]
    problems: list[str]
    notes: list[str]


def images_in(folder: Path, recursive: bool = False) -> list[Path]:
    pattern = "**/*" if recursive else "*"
    return sorted(p for p in folder.glob(pattern) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


_NOTED_MODES = {"L": "grey", "1": "1-bit", "LA": "grey with alpha", "P": "palette", "PA": "palette with alpha",
                "RGBA": "RGBA (alpha ignored)", "I;16": "16-bit grey", "I;16B": "16-bit grey", "I": "32-bit integer"}


def _inspect(path: Path, problems: list[str], notes: list[str]) -> tuple[int, int] | None:
    """The image's size, recording unreadable files and unusual modes."""
    try:
        with Image.open(path) as image:
            image.load()  # decodes the whole file: a truncated image fails here, not in training
            size, mode = image.size, image.mode
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        problems.append(f"{path}: not a readable image ({type(e).__name__}: {e})")
        return None
    if mode in _NOTED_MODES:
        notes.append(f"{path}: {_NOTED_MODES[mode]}, read as RGB")
    return size


def _paired(task, lq_files, gt_for, problems, notes) -> tuple[list[Pair], set[Path]]:
    """Pairs of every LQ with its GT (gt_for(lq) -> Path | None); every GT must be used."""
    pairs, used = [], set()
    for lq in lq_files:
        gt = gt_for(lq)
        if gt is None or not gt.is_file():
            problems.append(f"{lq}: no ground truth (looked for {gt if gt is not None else 'a file matching its name'})")
            continue
        used.add(gt)
        lq_size, gt_size = _inspect(lq, problems, notes), _inspect(gt, problems, notes)
        if lq_size and gt_size and lq_size != gt_size:
            problems.append(f"{lq}: size {lq_size[0]}x{lq_size[1]} differs from its ground truth {gt} "
                            f"({gt_size[0]}x{gt_size[1]})")
            continue
        pairs.append(Pair(task, gt, lq))
    return pairs, used


def _require(folder: Path, problems: list[str]) -> bool:
    if not folder.is_dir():
        problems.append(f"{folder}: missing folder")
        return False
    if not images_in(folder, recursive=True):
        problems.append(f"{folder}: holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        return False
    return True


def _unused(gt_folder: Path, used: set, problems: list[str], recursive=False):
    for gt in images_in(gt_folder, recursive):
        if gt not in used:
            problems.append(f"{gt}: ground truth without a degraded image (extra file?)")


def _by_stem(folder: Path) -> dict[str, Path]:
    return {p.stem: p for p in images_in(folder)}


def _scan_task(root: Path, task: str, split: str, problems, notes) -> list[Pair]:
    t = "Train" if split == "train" else "test"
    if task == "denoise":
        folder = root / t / ("Denoise" if split == "train" else "denoise/bsd68")
        if not _require(folder, problems):
            return []
        clean = images_in(folder, recursive=split == "train")
        for p in clean:
            _inspect(p, problems, notes)
        if split == "train":
            return [Pair(task, p) for p in clean]
        return [Pair(task, p, sigma=s) for s in DENOISE_SIGMAS for p in clean]
    if task in ("derain", "lowlight") or (task == "dehaze" and split == "test"):
        lq_dir, gt_dir, gt_name = {
            ("derain", "train"): ("Train/Derain/rainy", "Train/Derain/gt", lambda n: re.sub(r"^rain-", "norain-", n)),
            ("derain", "test"): ("test/derain/Rain100L/input", "test/derain/Rain100L/target", None),
            ("lowlight", "train"): ("Train/Lowlight/low", "Train/Lowlight/high", None),
            ("lowlight", "test"): ("test/lowlight/low", "test/lowlight/high", None),
            ("dehaze", "test"): ("test/dehaze/input", "test/dehaze/target", "by_id"),
        }[(task, split)]
        lq_dir, gt_dir = root / lq_dir, root / gt_dir
        if not (_require(lq_dir, problems) & _require(gt_dir, problems)):
            return []
        if gt_name == "by_id":
            ids = _by_stem(gt_dir)
            gt_for = lambda p: ids.get(p.stem.split("_")[0])
        else:
            gt_for = lambda p: gt_dir / (gt_name(p.name) if gt_name else p.name)
        pairs, used = _paired(task, images_in(lq_dir), gt_for, problems, notes)
        _unused(gt_dir, used, problems)
        return pairs
    if task == "dehaze":
        lq_dir, gt_dir = root / "Train/Dehaze/synthetic", root / "Train/Dehaze/original"
        if not (_require(lq_dir, problems) & _require(gt_dir, problems)):
            return []
        ids = _by_stem(gt_dir)
        pairs, used = _paired(task, images_in(lq_dir, recursive=True), lambda p: ids.get(p.stem.split("_")[0]),
                              problems, notes)
        _unused(gt_dir, used, problems)
        return pairs
    if task == "deblur":
        folder = root / t / "Deblur" if split == "train" else root / "test/deblur"
        if not _require(folder, problems):
            return []
        sequences = sorted(p for p in folder.iterdir() if p.is_dir())
        pairs = []
        for seq in sequences:
            if not (_require(seq / "blur", problems) & _require(seq / "sharp", problems)):
                continue
            got, used = _paired(task, images_in(seq / "blur"), lambda p: seq / "sharp" / p.name, problems, notes)
            _unused(seq / "sharp", used, problems)
            pairs += got
        return pairs
    raise ValueError(f"unknown task {task!r}")


def _scan_cdd11(root: Path, split: str, problems, notes) -> list[Pair]:
    base = root / split
    gt_dir = base / "clear"
    if not _require(gt_dir, problems):
        return []
    pairs, used = [], set()
    for kind in CDD11_TYPES:
        if _require(base / kind, problems):
            got, u = _paired(kind, images_in(base / kind), lambda p: gt_dir / p.name, problems, notes)
            pairs += got
            used |= u
    _unused(gt_dir, used, problems)
    return pairs


def scan(root: str | Path, layout: str, split: str, tasks: tuple[str, ...] | None = None) -> ScanReport:
    """Every pair of `split` ('train' / 'test') in a `layout` ('aio3', 'aio5', 'cdd11') folder."""
    root = Path(root)
    if layout not in LAYOUT_TASKS:
        raise ValueError(f"layout must be one of {sorted(LAYOUT_TASKS)}, got {layout!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    problems, notes = [], []
    if not root.is_dir():
        problems.append(f"{root}: no such data folder")
        return ScanReport([], problems, notes)
    if layout == "cdd11":
        pairs = _scan_cdd11(root, split, problems, notes)
    else:
        pairs = [p for task in (tasks or LAYOUT_TASKS[layout]) for p in _scan_task(root, task, split, problems, notes)]
    return ScanReport(pairs, problems, notes)


def checked_pairs(root: str | Path, layout: str, split: str, tasks: tuple[str, ...] | None = None) -> list[Pair]:
    report = scan(root, layout, split, tasks)
    if report.problems:
        raise DataError(f"{root} ({layout}, {split}) has {len(report.problems)} problem(s):\n  "
                        + "\n  ".join(report.problems))
    return report.pairs


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Check a data folder against its layout; list every problem.")
    parser.add_argument("root", type=Path)
    parser.add_argument("--layout", choices=sorted(LAYOUT_TASKS), default="aio3")
    parser.add_argument("--split", choices=SPLITS + ("both",), default="both")
    args = parser.parse_args(argv)
    failed = False
    for split in (SPLITS if args.split == "both" else (args.split,)):
        report = scan(args.root, args.layout, split)
        counts = {}
        for p in report.pairs:
            counts[p.task] = counts.get(p.task, 0) + 1
        print(f"{split}: {len(report.pairs)} pairs " + ", ".join(f"{t} {n}" for t, n in counts.items()))
        for note in report.notes:
            print(f"  note: {note}")
        for problem in report.problems:
            print(f"  PROBLEM: {problem}")
        failed |= bool(report.problems)
    print("problems found: fix them before training" if failed else "ok")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
