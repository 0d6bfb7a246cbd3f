"""LoRA / CLoRA against an independent NumPy statement of their formulas, injection by target
names, several sets on one base, per-image merging."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dod_jax import adapters
from dod_jax.models.layers import Conv2d, Linear, NumpyRngs


class TwoLayers(nnx.Module):
    def __init__(self, rngs):
        self.proj = Linear(6, 5, use_bias=False, rngs=rngs)
        self.block = nnx.List([Conv2d(5, 7, 3, stride=2, rngs=rngs)])


def randomise_b(model, name, seed):
    # B starts at zero; give it values so the branch shows in the outputs.
    rng = np.random.default_rng(seed)
    for _, _, lora in adapters.adapted(model, name):
        b = lora.lora_B.kernel
        b.set_value(jnp.asarray(rng.standard_normal(b.shape), jnp.float32))


def numpy_conv(x, kernel, stride, pad):
    b, h, w, _ = x.shape
    kh = kernel.shape[0]
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    oh, ow = (h + 2 * pad - kh) // stride + 1, (w + 2 * pad - kh) // stride + 1
    out = np.zeros((b, oh, ow, kernel.shape[-1]))
    for i in range(oh):
        for j in range(ow):
            patch = xp[:, i * stride:i * stride + kh, j * stride:j * stride + kh]
            out[:, i, j] = np.einsum("bhwi,hwio->bo", patch, kernel)
    return out


def test_conditional_lora_follows_its_formula():
    rngs = NumpyRngs(0)
    model = TwoLayers(rngs)
    spec = adapters.AdapterSpec("gen", ("proj", "block.0"), rank=3, alpha=6.0, film_key=lambda p: 0 if p == "proj" else 1)
    assert sorted(adapters.inject(model, spec, rngs)) == ["block.0", "proj"]
    randomise_b(model, "gen", 1)
    rng = np.random.default_rng(2)
    x_lin, x_conv = rng.standard_normal((2, 4, 6)), rng.standard_normal((2, 9, 9, 5))
    film = rng.standard_normal((2, 2, 6))  # (keys, images, 2r)

    with adapters.select("gen", jnp.asarray(film, jnp.float32)):
        got_lin = np.asarray(model.proj(jnp.asarray(x_lin, jnp.float32)))
        got_conv = np.asarray(model.block[0](jnp.asarray(x_conv, jnp.float32)))

    p = {k: np.asarray(v[...], np.float64) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    gamma, beta = 1 + film[..., :3], film[..., 3:]
    lin = x_lin @ p[("proj", "kernel")]
    a = x_lin @ p[("proj", "adapters", "gen", "lora_A", "kernel")]
    lin += 2.0 * ((a * gamma[0][:, None] + beta[0][:, None]) @ p[("proj", "adapters", "gen", "lora_B", "kernel")])
    np.testing.assert_allclose(got_lin, lin, atol=1e-5)

    base = ("block", 0)
    conv = numpy_conv(x_conv, p[base + ("kernel",)], 2, 1) + p[base + ("bias",)]
    a = numpy_conv(x_conv, p[base + ("adapters", "gen", "lora_A", "kernel")], 2, 1)
    a = a * gamma[1][:, None, None] + beta[1][:, None, None]
    conv += 2.0 * numpy_conv(a, p[base + ("adapters", "gen", "lora_B", "kernel")], 1, 0)
    np.testing.assert_allclose(got_conv, conv, atol=1e-5)


def test_unselected_sets_leave_the_base_model_and_sets_are_independent():
    rngs = NumpyRngs(0)
    model = TwoLayers(rngs)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 8, 8, 5)), jnp.float32)
    base = np.asarray(model.block[0](x))
    adapters.inject(model, adapters.AdapterSpec("gen", ("0",), rank=2), rngs)
    adapters.inject(model, adapters.AdapterSpec("fake", ("block.0",), rank=4), rngs)
    randomise_b(model, "gen", 1)
    randomise_b(model, "fake", 2)
    np.testing.assert_array_equal(np.asarray(model.block[0](x)), base)
    with adapters.select("gen"):
        gen = np.asarray(model.block[0](x))
    with adapters.select("fake"):
        fake = np.asarray(model.block[0](x))
    assert np.abs(gen - base).max() > 1e-3 and np.abs(fake - base).max() > 1e-3 and np.abs(gen - fake).max() > 1e-3
    # One copy of the base kernel; each set has its own rank.
    kernels = [p for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param)) if p[-1] == "kernel"]
    assert ("block", 0, "kernel") in kernels
    assert model.block[0].adapters["gen"].rank == 2 and model.block[0].adapters["fake"].rank == 4


def test_targets_that_match_nothing_are_an_error():
    model = TwoLayers(NumpyRngs(0))
    with pytest.raises(ValueError, match=r"\['to_qq'\] match no Linear or Conv2d"):
        adapters.inject(model, adapters.AdapterSpec("gen", ("proj", "to_qq")), NumpyRngs(1))
    adapters.inject(model, adapters.AdapterSpec("gen", ("proj",)), NumpyRngs(1))
    with pytest.raises(ValueError, match="already carries"):
        adapters.inject(model, adapters.AdapterSpec("gen", ("proj",)), NumpyRngs(1))


def test_conditional_set_needs_its_film():
    model = TwoLayers(NumpyRngs(0))
    adapters.inject(model, adapters.AdapterSpec("gen", ("proj",), film_key=lambda p: 0), NumpyRngs(1))
    with adapters.select("gen"), pytest.raises(ValueError, match="conditional"):
        model.proj(jnp.ones((1, 6)))


@pytest.mark.parametrize("literal_gamma", [False, True])
def test_merged_conditional_lora_equals_unmerged_for_one_image(literal_gamma):
    rngs = NumpyRngs(0)
    model = TwoLayers(rngs)
    adapters.inject(model, adapters.AdapterSpec("gen", ("proj", "block.0"), rank=3, film_key=lambda p: 0,
                                                literal_gamma=literal_gamma), rngs)
    randomise_b(model, "gen", 1)
    rng = np.random.default_rng(3)
    film = jnp.asarray(rng.standard_normal((1, 1, 6)), jnp.float32)
    x_lin = jnp.asarray(rng.standard_normal((1, 4, 6)), jnp.float32)
    x_conv = jnp.asarray(rng.standard_normal((1, 9, 9, 5)), jnp.float32)
    with adapters.select("gen", film):
        want = np.asarray(model.proj(x_lin)), np.asarray(model.block[0](x_conv))
    assert adapters.merge(model, "gen", film) == 2
    assert list(adapters.adapted(model, "gen")) == []
    with adapters.select("gen", film):  # nothing left to select
        got = np.asarray(model.proj(x_lin)), np.asarray(model.block[0](x_conv))
    np.testing.assert_allclose(got[0], want[0], atol=1e-5)  # proj had no bias: merging added one for beta
    np.testing.assert_allclose(got[1], want[1], atol=1e-5)


def test_plain_lora_merges_and_conditional_merge_refuses_a_batch():
    rngs = NumpyRngs(0)
    model = TwoLayers(rngs)
    adapters.inject(model, adapters.AdapterSpec("fake", ("block.0",)), rngs)
    randomise_b(model, "fake", 1)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 8, 8, 5)), jnp.float32)
    with adapters.select("fake"):
        want = np.asarray(model.block[0](x))
    adapters.merge(model, "fake")
    np.testing.assert_allclose(np.asarray(model.block[0](x)), want, atol=1e-5)

    adapters.inject(model, adapters.AdapterSpec("gen", ("proj",), film_key=lambda p: 0), rngs)
    with pytest.raises(ValueError, match="one image at a time"):
        adapters.merge(model, "gen", jnp.zeros((1, 2, 16)))


def test_selection_inside_jit_and_gradients_reach_only_the_selected_set():
    rngs = NumpyRngs(0)
    model = TwoLayers(rngs)
    adapters.inject(model, adapters.AdapterSpec("gen", ("proj",), film_key=lambda p: 0), rngs)
    adapters.inject(model, adapters.AdapterSpec("fake", ("proj",)), rngs)
    randomise_b(model, "gen", 1)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    x = jnp.ones((2, 4, 6))
    film = jnp.asarray(np.random.default_rng(0).standard_normal((1, 2, 16)), jnp.float32)

    @jax.jit
    def loss(params):
        m = nnx.merge(graphdef, params, rest)
        with adapters.select("gen", film):
            return jnp.sum(m.proj(x) ** 2)

    grads = dict(nnx.to_flat_state(jax.grad(loss)(params)))
    for path, g in grads.items():
        nonzero = bool(jnp.any(g[...] != 0))
        assert nonzero == ("gen" in path or path == ("proj", "kernel")), path


def test_a_trained_copy_replaces_its_layer_only_while_selected_and_merges_exactly():
    model = TwoLayers(NumpyRngs(0))
    conv = model.block[0]
    adapters.add_trained_copy(model, "block.0", "gen", NumpyRngs(1))
    adapters.inject(model, adapters.AdapterSpec("fake", ("block.0",), rank=2), NumpyRngs(2))
    randomise_b(model, "fake", 3)
    x = jnp.asarray(np.random.default_rng(4).standard_normal((2, 9, 9, 5)), jnp.float32)
    base = np.asarray(conv(x))
    with adapters.select("gen"):
        np.testing.assert_array_equal(np.asarray(conv(x)), base)  # starts as the frozen layer
    copy = conv.adapters["gen"].copy
    rng = np.random.default_rng(5)
    copy.kernel.set_value(jnp.asarray(rng.standard_normal(copy.kernel.shape), jnp.float32))
    copy.bias.set_value(jnp.asarray(rng.standard_normal(copy.bias.shape), jnp.float32))
    expected = numpy_conv(np.asarray(x, np.float64), np.asarray(copy.kernel[...], np.float64), 2, 1) + np.asarray(copy.bias[...])
    with adapters.select("gen"):
        replaced = np.asarray(conv(x))
    np.testing.assert_allclose(replaced, expected, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(conv(x)), base)  # unselected: W0, b0 untouched
    with adapters.select("fake"):
        assert np.abs(np.asarray(conv(x)) - base).max() > 1e-3  # another set adds to W0, not to the copy
    assert adapters.merge(model, "gen") == 1
    np.testing.assert_array_equal(np.asarray(conv.kernel[...]), np.asarray(copy.kernel[...]))
    np.testing.assert_array_equal(np.asarray(conv(x)), replaced)


# ------------------------------------------------------------------------- routed experts

def experts_model(experts=3, rank=2, seed=0):
    """TwoLayers with routed experts on both layers (alpha 2r: scale 2, as LoRA-IR), B random."""
    model = TwoLayers(NumpyRngs(seed))
    adapters.inject(model, adapters.AdapterSpec("mix", ("proj", "block.0"), rank=rank, alpha=2.0 * rank,
                                                experts=experts), NumpyRngs(seed + 1))
    rng = np.random.default_rng(seed + 2)
    for _, _, mix in adapters.adapted(model, "mix"):
        mix.lora_B.set_value(jnp.asarray(rng.standard_normal(mix.lora_B.shape) * 0.3, jnp.float32))
    return model


def torch_layout_update(mix, expert) -> np.ndarray:
    """Expert `expert`'s update as loralib writes it: (B @ A).view(weight shape) * alpha / r,
    in PyTorch's (out, in[, k, k]) layout."""
    a, b = np.asarray(mix.lora_A[...], np.float64)[expert], np.asarray(mix.lora_B[...], np.float64)[expert]
    shape = (mix.cout, mix.cin) + ((mix.kernel_size,) * 2 if not mix.linear else ())
    return (b @ a).reshape(shape) * mix.scale


def test_top_k_routing_is_a_softmax_over_the_chosen_experts():
    logits = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    for k in (1, 2):
        got = np.asarray(adapters.top_k_routing(jnp.asarray(logits), k))
        expected = np.zeros_like(logits, np.float64)
        for row, values in enumerate(logits.astype(np.float64)):
            chosen = np.argsort(values)[::-1][:k]
            expected[row, chosen] = np.exp(values[chosen]) / np.exp(values[chosen]).sum()
        np.testing.assert_allclose(got, expected, atol=1e-6)
    assert set(np.asarray(adapters.top_k_routing(jnp.asarray(logits), 1)).ravel()) == {0.0, 1.0}


def test_an_image_routed_to_one_expert_gets_exactly_that_experts_update():
    """Each image of a batch routed to a different expert: the layer's output less the base
    output is that expert's loralib-layout update applied to the image (a NumPy convolution with
    the PyTorch-layout weight, transposed independently); unselected, the layer is the base."""
    model = experts_model()
    x = np.random.default_rng(3).standard_normal((3, 9, 9, 5)).astype(np.float32)
    conv = model.block[0]
    base = np.asarray(conv(jnp.asarray(x)))
    routing = jnp.eye(3, dtype=jnp.float32)[jnp.array([2, 0, 1])]
    with adapters.select("mix", routing=routing):
        routed = np.asarray(conv(jnp.asarray(x)))
    _, _, mix = next((p, l, a) for p, l, a in adapters.adapted(model, "mix") if p == "block.0")
    for image, expert in enumerate((2, 0, 1)):
        kernel = torch_layout_update(mix, expert).transpose(2, 3, 1, 0)  # (out, in, k, k) -> HWIO
        update = numpy_conv(x[image:image + 1].astype(np.float64), kernel, conv.stride, conv.padding)[0]
        assert np.abs(update).max() > 0.1
        np.testing.assert_allclose(routed[image] - base[image], update, atol=2e-5)
    # two experts per image (a batch mixes the experts' outputs): the weighted sum of both updates
    soft = adapters.top_k_routing(jnp.asarray(np.random.default_rng(6).standard_normal((3, 3)), jnp.float32), 2)
    with adapters.select("mix", routing=soft):
        mixed = np.asarray(conv(jnp.asarray(x)))
    for image, weights in enumerate(np.asarray(soft, np.float64)):
        kernel = sum(w * torch_layout_update(mix, e) for e, w in enumerate(weights)).transpose(2, 3, 1, 0)
        update = numpy_conv(x[image:image + 1].astype(np.float64), kernel, conv.stride, conv.padding)[0]
        np.testing.assert_allclose(mixed[image] - base[image], update, atol=2e-5)
    proj = model.proj
    _, _, linear_mix = next((p, l, a) for p, l, a in adapters.adapted(model, "mix") if p == "proj")
    tokens = np.random.default_rng(4).standard_normal((3, 4, 6)).astype(np.float32)
    with adapters.select("mix", routing=routing):
        got = np.asarray(proj(jnp.asarray(tokens)))
    base_tokens = np.asarray(proj(jnp.asarray(tokens)))
    for image, expert in enumerate((2, 0, 1)):
        expected = tokens[image].astype(np.float64) @ torch_layout_update(linear_mix, expert).T
        np.testing.assert_allclose(got[image] - base_tokens[image], expected, atol=2e-5)
    with pytest.raises(ValueError, match="routing weights"):
        with adapters.select("mix"):
            conv(jnp.asarray(x))


def test_merged_experts_equal_the_routed_layer_for_one_image():
    model = experts_model()
    x = jnp.asarray(np.random.default_rng(5).standard_normal((1, 9, 9, 6)).astype(np.float32))
    routing = adapters.top_k_routing(jnp.asarray([[0.3, 1.2, 0.9]]), 2)
    forward = lambda m, x: m.block[0](m.proj(x))
    with adapters.select("mix", routing=routing):
        routed = np.asarray(forward(model, x))
    with pytest.raises(ValueError, match="one image at a time"):
        adapters.merge(experts_model(), "mix", routing=jnp.ones((2, 3)) / 3)
    assert adapters.merge(model, "mix", routing=routing) == 2
    assert not list(adapters.adapted(model, "mix"))
    np.testing.assert_allclose(np.asarray(forward(model, x)), routed, atol=1e-5)
