"""restore: DOD on a file or folder of images of any size and format.

    restore --ckpt BUNDLE_OR_CHECKPOINT INPUT [INPUT ...] --output DIR [options]

Each input image is written to DIR under its own name and format (alpha kept; JPEG inputs
with alpha become PNG), atomically (a temporary file renamed into place), so an interrupted
run leaves only whole files. Images of one padded shape are restored in batches; large
images in tiles (dod_jax.restore.engine). DIR/restore_log.json records the settings, the
device and each file's outcome. An unreadable file is reported and skipped; the command then
exits with status 1 after restoring the rest.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
from PIL import Image
from tqdm import tqdm

from dod_jax import compilation_cache, methods
from dod_jax.data.layouts import IMAGE_SUFFIXES
from dod_jax.errors import InputError, reported
from dod_jax.image_ops import READ_FAILURES, ImageReadError, read_image, write_image
from dod_jax.restore.bundle import Loaded, load_model
from dod_jax.restore.color import COLOR_FIXES
from dod_jax.restore.engine import TILINGS, Restorer, RestoreSettings, restored_in_batches
from dod_jax.restore.images import FITS

LOG_FILE = "restore_log.json"


def input_files(inputs: list[Path]) -> list[tuple[Path, Path]]:
    """(file, name relative to its input) for files and folders (searched recursively)."""
    found = []
    for item in inputs:
        if item.is_dir():
            try:
                found += [(f, f.relative_to(item)) for f in sorted(item.rglob("*"))
                          if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES]
            except OSError as e:
                raise InputError(f"{item}: the folder cannot be read ({e.strerror or e})") from e
        elif item.is_file():
            found.append((item, Path(item.name)))
        else:
            raise InputError(f"{item}: no such file or folder")
    if not found:
        raise InputError(f"{', '.join(map(str, inputs))}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in it")
    return found


def _size_key(path: Path):
    """Sort key that puts images of one size together (so batches share a shape)."""
    try:
        with Image.open(path) as image:
            return (0, image.size)
    except READ_FAILURES:
        return (1, (0, 0))


def restore_files(restorer: Restorer, files: list[tuple[Path, Path]], output: Path) -> list[dict]:
    """Restore `files` into `output`; one record per file (status ok or error)."""
    records = []

    def skip(item, error):
        tqdm.write(f"skipped {error}")
        records.append({"input": str(item[0]), "status": "error", "error": str(error)})

    ordered = sorted(files, key=lambda item: _size_key(item[0]))
    for (source, name), image, _, result, seconds in restored_in_batches(
            restorer, ordered, lambda item: (read_image(item[0]), None), desc="restore",
            skipped=(ImageReadError,), on_skip=skip):
        written = write_image(result, output / name)
        records.append({"input": str(source), "output": str(written), "status": "ok",
                        "size": list(image.shape[:2]), "seconds": round(seconds, 4)})
    return records


def add_settings_arguments(parser: argparse.ArgumentParser, several: bool = False):
    """Options shared by `restore` and `evaluate.py` (`several` models): the model and how it restores."""
    defaults = RestoreSettings()
    parser.add_argument("--ckpt", required=True, type=Path, nargs="+" if several else None,
                        help="a restore bundle, or a training run's workdir / checkpoints folder / step folder"
                             + (" (several: one table row each)" if several else ""))
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                        help="compute dtype; auto = bfloat16 on accelerators, float32 on CPU")
    parser.add_argument("--sd", help="the SD 2.1-base folder, if not where the checkpoint says")
    parser.add_argument("--adm", help="the converted ADM file, if not where the checkpoint says")
    parser.add_argument("--prompts", help="the prompt-embeddings file, if not where the checkpoint says")
    parser.add_argument("--attention", choices=("auto", "chunked", "xla", "cudnn"),
                        help="how attention is computed (default: the checkpoint config's base.attention, 'auto': "
                             "query chunks on CPU, jax's default elsewhere; 'cudnn' needs a GPU)")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    model_default = "default: the checkpoint config's restore.{0}, else {1}"
    parser.add_argument("--bucket", type=int, help="pad sides to multiples of this; " + model_default.format(
        "bucket", defaults.bucket))
    parser.add_argument("--tile", type=int, help="tile side in pixels; " + model_default.format("tile", defaults.tile))
    parser.add_argument("--tile-overlap", type=int, help=model_default.format("tile_overlap", defaults.tile_overlap))
    parser.add_argument("--tile-above", type=int, help="restore in tiles above this many (padded) pixels; 0 = always; "
                        + model_default.format("tile_above", defaults.tile_above))
    parser.add_argument("--color-fix", choices=sorted(COLOR_FIXES), help=model_default.format("color_fix",
                                                                                             defaults.color_fix))
    parser.add_argument("--min-side", type=int, help=model_default.format("min_side", defaults.min_side))
    parser.add_argument("--fit", choices=sorted(FITS), help="sides to multiples of 8: pad (reflect) or resize "
                        "(Lanczos, down, as the authors' runner); " + model_default.format("fit", defaults.fit))
    parser.add_argument("--tiling", choices=TILINGS, help="large images: pixel tiles through VAE and UNet, or "
                        "latent tiles of the UNet alone (the authors'); " + model_default.format("tiling", defaults.tiling))
    parser.add_argument("--seed", type=int, default=defaults.seed,
                        help="the posterior noise when the model samples its latent (dod.latent 'sample')")
    parser.add_argument("--preset", choices=methods.preset_names(),
                        help="a preset of the model's method; DOD's official: the authors' inference (Lanczos resize "
                             "to multiples of 8, latent tiling of the UNet, the MFM on a bicubic 256 x 256 copy, a "
                             "posterior sample); the flags above still take precedence")
    compilation_cache.add_argument(parser)


SETTING_FLAGS = ("bucket", "tile", "tile_overlap", "tile_above", "color_fix", "min_side", "fit", "tiling")


def settings_from(args, loaded: Loaded) -> RestoreSettings:
    """The model config's restore settings, then the preset's, then what the command line sets."""
    given = {k: getattr(args, k) for k in SETTING_FLAGS if getattr(args, k) is not None}
    preset = methods.preset(loaded.method, args.preset)["restore"]
    return RestoreSettings.from_config(loaded.config, batch_size=args.batch_size, seed=args.seed,
                                       **{**preset, **given})


def restorer_from(args, ckpt: Path | None = None) -> tuple[Restorer, dict, Loaded]:
    """The Restorer the arguments describe (of `ckpt`, default args.ckpt), a record of its
    settings for logs, and the loaded model with its config."""
    ckpt = ckpt or args.ckpt
    loaded = load_model(ckpt, dtype=args.dtype, preset=args.preset,
                        base={"sd": args.sd, "adm": args.adm, "prompts": args.prompts, "attention": args.attention})
    restorer = loaded.restorer(settings_from(args, loaded))
    settings = {"ckpt": loaded.source, "method": loaded.method.name, "stage": loaded.stage,
                "device": str(jax.devices()[0]), "preset": args.preset, **vars(restorer.settings),
                **loaded.method.describe(loaded.model, loaded.config)}
    return restorer, settings, loaded


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="restore", description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="+", type=Path, help="image files or folders")
    parser.add_argument("--output", required=True, type=Path, help="the folder restored images go to")
    add_settings_arguments(parser)
    args = parser.parse_args(argv)
    with reported(parser.prog):
        compilation_cache.enable(args.compilation_cache)
        return restore_command(args, args.inputs, args.output)


def restore_command(args, inputs: list[Path], output: Path, ckpt: Path | None = None) -> int:
    """Restore `inputs` into `output` with the model (`ckpt`, default args.ckpt) and settings of
    `args`; writes the log. Returns the exit status: 1 when any file failed."""
    files = input_files(inputs)
    restorer, settings, _ = restorer_from(args, ckpt)
    records = restore_files(restorer, files, output)
    failed = [r for r in records if r["status"] != "ok"]
    log = {"settings": settings, "files": records, "restored": len(records) - len(failed), "failed": len(failed)}
    output.mkdir(parents=True, exist_ok=True)
    (output / LOG_FILE).write_text(json.dumps(log, indent=2))
    print(f"restored {log['restored']} of {len(records)} images into {output}"
          + (f"; {len(failed)} failed (see {output / LOG_FILE})" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
