"""Restoration methods behind one interface, found by name: `config.method` picks one from
the registry (as big_vision picks `models.<name>` from its config), and the method-free
layers above (training, restore, evaluation) reach a method only through `of(config)` /
`get(name)`, never by importing its package.

A method (a `Method`) gives what those layers need and nothing more:

    name, label            config.method, and its row in evaluate.py's tables
    stages                 its train.stage values, in order
    base_files             config.base keys naming the frozen weights files it builds on (the
                           bundle and checkpoint record their identity; restore checks them)
    presets                named restore settings: {"restore": RestoreSettings fields,
                           "config": {section: {key: value}} run with instead of the saved ones}
    base_identity(config)  what checkpoints and bundles record of those files
    build(config, dtype)   -> Built: the model on its base weights, trained parts fresh
    trained                the NNX filter of everything its stages train (checkpoints, bundles)
    training(config)       -> (steps, state, frozen) of config.train.stage: `state` a pytree
                           with a `step` counter, `frozen` a pytree the step reads, `steps` a
                           TrainingSteps; a later stage loads the earlier one from
                           train.init_from itself (dod_jax.checkpoints sits below methods)
    shaped_training(config) the same with shapes for values (planning, no weights read)
    runner(built, config, stage, seed)  -> a Runner: what restores a batch of prepared
                           images (`seed` for a method that draws noise)
    describe(model, config) what a restore log records of how the model runs

A Runner has `restore_batch(lq, prepared, engine)`: lq (B, H, W, 3) in [-1, 1] of one
shape, `prepared` the images they came from (dod_jax.restore.images.Prepared: the unpadded
image, for per-image conditioning) -> (B, H, W, 3) in [-1, 1]. It may restore large images
itself (`restore_tiled(prepared, engine)` -> (H, W, 3) in [0, 1]); otherwise the engine
restores pixel tiles through restore_batch and blends them. `engine` (restore.engine.Restorer)
offers `settings`, `tiled(size)` and `compiling(fn, name, *args)`, which runs a compiled
function and says so when its shapes are new. `timings(size, batch_size, runs, warmup)`, where
a runner has it, times its restore (evaluate.py --time): a list of reports, each with a
`variant`, `batch`, `size` and `seconds_per_image`.

`register(method)` adds one at run time (tests add a toy method this way).
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

from dod_jax.errors import ConfigError

# name -> the module whose METHOD is that method, imported when first asked for
KNOWN = {"dod": "dod_jax.methods.dod.method", "lorair": "dod_jax.methods.lorair.method"}
_loaded: dict[str, "Method"] = {}


@dataclasses.dataclass
class Built:
    """A method's model on its base weights, and what else building it read (DOD: the base's
    prompt embeddings) for the commands that need it."""
    model: Any
    extras: dict


class TrainingSteps:
    """One training stage's update, as the loop compiles it (jax.jit, state donated)."""

    def train_step(self, state, frozen, batch) -> tuple[Any, dict, Any]:
        """(state, frozen, batch) -> (state, scalar metrics with 'loss', restored batch); the
        batch holds 'lq' and 'gt' crops in [-1, 1] and 'task' ids (the task's place in the ratio)."""
        raise NotImplementedError

    def trained_params(self, state, frozen) -> dict:
        """The pure dict of everything the method trains, as restore reads it (Method.trained)."""
        raise NotImplementedError

    def counters(self, state) -> dict[str, int]:
        """Counts a run's summary reports (e.g. updates skipped for a non-finite loss)."""
        return {}


class Method:
    name: str
    label: str
    stages: tuple[str, ...]
    base_files: dict[str, str] = {}
    presets: dict[str, dict] = {}
    trained: Any = None  # an NNX filter

    def base_identity(self, config, root=None) -> dict:
        raise NotImplementedError

    def build(self, config, *, dtype: str | None = None) -> Built:
        raise NotImplementedError

    def training(self, config) -> tuple[TrainingSteps, Any, Any]:
        raise NotImplementedError

    def shaped_training(self, config) -> tuple[TrainingSteps, Any, Any]:
        raise NotImplementedError

    def runner(self, built: Built, config, stage: str, seed: int = 0):
        raise NotImplementedError

    def describe(self, model, config) -> dict:
        return {}


def register(method: Method) -> Method:
    """Add `method` under its name (replacing one of that name)."""
    _loaded[method.name] = method
    return method


def get(name: str) -> Method:
    if name not in _loaded:
        if name not in KNOWN:
            raise ConfigError(f"method {name!r} is not known (known: {sorted(set(KNOWN) | set(_loaded))})")
        register(importlib.import_module(KNOWN[name]).METHOD)
    return _loaded[name]


def of(config) -> Method:
    """The method config.method names."""
    return get(config.method)


def preset_names() -> list[str]:
    """Every restore preset of the known methods (the restore flags' choices)."""
    return sorted({p for name in sorted(set(KNOWN) | set(_loaded)) for p in get(name).presets})


def preset(method: Method, name: str | None) -> dict:
    """The preset `name` of `method` ({} for None); one the method lacks is refused."""
    if name is None:
        return {"restore": {}, "config": {}}
    if name not in method.presets:
        raise ConfigError(f"--preset {name}: method {method.name} has no such preset "
                          f"(it has {sorted(method.presets) or 'none'})")
    return {"restore": {}, "config": {}, **method.presets[name]}


