"""Devices: the ('data', 'fsdp') mesh, where parameters and batches live on it, multi-host start-up.

Parameters get logical axis names from their layout (the same rule that names their
diffusers tensors): a linear kernel (in, out) is ('embed', 'mlp'), a conv kernel
(kh, kw, in, out) is (None, None, 'conv_in', 'conv_out'), a conv1d kernel (k, in, out) is
(None, 'conv_in', 'conv_out'), vectors ('vector',). The config's rules map logical names to
mesh axes (configs/dod.py: parallel.rules). The rules apply to the frozen base only when
`shard_frozen` is set (FSDP of the base); otherwise, and always for what is trained (adapters,
M_theta, conv_in, DEMs: a few million parameters), parameters are replicated. A dimension the
mesh axis does not divide stays whole. Batches are split over ('data', 'fsdp') on their first
axis.
"""

from __future__ import annotations

import os
from typing import Iterable, Mapping

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from dod_jax.errors import ConfigError

BATCH_AXES = ("data", "fsdp")
LAYOUT_AXES = {2: ("embed", "mlp"), 3: (None, "conv_in", "conv_out"), 4: (None, None, "conv_in", "conv_out")}


def initialize_distributed(coordinator: str = "", num_processes: int = 0, process_id: int = -1):
    """jax.distributed.initialize from explicit flags, or from the environment
    (DOD_COORDINATOR, DOD_NUM_PROCESSES, DOD_PROCESS_ID; or what JAX detects on TPU pods, SLURM
    and Open MPI). A single process with none of these set starts nothing."""
    coordinator = coordinator or os.environ.get("DOD_COORDINATOR", "")
    num_processes = num_processes or int(os.environ.get("DOD_NUM_PROCESSES", "0"))
    process_id = process_id if process_id >= 0 else int(os.environ.get("DOD_PROCESS_ID", "-1"))
    if coordinator:
        # CPU devices talk over gloo (accelerators use their own collectives); asking which
        # backend runs would start it, and initialize() must come first.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator, num_processes, process_id)
    elif any(k in os.environ for k in ("TPU_WORKER_HOSTNAMES", "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE")):
        jax.distributed.initialize()
    refuse_undistributed_launch()


# Variables by which launchers (torchrun and accelerate, MPICH / Intel MPI, Open MPI, SLURM, and
# dod-jax's own) tell a process how many processes they started.
LAUNCH_SIZES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "SLURM_NTASKS", "DOD_NUM_PROCESSES")


def refuse_undistributed_launch():
    """Several processes started without jax.distributed would each be process 0 of its own run,
    train alone and write the same workdir: refuse, saying what to set."""
    if jax.process_count() > 1:
        return
    for name in LAUNCH_SIZES:
        value = os.environ.get(name, "")
        if value.isdigit() and int(value) > 1:
            n = int(value)
            raise ConfigError(
                f"{name}={n}: this process is one of {n}, but jax.distributed is not initialised, so each would "
                f"train alone and write the same workdir; in every process set DOD_COORDINATOR=<host:port of "
                f"process 0>, DOD_NUM_PROCESSES={n} and DOD_PROCESS_ID=<0..{n - 1}> (or parallel.coordinator, "
                f"parallel.num_processes, parallel.process_id)")


def make_mesh(data: int = -1, fsdp: int = 1, devices=None) -> Mesh:
    """A ('data', 'fsdp') mesh over all devices; -1 for `data` takes what `fsdp` leaves."""
    devices = list(jax.devices() if devices is None else devices)
    if data == -1:
        if len(devices) % fsdp:
            raise ConfigError(f"fsdp={fsdp} does not divide the {len(devices)} devices")
        data = len(devices) // fsdp
    if data * fsdp != len(devices):
        raise ConfigError(f"mesh data={data} x fsdp={fsdp} does not cover the {len(devices)} devices")
    return Mesh(np.asarray(devices).reshape(data, fsdp), BATCH_AXES, axis_types=(AxisType.Auto, AxisType.Auto))


def logical_axes(shape: tuple, leaf: str) -> tuple:
    if leaf == "kernel" and len(shape) in LAYOUT_AXES:
        return LAYOUT_AXES[len(shape)]
    return ("vector",) + (None,) * (len(shape) - 1) if shape else ()


MIN_SHARDED = 2 ** 14  # elements: smaller tensors stay whole (their gathers cost more than they save)


def spec_for(shape: tuple, leaf: str, mesh: Mesh, rules: Mapping[str, str | None]) -> P:
    """By the rules; a tensor of at least MIN_SHARDED elements that the rules leave whole is
    split over 'fsdp' on its largest dimension the axis divides (FSDP cuts every large tensor,
    whichever its layout); one that no dimension allows stays whole (see kept_whole)."""
    axes = []
    for size, name in zip(shape, logical_axes(shape, leaf)):
        axis = rules.get(name) if name else None
        axes.append(axis if axis is not None and size % mesh.shape[axis] == 0 else None)
    n = mesh.shape["fsdp"]
    if all(a is None for a in axes) and n > 1 and int(np.prod(shape)) >= MIN_SHARDED:
        divisible = [i for i in sorted(range(len(shape)), key=lambda i: -shape[i]) if shape[i] % n == 0]
        if divisible:
            axes[divisible[0]] = "fsdp"
    return P(*axes)


def tree_shardings(tree, mesh: Mesh, rules: Mapping[str, str | None] | None = None, min_size: int = 0):
    """NamedShardings for every array of `tree` (nnx.State, optimiser states, any pytree):
    by the rules (and spec_for's FSDP fallback) when given, replicated otherwise; arrays of
    fewer than `min_size` elements replicated in any case."""
    def one(path, leaf):
        if rules is None or not hasattr(leaf, "shape") or int(np.prod(leaf.shape)) < min_size:
            return NamedSharding(mesh, P())
        name = _last_name(path)
        return NamedSharding(mesh, spec_for(tuple(leaf.shape), name, mesh, rules))
    return jax.tree_util.tree_map_with_path(one, tree)


def kept_whole(tree, shardings) -> list[tuple[str, tuple]]:
    """(path, shape) of every tensor of at least MIN_SHARDED elements that `shardings` leave
    replicated on a mesh with fsdp > 1: what sharding could not cut, for a log line."""
    found = []

    def one(path, leaf, sharding):
        if (hasattr(leaf, "shape") and int(np.prod(leaf.shape)) >= MIN_SHARDED and sharding.mesh.shape["fsdp"] > 1
                and all(a is None for a in sharding.spec)):
            found.append((jax.tree_util.keystr(path), tuple(leaf.shape)))
    jax.tree_util.tree_map_with_path(one, tree, shardings)
    return found


def _last_name(path) -> str:
    """The parameter's own name ('kernel', 'bias', ...): the last dict key of its pytree path
    (NNX Variables add a trailing `.value` attribute, which is skipped)."""
    for entry in reversed(path):
        if isinstance(getattr(entry, "key", None), str):
            return entry.key
    return ""


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Global arrays from each process's slice of the batch (its rows, in process order)."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}


def rules_dict(rules: Iterable) -> dict[str, str | None]:
    """The config's rules, a sequence of (logical name, mesh axis or None)."""
    out = {}
    for name, axis in rules:
        if axis is not None and axis not in BATCH_AXES:
            raise ConfigError(f"sharding rule {name!r} -> {axis!r}: mesh axes are {BATCH_AXES}")
        out[name] = axis
    return out
