"""A trained model of any method (config.method, dod_jax.methods), loadable in one call: from
a restore bundle or a training checkpoint.

A restore bundle is a folder:

    bundle.json         format, the training stage, the config (JSON, its `method` included)
                        and the identity of the base weights (path, size and sha256 of each
                        file the method's base_files name: DOD's SD, ADM and prompt files)
    params.safetensors  every parameter the method's stages train, flattened to '/'-joined names

It holds what was trained, not the base weights; `load_model` finds those where the config
says (or where `base` overrides say) and names every file that is missing or differs in size.

    python -m dod_jax.restore.bundle --ckpt runs/x/stage2/checkpoints --out dod_bundle
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path
from typing import Callable

import jax
import numpy as np
from flax import nnx, traverse_util
from ml_collections import ConfigDict
from safetensors.numpy import load_file, save_file

from dod_jax import methods
from dod_jax.checkpoints import CheckpointError, load_trained_params, locate
from dod_jax.configs import saved_config
from dod_jax.errors import InputError
from dod_jax.files import atomic_folder
from dod_jax.restore.engine import Restorer, RestoreSettings

FORMAT = "dod-jax restore bundle"
VERSION = 2  # 2: the trained conv_in is held whole (unet/conv_in/adapters/gen/copy), not as a delta
BUNDLE_FILE, PARAMS_FILE = "bundle.json", "params.safetensors"


class BundleError(InputError):
    """A bundle or checkpoint that cannot be loaded; the message names the file and the cause."""


@dataclasses.dataclass
class Loaded:
    built: methods.Built  # the model and what else building it read (DOD: the base's prompt embeddings)
    config: ConfigDict
    stage: str            # the stage that produced the parameters (DOD: stage1 restores without DEMs)
    source: str

    @property
    def model(self):
        return self.built.model

    @property
    def method(self) -> methods.Method:
        return methods.of(self.config)

    def restorer(self, settings: RestoreSettings | None = None, **kw) -> Restorer:
        """The restore engine with this model's runner; `kw` goes to Restorer (status)."""
        settings = settings or RestoreSettings()
        return Restorer(self.method.runner(self.built, self.config, self.stage, settings.seed), settings, **kw)


def save_bundle(model, config, stage: str, out: str | os.PathLike, *,
                files: dict[str, Callable[[Path], object]] | None = None, provenance: dict | None = None) -> Path:
    """Write `model`'s trained parameters and the base identity as a bundle folder, atomically
    (written beside `out` and renamed into place). `files` {name: write(path)} puts base files
    inside the bundle (config.base entries that name them relatively are read from the
    bundle folder); `provenance` is recorded as it is (where imported weights came from)."""
    out = Path(out).resolve()
    if out.exists():
        raise BundleError(f"{out} exists; choose a new folder for the bundle")
    method = methods.of(config)
    flat = _flat_names(nnx.to_pure_dict(nnx.state(model, method.trained)))
    meta = {"format": FORMAT, "version": VERSION, "stage": stage, "config": json.loads(config.to_json())}
    if provenance:
        meta["provenance"] = provenance
    tensors = {k: np.array(v, order="C") for k, v in flat.items()}  # 0-d stays 0-d

    def fill(staging: Path):
        for name, write in (files or {}).items():
            write(staging / name)
        meta["base"] = method.base_identity(config, root=staging)
        save_file(tensors, str(staging / PARAMS_FILE))
        (staging / BUNDLE_FILE).write_text(json.dumps(meta, indent=2))

    atomic_folder(out, fill)
    return out


def load_model(path: str | os.PathLike, *, dtype: str = "auto", base: dict[str, str] | None = None,
               preset: str | None = None, sections: dict[str, dict] | None = None) -> Loaded:
    """The model of the saved config's method with trained parameters from `path`: a bundle
    folder, a training run's workdir, its checkpoints folder, or one step's folder. `dtype`:
    float32, bfloat16, or auto (bfloat16 on accelerators, float32 on CPU). `base`: {key: path}
    overriding where the base weights are (DOD: 'sd', 'adm', 'prompts'), and {'attention': name}
    how they compute attention (base.attention). `preset`: one of the method's presets, whose
    config part is applied (its restore settings are the caller's: methods.preset).
    `sections`: {section: {key: value}} of the config to run the model with instead (how it
    restores, e.g. DOD's latent; not what the weights are)."""
    path = Path(path).resolve()
    if not path.exists():
        raise BundleError(f"{path}: no such bundle or checkpoint")
    if (path / BUNDLE_FILE).is_file():
        meta = _read_bundle_meta(path)
    else:
        meta = _checkpoint_meta(path)
    config = saved_config(meta["config"])
    method = methods.of(config)
    if (path / BUNDLE_FILE).is_file():
        for key in method.base_files:
            if config.base[key]:
                config.base[key] = str(_in_bundle(config.base[key], path))
    for key, value in (base or {}).items():
        if value:
            config.base[key] = str(value)
    _check_base(config, method.base_files, meta["base"], path)
    for changes in (methods.preset(method, preset)["config"], sections or {}):
        for section, values in changes.items():
            config[section].update(values)
    if dtype == "auto":
        dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    built = method.build(config, dtype=dtype)
    if (path / BUNDLE_FILE).is_file():
        _fill_from_bundle(built.model, method.trained, path / PARAMS_FILE)
    else:
        load_trained_params(built.model, path, method.trained, method.trained)
    return Loaded(built, config, meta["stage"], str(path))


def _read_bundle_meta(path: Path) -> dict:
    try:
        meta = json.loads((path / BUNDLE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise BundleError(f"{path / BUNDLE_FILE}: not readable JSON ({e})") from e
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise BundleError(f"{path / BUNDLE_FILE}: not a version-{VERSION} {FORMAT}")
    return meta


def _checkpoint_meta(path: Path) -> dict:
    try:
        checkpoints, step = locate(path)
        with checkpoints:
            return checkpoints.meta(step)
    except CheckpointError as e:
        raise BundleError(f"{e} (and {path} is no restore bundle: it has no {BUNDLE_FILE})") from e


def _in_bundle(path: str | os.PathLike, bundle: Path) -> Path:
    """A path a bundle records: relative ones name files the bundle holds."""
    path = Path(path)
    return path if path.is_absolute() else bundle / path


def _check_base(config, base_files: dict[str, str], recorded: dict, source: Path):
    """Every base weights file (config.base keys: `base_files`) the parameters were trained on
    is where the config says, with the recorded size (a full sha256 check is
    `dod_jax.files.file_identity`)."""
    if config.base.random_seed >= 0:
        return
    problems = []
    for key, what in base_files.items():
        where = Path(config.base[key] or "")
        if not config.base[key] or not where.exists():
            problems.append(f"{what} (base.{key}) is missing: looked for {where or 'no path'}")
            continue
        root = _in_bundle(recorded.get(key, {}).get("path", where), source)
        files = [dict(f, path=str(_in_bundle(f["path"], source))) for f in recorded.get(key, {}).get("files", [])]
        for f in files:
            local = where / Path(f["path"]).relative_to(root) if where.is_dir() else where
            if not local.is_file():
                problems.append(f"{what} (base.{key}): {local} is missing")
            elif local.stat().st_size != f["bytes"]:
                problems.append(f"{what} (base.{key}): {local} has {local.stat().st_size} bytes, trained on "
                                f"{f['bytes']} (sha256 {f['sha256']})")
    if problems:
        raise BundleError(f"{source} needs base weights that are not here:\n  " + "\n  ".join(problems) +
                          "\nPass their locations (--sd, --adm, --prompts).")


def _name(path: tuple) -> str:
    return "/".join(map(str, path))


def _flat_names(tree: dict) -> dict:
    return {_name(k): v for k, v in traverse_util.flatten_dict(tree).items()}


def _fill_from_bundle(model, trained, file: Path):
    """Put the parameters the NNX filter `trained` selects from a bundle's safetensors file
    into `model`; every one must be there in its shape, and nothing else."""
    try:
        tensors = load_file(str(file))
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise BundleError(f"{file}: not a readable safetensors file ({e})") from e
    state = nnx.state(model, trained)
    paths = traverse_util.flatten_dict(nnx.to_pure_dict(state))
    wanted = {_name(k): v for k, v in paths.items()}
    missing = sorted(set(wanted) - set(tensors))
    unexpected = sorted(set(tensors) - set(wanted))
    misshaped = [f"{k}: {tensors[k].shape} in the file, {wanted[k].shape} in the model"
                 for k in sorted(set(wanted) & set(tensors)) if tensors[k].shape != wanted[k].shape]
    if missing or unexpected or misshaped:
        raise BundleError(f"{file} does not fit the model its bundle.json describes: missing {missing[:5]}"
                          f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}, mis-shaped {misshaped[:5]}")
    values = {k: np.asarray(tensors[_name(k)], np.asarray(v).dtype) for k, v in paths.items()}
    nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(values))
    nnx.update(model, state)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Export a training checkpoint as a restore bundle.")
    parser.add_argument("--ckpt", required=True, type=Path, help="a run workdir, its checkpoints folder or a step")
    parser.add_argument("--out", required=True, type=Path, help="the bundle folder to create")
    args = parser.parse_args(argv)
    loaded = load_model(args.ckpt, dtype="float32")
    out = save_bundle(loaded.model, loaded.config, loaded.stage, args.out)
    print(f"wrote {out} ({loaded.stage} parameters from {loaded.source})")


if __name__ == "__main__":
    main()
