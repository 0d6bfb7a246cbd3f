"""Training checkpoints (orbax CheckpointManager), one directory per saved step:

    state/   the whole TrainState: trained parameters, optimiser states, step, key, skip counters
    params/  every parameter the method trains in any stage (stage 1's, plus stage 2's once it
             runs), as a plain nested dict: what a later stage starts from and what evaluation
             and restore bundles load
    data/    the input iterator's position (JSON)
    meta/    stage, the config (JSON), the identity of the frozen base weights, the step's metrics

Orbax writes each step into a temporary directory and renames it when complete, so an
interrupted save leaves no half checkpoint; saves run in the background. The latest `keep`
steps are kept, plus the step with the lowest logged loss.

Checkpoint I/O sits below both training and restore and knows no method: which parameters are
trained, and which of them a load wants, come from the caller as NNX filters.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from orbax.checkpoint.checkpoint_managers import preservation_policy as policies

from dod_jax.errors import InputError

ITEMS = ("state", "params", "data", "meta")


class CheckpointError(InputError):
    """A checkpoint that cannot continue or start this run; the message names it."""


class Checkpoints:
    def __init__(self, directory: str | os.PathLike, keep: int = 3, *, read_only: bool = False):
        self.directory = Path(directory).resolve()
        if read_only and not self.directory.is_dir():
            raise CheckpointError(f"{self.directory}: no such checkpoint directory")
        policy = policies.AnyPreservationPolicy([
            policies.LatestN(n=keep),
            policies.BestN(get_metric_fn=lambda metrics: metrics["loss"], reverse=True, n=1),
        ])
        # a read-only manager saves nothing (orbax warns unless told so)
        options = ocp.CheckpointManagerOptions(preservation_policy=policy, read_only=read_only, create=not read_only,
                                               save_interval_steps=0 if read_only else 1)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, params: dict, data_state: dict, meta: dict, metrics: dict[str, float]):
        """`params`: the trained parameters as a plain nested dict (nnx.to_pure_dict)."""
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state), params=ocp.args.StandardSave(params),
            data=ocp.args.JsonSave(data_state), meta=ocp.args.JsonSave(dict(meta, step=step, metrics=metrics)))
        finite = {k: float(v) for k, v in metrics.items() if np.isfinite(v)}
        self.manager.save(step, args=args, metrics=finite if "loss" in finite else None)

    def restore(self, step: int, abstract_state) -> tuple[Any, dict]:
        """(state, data position) of `step`, the state laid out like `abstract_state`."""
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        return restored["state"], restored["data"]

    def meta(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def locate(path: str | os.PathLike) -> tuple[Checkpoints, int]:
    """The checkpoints and the step that `path` names: a run's workdir or its checkpoints
    directory (the latest step), or one step's directory. The caller closes them (`with`)."""
    path = Path(path).resolve()
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    if (path / "meta").is_dir():
        directory, step = path.parent, int(path.name)
    else:
        directory, step = path, None
    checkpoints = Checkpoints(directory, read_only=True)
    step = checkpoints.latest_step() if step is None else step
    if step is None:
        checkpoints.close()
        raise CheckpointError(f"{directory}: holds no checkpoint")
    return checkpoints, step


def load_trained_params(model, path: str | os.PathLike, wanted, saved) -> dict:
    """Put the parameters of `model` that the NNX filter `wanted` selects from a checkpoint into
    it; `saved` selects every parameter the checkpoint holds (its params/ item); `path` as
    `locate` takes it. Returns its meta."""
    checkpoints, step = locate(path)
    wanted = nnx.state(model, wanted)
    target = nnx.to_pure_dict(nnx.state(model, saved))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), target)
    with checkpoints:
        try:
            restored = checkpoints.manager.restore(step, args=ocp.args.Composite(
                params=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        except (ValueError, KeyError, FileNotFoundError) as e:
            # orbax's message goes on to advise options of its own API, which the user cannot set here
            detail = str(e).split(" Truncating/padding is disabled")[0]
            raise CheckpointError(f"{checkpoints.directory} step {step}: its trained parameters do not fit this "
                                  f"model (the config differs from the one it was trained with?): {detail}") from e
    nnx.replace_by_pure_dict(wanted, _same_keys(nnx.to_pure_dict(wanted), restored["params"]))
    nnx.update(model, wanted)
    return restored["meta"]


def _same_keys(like: dict, source: dict) -> dict:
    return {k: _same_keys(v, source[k]) if isinstance(v, dict) else source[k] for k, v in like.items()}
