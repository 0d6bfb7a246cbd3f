"""The XLA options dod-jax sets, and the computation an experimental one got wrong.

Under `--xla_cpu_experimental_ynn_fusion_type=dot` (jax 0.10.2) XLA:CPU computes `x @ (A @ B)`
wrongly at some shapes (relative error about 1.5 at 64 tokens of width 1280 or 320, rank 8),
which is merged CLoRA's pattern; dod-jax set that option on import until it was found. Here:
the package sets no experimental option unless asked; the pattern is right at those shapes in the
suite's process (the package's defaults), layer by layer with the fold in the forward's jit;
merged CLoRA equals unmerged on a whole DOD at SD 2.1's widths with the fold compiled apart from
the forward (what dod-jax does), by default and under the opt-in too."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import ROOT
from dod_jax import YNN_DOT, adapters
from dod_jax.models.layers import Conv2d, Linear, NumpyRngs
from merge_check import restorations, widened_dod

# (tokens, width, rank): the opt-in fails at the first four (measured 1.49, 1.29, 1.17, 1.35)
# and gets the last two right.
PATTERN_SHAPES = [(64, 1280, 8), (64, 320, 8), (64, 1280, 4), (64, 1280, 16), (256, 320, 8), (64, 640, 8)]
# Merged against unmerged restorations on the widened DOD (tests/merge_check.py), relative to
# their largest value: measured 6.8e-6 / 1.0e-5 (64 / 256 pixels) by default, 5.9e-6 / 7.4e-6
# under the opt-in with the fold compiled apart, 0.87 / 0.43 under the opt-in with the fold in
# the forward's jit (no longer run: the layer tests above hold that pattern by default). Float32 rounding differs between W0 x + B(A x) and (W0 + BA) x in each of
# ~60 adapted layers, and x0 multiplies eps's by 14.6.
WHOLE_MODEL_TOLERANCE = 2e-5


def package_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "DOD_JAX_CPU_FLAGS")}
    return {**env, **extra}


def options_set_on_import(env) -> subprocess.CompletedProcess:
    code = "import os, dod_jax; print(os.environ.get('XLA_FLAGS', ''))"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env)


def test_importing_dod_jax_sets_no_experimental_xla_option_unless_asked():
    default = options_set_on_import(package_env())
    assert default.returncode == 0, default.stderr
    added = default.stdout.split()
    assert not [o for o in added if "experimental" in o], f"dod_jax sets {added} on import"

    opted_in = options_set_on_import(package_env(DOD_JAX_CPU_FLAGS="ynn_dot"))
    assert opted_in.returncode == 0 and opted_in.stdout.split() == [YNN_DOT], opted_in

    unknown = options_set_on_import(package_env(DOD_JAX_CPU_FLAGS="1"))
    assert unknown.returncode != 0 and "Traceback" not in unknown.stderr
    assert unknown.stderr.strip().splitlines() == [
        "DOD_JAX_CPU_FLAGS='1': not an opt-in (those are ['ynn_dot']; unset it for XLA's defaults)"]


@pytest.mark.parametrize("tokens,width,rank", PATTERN_SHAPES)
def test_a_dot_feeding_another_dots_weight_is_right(tokens, width, rank):
    rng = np.random.default_rng(0)
    x, a, b = (rng.standard_normal(s).astype(np.float32) for s in ((tokens, width), (width, rank), (rank, width)))
    want = x.astype(np.float64) @ (a.astype(np.float64) @ b)
    got = np.asarray(jax.jit(lambda x, a, b: x @ (a @ b))(x, a, b), np.float64)
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-5


class OneLayer(nnx.Module):
    def __init__(self, layer):
        self.layer = layer


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("tokens,width", [(64, 320), (64, 640), (64, 1280), (256, 320), (256, 640), (256, 1280)])
def test_merged_clora_layers_equal_unmerged_at_sd21_widths(kind, tokens, width):
    """A Linear, or a 3x3 Conv2d, of `width` channels with CLoRA (rank 8; B, gamma and beta off
    their initial values), folded in the same compiled function as its forward: the pattern that
    broke."""
    rngs, rng = NumpyRngs(0), np.random.default_rng(1)
    side = int(np.sqrt(tokens))
    layer, shape = ((Linear(width, width, rngs=rngs), (1, tokens, width)) if kind == "linear"
                    else (Conv2d(width, width, 3, rngs=rngs), (1, side, side, width)))
    model = OneLayer(layer)
    adapters.inject(model, adapters.AdapterSpec("gen", ("layer",), film_key=lambda _: 0), rngs)
    b = layer.adapters["gen"].lora_B.kernel
    b.set_value(jnp.asarray(rng.standard_normal(b.shape) * 0.1, jnp.float32))
    film = jnp.asarray(rng.standard_normal((1, 1, 16)), jnp.float32)
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    graphdef, state = nnx.split(model)

    @jax.jit
    def unmerged_and_merged(state, x):
        m = nnx.merge(graphdef, state)
        with adapters.select("gen", film):
            unmerged = m.layer(x)
        assert adapters.merge(m, "gen", film) == 1
        return unmerged, m.layer(x)

    unmerged, merged = (np.asarray(a, np.float64) for a in unmerged_and_merged(state, x))
    assert np.abs(merged - unmerged).max() / np.abs(unmerged).max() < 1e-5


@pytest.fixture(scope="module")
def by_default():
    """merge_check's errors and unmerged restorations in this process (the package's defaults)."""
    return restorations(widened_dod())


def check_errors(errors: dict):
    for size, e in errors.items():
        assert e["film_spread"] > 0.05, errors  # the two images are modulated apart
        assert e["merged"] < WHOLE_MODEL_TOLERANCE, (size, errors)


def test_merged_clora_equals_unmerged_at_sd21_widths(by_default):
    errors, _ = by_default
    print(errors)
    check_errors(errors)


def test_restore_under_the_ynn_opt_in_equals_the_default(by_default, tmp_path):
    """Under the opt-in the fold is wrong when it shares the forward's jit (an XLA bug); dod-jax
    compiles it apart, and that is right; and the unmerged restorations equal the default
    process's."""
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "merge_check.py"), str(tmp_path / "ynn.npz")],
                            capture_output=True, text=True, cwd=ROOT, env=package_env(DOD_JAX_CPU_FLAGS="ynn_dot"),
                            timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    errors = json.loads(result.stdout.strip().splitlines()[-1])
    print(errors)
    check_errors(errors)
    opted_in = np.load(tmp_path / "ynn.npz")
    for size, default in by_default[1].items():
        ynn = opted_in[str(size)]
        assert np.abs(ynn - default).max() / np.abs(default).max() < WHOLE_MODEL_TOLERANCE, size
