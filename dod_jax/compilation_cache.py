"""The persistent XLA compilation cache of dod-jax's commands (restore, evaluate.py, train.py, the demo).

A second run of a command that compiles the same functions (the same model config, image
shapes, batch, dtype, devices, jax version and XLA options) loads the compiled executables from
disk instead of compiling them again. JAX keys every entry on those inputs; the default folder
is also per CPU model and instruction-set flags, so a home directory shared by different
machines never hands one CPU's executable to another.

Where the cache is, first match wins:
  --compilation-cache DIR        on the command line (`off` turns the cache off)
  DOD_JAX_COMPILATION_CACHE=DIR  in the environment (`off` likewise)
  JAX_COMPILATION_CACHE_DIR      JAX's own setting, when it is set, is left as it is
  $XDG_CACHE_HOME/dod_jax/xla/<cpu>  (~/.cache when XDG_CACHE_HOME is unset)

Only functions that took at least a second to compile are stored (JAX's default threshold).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from pathlib import Path

import jax

from dod_jax.machine import cpu_flags, cpu_model

ENV = "DOD_JAX_COMPILATION_CACHE"
OFF = "off"


def default_folder() -> Path:
    """$XDG_CACHE_HOME/dod_jax/xla/<a short hash of this CPU's model and instruction-set flags>."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    machine = hashlib.sha256(f"{cpu_model()}|{' '.join(sorted(cpu_flags()))}".encode()).hexdigest()[:12]
    return base / "dod_jax" / "xla" / machine


def add_argument(parser: argparse.ArgumentParser):
    parser.add_argument("--compilation-cache", metavar="DIR|off",
                        help=f"persistent compilation cache folder, or '{OFF}' (default: ${ENV}, else "
                             "JAX_COMPILATION_CACHE_DIR, else ~/.cache/dod_jax/xla/<cpu>)")


def enable(choice: str | None = None) -> Path | None:
    """Turn the persistent cache on in the folder `choice` (a --compilation-cache value; None:
    the environment's or the default) and return it; None when it is off. A folder that cannot
    be created is reported in one line and the run goes on without the cache."""
    choice = choice or os.environ.get(ENV)
    if choice is None and jax.config.jax_compilation_cache_dir:
        return Path(jax.config.jax_compilation_cache_dir)  # JAX_COMPILATION_CACHE_DIR: the user's own
    if choice == OFF:
        jax.config.update("jax_compilation_cache_dir", None)
        return None
    folder = Path(choice).expanduser() if choice else default_folder()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"compilation cache {folder}: cannot be created ({e.strerror or e}); compiling without it",
              file=sys.stderr)
        return None
    jax.config.update("jax_compilation_cache_dir", str(folder))
    print(f"compilation cache: {folder}", file=sys.stderr)
    return folder
