"""Config files are Python files with `get_config()` returning an ml_collections ConfigDict."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from ml_collections import ConfigDict


def load_config(path: str | os.PathLike) -> ConfigDict:
    path = Path(path).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    # Config files import each other as `configs.<name>`: make the folder above importable.
    root = str(path.parent.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    spec = importlib.util.spec_from_file_location(f"configs.{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise AttributeError(f"config file {path} defines no get_config()")
    return module.get_config()
