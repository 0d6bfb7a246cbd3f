"""A training run of one stage: model and data from the config, the sharded jitted step,
checkpoints that resume exactly, progress, logs, TensorBoard scalars and sample images.

    run(config, workdir)      (train.py is the command line around it)

workdir/ receives checkpoints/ (dod_jax.checkpoints), log.jsonl (one line per logged
step), losses.png (its curves), tensorboard/, samples/step_XXXXXXX.png (LQ | restored | GT rows)
and config.json. Running again with the same workdir continues from the latest checkpoint:
same parameters, optimiser states, random keys and data position, so the continued run equals
an uninterrupted one. A SIGTERM or Ctrl-C saves a checkpoint at the current step before exiting.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
from PIL import Image
from tqdm import tqdm

from dod_jax import checkpoints as ckpt
from dod_jax import methods, parallel
from dod_jax.data import layouts
from dod_jax.data.demo import write_demo_set
from dod_jax.data.pipeline import (STAGE1_RATIO, STAGE2_RATIO, TrainBatches, parse_ratio, ratio_text,
                                   sources_from_pairs)
from dod_jax.errors import ConfigError
from dod_jax.files import same_base
from dod_jax.image_ops import to_uint8
from dod_jax.methods import TrainingSteps
from dod_jax.training.plots import plot_losses, read_log


def task_ratio(config) -> dict[str, int]:
    stage = config.train.stage
    text = config.data[f"{stage}_ratio"]
    if not text:
        return dict(STAGE1_RATIO if stage == "stage1" else STAGE2_RATIO)
    return parse_ratio(text, f"data.{stage}_ratio")


def fitted_units(units: int, ratio: dict[str, int], processes: int, devices: int, micro_batches: int = 1,
                 scale: bool = True) -> int:
    """train.units, or with `scale` its smallest multiple whose global batch (units x the
    ratio's crops x processes) splits into the micro-batches and each of them evenly over the
    mesh's devices (a 7-crop batch cannot run on 8 devices as it is)."""
    crops = units * sum(ratio.values()) * processes
    need = devices * micro_batches
    factor = need // math.gcd(crops, need)
    if factor > 1 and not scale:
        raise ConfigError(f"a global batch of {units} x {sum(ratio.values())} crops ({ratio_text(ratio)}) x {processes} "
                          f"process(es) = {crops} does not split into {micro_batches} micro-batch(es) over "
                          f"{devices} devices: set train.units to a multiple of {units * factor}, change the task "
                          "ratio or parallel.devices, or let train.scale_batch raise it")
    return units * factor


def data_sources(config, workdir: Path, split: str = "train") -> dict[str, Any]:
    if config.data.tfds_dir:
        from dod_jax.data.tfds_builder import task_sources
        return task_sources(config.data.layout, config.data.tfds_dir, split)
    root, layout = config.data.root, config.data.layout
    if root == "demo":
        root, layout = demo_root(workdir), "aio5"
    if not root:
        raise ConfigError("config.data needs root (a data folder, or 'demo') or tfds_dir")
    return sources_from_pairs(layouts.checked_pairs(root, layout, split))


def demo_root(workdir: Path) -> Path:
    """The built-in demo set, written once next to the run (shared by a run's stages)."""
    root = workdir.parent / "demo_data"
    if not (root / "Train").is_dir():
        if jax.process_index() == 0:
            write_demo_set(root)
        _barrier("demo_data")
    return root


def _barrier(name: str):
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


# ---------------------------------------------------------------------------- the step

@dataclasses.dataclass
class CompiledStep:
    step: Callable                 # (state, frozen, batch) -> (state, metrics, restored)
    state_shardings: Any
    frozen_shardings: Any


def compile_step(steps: TrainingSteps, state, frozen, mesh, rules=None, shard_frozen=False) -> CompiledStep:
    """steps.train_step under jax.jit on `mesh`, the batch split over ('data', 'fsdp'), the
    trained state donated, every layer's output split by sample (models.layers.batch_sharded).
    Replicated, or with shard_frozen FSDP: the frozen networks (the method's base, its loss
    networks) and the large trained tensors (parameters and optimiser states: ZeRO) split by
    `rules` and parallel.spec_for's fallback; large tensors no dimension lets it cut are named
    in a log line."""
    sharded = rules if shard_frozen else None
    # ZeRO for the large trained tensors only: splitting a LoRA matrix saves nothing worth its gathers
    state_sh = parallel.tree_shardings(state, mesh, sharded, min_size=parallel.MIN_SHARDED)
    frozen_sh = parallel.tree_shardings(frozen, mesh, sharded)
    if sharded is not None:
        whole = parallel.kept_whole(frozen, frozen_sh) + parallel.kept_whole(state, state_sh)
        if whole:
            tqdm.write(f"fsdp: {len(whole)} large tensors kept whole (no dimension divisible by "
                       f"fsdp={mesh.shape['fsdp']}): " + ", ".join(f"{p} {s}" for p, s in whole[:5])
                       + (" ..." if len(whole) > 5 else ""))
    batch_sh = parallel.batch_sharding(mesh)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def train_step(state, frozen, batch):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):  # layers keep activations split by sample
            return steps.train_step(state, frozen, batch)

    step = jax.jit(train_step, in_shardings=(state_sh, frozen_sh, batch_sh),
                   out_shardings=(state_sh, replicated, batch_sh), donate_argnums=(0,))
    return CompiledStep(step, state_sh, frozen_sh)


def place(tree, shardings):
    """Global arrays of `tree` laid out by `shardings` (each process holds the same values);
    each array comes to the host once, not once per device."""
    def one(x, sharding):
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
    return jax.tree.map(one, tree, shardings)


# ------------------------------------------------------------------------------- the run

def run(config, workdir, *, stop_at: int | None = None) -> dict:
    """Train `config.train.stage` in `workdir` up to train.steps (or stop_at, for tests and
    staged runs), continuing from the latest checkpoint there. Returns a summary."""
    parallel.initialize_distributed(config.parallel.coordinator, config.parallel.num_processes,
                                    config.parallel.process_id)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    lead = jax.process_index() == 0
    tc = config.train
    devices = jax.devices()[:config.parallel.devices] if config.parallel.devices else jax.devices()
    mesh = parallel.make_mesh(config.parallel.data, config.parallel.fsdp, devices)

    method = methods.of(config)
    if tc.stage not in method.stages:
        raise ConfigError(f"train.stage must be one of {method.stages} for method {method.name}, got {tc.stage!r}")
    identity = method.base_identity(config)
    steps, state, frozen = method.training(config)
    compiled = compile_step(steps, state, frozen, mesh, parallel.rules_dict(config.parallel.rules),
                            config.parallel.shard_frozen)
    frozen = place(frozen, compiled.frozen_shardings)

    ratio = task_ratio(config)
    units = fitted_units(tc.units, ratio, jax.process_count(), mesh.size, tc.micro_batches, tc.scale_batch)
    if units != tc.units and lead:
        tqdm.write(f"batch: {tc.units} x {sum(ratio.values())} crops ({ratio_text(ratio)}) x {jax.process_count()} "
                   f"process(es) does not split into {tc.micro_batches} micro-batch(es) over {mesh.size} devices; "
                   f"train.units {tc.units} -> {units}: {units * sum(ratio.values()) * jax.process_count()} crops a step")
    batches = TrainBatches(data_sources(config, workdir), ratio, crop=tc.crop, units=units,
                           seed=tc.seed, process_index=jax.process_index(), process_count=jax.process_count())
    iterator = batches.iterator(tc.steps)
    checkpoints = ckpt.Checkpoints(workdir / "checkpoints", tc.keep)
    meta = {"stage": tc.stage, "config": json.loads(config.to_json()), "base": identity, "mesh": dict(mesh.shape)}
    start = checkpoints.latest_step() or 0
    if start:
        saved = checkpoints.meta(start)
        if saved["stage"] != tc.stage or not same_base(saved["base"], identity):
            raise ckpt.CheckpointError(f"{checkpoints.directory} step {start} belongs to a {saved['stage']} run on "
                                       f"base {saved['base']}, not this {tc.stage} run on {identity}")
        abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                state, compiled.state_shardings)
        state, data_state = checkpoints.restore(start, abstract)
        iterator.set_state(data_state)
    else:
        state = place(state, compiled.state_shardings)
    if lead:
        (workdir / "config.json").write_text(config.to_json(indent=2))

    end = min(tc.steps, stop_at) if stop_at is not None else tc.steps
    logger = RunLogger(workdir, lead, batches.tasks)
    stop = StopSignal()
    metrics, losses, step = {}, [], start
    progress = tqdm(range(start, end), initial=start, total=end, desc=f"{tc.stage} [compiling the step]",
                    disable=not lead, dynamic_ncols=True)
    try:
        for step in progress:
            local = next(iterator)
            batch = parallel.global_batch({k: local[k] for k in ("lq", "gt", "task")}, mesh)
            state, metrics, restored = compiled.step(state, frozen, batch)
            if step == start:  # the first call compiled the step: say so once it has run
                jax.block_until_ready(metrics)
                progress.set_description(tc.stage)
            done = step + 1
            if done % tc.log_every == 0 or done == end:
                values = {k: float(v) for k, v in jax.device_get(metrics).items()}
                losses.append(values["loss"])
                progress.set_postfix({k: f"{v:.4g}" for k, v in values.items() if k in ("loss", "mse", "dmd", "ssim")})
                logger.scalars(done, values)
            if done % tc.sample_every == 0 or done == end:
                logger.samples(done, local, restored)
            if done % tc.checkpoint_every == 0 or done == end or stop.requested:
                save(checkpoints, done, state, steps, frozen, iterator, meta, metrics)
            if stop.requested:
                break
    finally:
        stop.restore()
        checkpoints.wait()
        checkpoints.close()
        logger.close()
    return {"stage": tc.stage, "start": start, "step": int(state.step), "batch": batches.batch_size * jax.process_count(),
            "losses": losses, **steps.counters(state), "workdir": str(workdir), "interrupted": stop.requested}


def save(checkpoints, step, state, steps: TrainingSteps, frozen, iterator, meta, metrics):
    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
    checkpoints.save(step, state, steps.trained_params(state, frozen), iterator.get_state(), meta, values)


class StopSignal:
    """SIGTERM / Ctrl-C set a flag; the loop saves a checkpoint and stops at the step's end."""

    def __init__(self):
        self.requested = False
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame):
        if self.requested:  # a second signal: stop now
            raise KeyboardInterrupt
        self.requested = True
        tqdm.write(f"signal {signum}: saving a checkpoint after this step")

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


class RunLogger:
    """log.jsonl, TensorBoard scalars and images, sample sheets; process 0 only."""

    def __init__(self, workdir: Path, lead: bool, tasks: tuple[str, ...]):
        self.workdir, self.lead, self.tasks = workdir, lead, tasks
        self.writer = None
        if lead:
            from tensorboardX import SummaryWriter
            self.writer = SummaryWriter(str(workdir / "tensorboard"))
            (workdir / "samples").mkdir(exist_ok=True)
        self.started = time.time()

    def scalars(self, step: int, values: dict[str, float]):
        if not self.lead:
            return
        record = dict(step=step, time=round(time.time() - self.started, 2), **values)
        with open(self.workdir / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        for k, v in values.items():
            self.writer.add_scalar(f"train/{k}", v, step)
        if not np.isfinite(values.get("loss", 0.0)):
            tqdm.write(f"step {step}: non-finite loss {values['loss']}; the update was skipped "
                       f"({int(values.get('skipped', 0))} skipped so far)")

    def samples(self, step: int, local: dict, restored):
        """LQ | restored | GT rows for the first sample of each task of process 0's rows (a
        collective: every process calls it)."""
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            restored = multihost_utils.process_allgather(restored, tiled=True)
        if not self.lead:
            return
        rows_restored = np.asarray(restored)[:len(local["lq"])]
        firsts = [int(np.argmax(local["task"] == t)) for t in range(len(self.tasks)) if (local["task"] == t).any()]
        rows = [np.concatenate([local["lq"][i], rows_restored[i], local["gt"][i]], axis=1) for i in firsts]
        sheet = to_uint8(np.concatenate(rows, axis=0))
        Image.fromarray(sheet).save(self.workdir / "samples" / f"step_{step:07d}.png")
        self.writer.add_image("samples/lq_restored_gt", sheet, step, dataformats="HWC")

    def close(self):
        """Flush TensorBoard and draw the run's loss curves (losses.png)."""
        if self.writer is not None:
            self.writer.close()
        records = read_log(self.workdir / "log.jsonl") if self.lead else []
        if records:
            plot_losses({self.workdir.name: records}, self.workdir / "losses.png")
