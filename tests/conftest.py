"""Shared helpers: reference models from diffusers (PyTorch, CPU) with random weights,
written with save_pretrained() into temporary folders, and layout conversions."""

from __future__ import annotations

import ctypes
import gc
import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The suite runs on the CPU. The tpu-aot extra's libtpu (for compiling for TPU slices, which
# works under this setting) would otherwise probe for TPU hardware in every process and log errors.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Eight virtual CPU devices for the sharding tests (set before JAX starts); computations not
# placed on a mesh run on the first device as before.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

ROOT = Path(__file__).resolve().parent.parent


def sd21_config():
    from dod_jax.configs import load_config
    return load_config(ROOT / "configs" / "sd21_base.py")


def tiny_config():
    from dod_jax.configs import load_config
    return load_config(ROOT / "configs" / "tiny.py")


def sd1_style_tiny_unet() -> dict:
    """SD 1.x traits: 1x1-conv projections, one integer head count, 2 transformer layers in
    one level, non-default freq shift / scale factors, no flip."""
    cfg = tiny_config().unet.to_dict()
    cfg.update({"use_linear_projection": False, "attention_head_dim": 4, "transformer_layers_per_block": [1, 2, 1],
                "flip_sin_to_cos": False, "freq_shift": 1, "mid_block_scale_factor": 2.0,
                "cross_attention_dim": 48, "layers_per_block": 1})
    return cfg


def nchw(x):
    import torch
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x, np.float32).transpose(0, 3, 1, 2)))


def nhwc(t):
    return t.detach().numpy().transpose(0, 2, 3, 1)


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
    """One persistent compilation cache per test session: runs that compile the same step
    (a resumed run, the demo's subprocess) load it instead of compiling again."""
    import jax
    directory = str(tmp_path_factory.mktemp("jax_cache"))
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 2.0)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = directory  # for subprocesses
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "2"
    return directory


@pytest.fixture(scope="module", autouse=True)
def release_compiled_functions():
    """After each test file, drop JAX's in-memory executables and traced functions: a worker
    otherwise keeps every file's compiled steps (6-9 GB by the suite's end), and the full-size
    tests on top of that ran the 23 GiB machine out of memory. Files that compile the same
    function again load it from the persistent cache."""
    yield
    import jax
    jax.clear_caches()
    gc.collect()
    try:  # hand freed heap pages back to the system (glibc keeps them otherwise)
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


@pytest.fixture
def rng():
    return np.random.default_rng(0)



def micro_config():
    from dod_jax.configs import load_config
    return load_config(ROOT / "configs" / "micro.py")

