"""Config files are Python files with `get_config()` returning an ml_collections ConfigDict;
command lines change single values with `--config.<key>=<value>` (`apply_overrides`). A config
saved by an earlier version (in a checkpoint or bundle) gets the keys added since by
`saved_config`, once, where it is read: the code reads every key plainly."""

from __future__ import annotations

import ast
import importlib.util
import os
import sys
from pathlib import Path

from ml_collections import ConfigDict

from dod_jax.errors import ConfigError


def load_config(path: str | os.PathLike) -> ConfigDict:
    path = Path(path).resolve()
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    # Config files import each other as `configs.<name>`: make the folder above importable.
    root = str(path.parent.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    spec = importlib.util.spec_from_file_location(f"configs.{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # a config file is the user's code: any error in it is theirs to fix
        raise ConfigError(f"{path}: cannot be loaded ({type(e).__name__}: {e})") from e
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path}: defines no get_config(), so it is not a config file")
    return module.get_config()


def apply_overrides(config: ConfigDict, overrides: list[str]) -> ConfigDict:
    """Set `key.path=value` items on `config`. A value is read as a Python literal when it is
    one (numbers, booleans, None, tuples, quoted strings) and as a plain string otherwise; the
    config's own field types then check it. An unknown key or a wrong type is a ConfigError."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--config.{item}: expected --config.<key>=<value>")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        *parents, leaf = key.split(".")
        node = config
        try:
            for name in parents:
                node = node[name]
            if leaf not in node:
                raise KeyError(leaf)
            node[leaf] = value
        except (KeyError, TypeError) as e:
            raise ConfigError(f"--config.{key}: the config has no such key, or {value!r} does not fit it ({e})") from e
    return config


# Keys added to the configs after runs were saved with them, each with the value that gives
# what the code did before the key existed (as big_vision's fix_old_checkpoints does for its
# checkpoints).
ADDED_KEYS = {
    "method": "dod",                  # DOD was the only method
    "base.dtype": "float32",          # the frozen base was stored in float32
    "base.attention": "auto",         # attention as dot_product_attention's default computes it
    "dod.mfm_resize": "bilinear",     # the MFM's input was resized bilinearly
    "dod.init": "official",           # M_theta initialised as the authors' code does
    "train.fake_scope": "all",        # the fake score's LoRA on every target layer
    "train.clamp_output": True,       # the stage-1 losses on the clamped restoration
    "train.real_score_dtype": None,   # the real score computed in train.dtype
}


def saved_config(values: dict) -> ConfigDict:
    """A config saved as a dict (checkpoint or bundle meta) with the keys added since it was
    saved filled in (ADDED_KEYS)."""
    config = ConfigDict(values)
    for dotted, value in ADDED_KEYS.items():
        *section, key = dotted.split(".")
        node = config[section[0]] if section and section[0] in config else None if section else config
        if node is not None and key not in node:
            node[key] = value
    return config
