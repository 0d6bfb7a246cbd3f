"""LoRA-IR's IR network (dod_jax.models.nafnet with routed experts from dod_jax.adapters) against
a PyTorch re-statement written from LORA_IR.md (tests/lorair_reference.py): the same random,
non-trivial weights, saved under the authors' names and read by dod_jax's converter."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dod_jax import adapters
from dod_jax.methods.lorair.official import EXPERTS, our_name, read_ir
from dod_jax.models.layers import NumpyRngs
from dod_jax.models.nafnet import NAFNetDAM
from dod_jax.weights.diffusers import WeightsError

torch = pytest.importorskip("torch")
from lorair_reference import LoRAIRNet, randomise  # noqa: E402  (needs torch)

TINY = dict(width=16, enc=(1, 1, 1, 2), middle=1, dec=(1, 1, 1, 1), embed=24, hidden=16)
FULL = dict(width=64, enc=(1, 1, 1, 28), middle=1, dec=(1, 1, 1, 1), embed=384, hidden=128)


def ported(sizes: dict, tensors: dict, *, experts: int = 3, rank: int = 2, tlc=None) -> NAFNetDAM:
    model = NAFNetDAM(width=sizes["width"], enc_blocks=sizes["enc"], middle_blocks=sizes["middle"],
                      dec_blocks=sizes["dec"], embed_dim=sizes["embed"], dam_hidden=sizes["hidden"], tlc=tlc,
                      rngs=NumpyRngs(0))
    convs = tuple(p for p, _ in adapters.layers(model))
    adapters.inject(model, adapters.AdapterSpec(EXPERTS, convs, rank=rank, alpha=2.0 * rank, experts=experts),
                    NumpyRngs(1))
    read_ir(model, tensors, "the re-statement's state dict")
    return model


def both(sizes: dict, size: tuple[int, int], batch: int = 2, tlc=None, seed: int = 0):
    """(reference output, dod-jax output, dod-jax model, inputs) on random inputs, each image
    routed to one expert by random router logits."""
    reference = randomise(LoRAIRNet(**sizes, experts=3, rank=2, tlc=tlc), seed).eval()
    tensors = {k: v.detach().numpy() for k, v in reference.state_dict().items()}
    model = ported(sizes, tensors, tlc=tlc)
    rng = np.random.default_rng(seed + 10)
    lq = rng.uniform(0, 1, (batch, 3) + size).astype(np.float32)
    embedding = rng.standard_normal((batch, sizes["embed"])).astype(np.float32)
    routing = np.array(adapters.top_k_routing(jnp.asarray(rng.standard_normal((batch, 3)), jnp.float32), 1))
    with torch.no_grad():
        expected = reference(torch.from_numpy(lq), torch.from_numpy(embedding), torch.from_numpy(routing)).numpy()

    @jax.jit
    def forward(lq, embedding, routing):
        with adapters.select(EXPERTS, routing=routing):
            return model(lq, embedding)

    got = np.asarray(forward(jnp.asarray(lq.transpose(0, 2, 3, 1)), jnp.asarray(embedding), jnp.asarray(routing)))
    return expected.transpose(0, 2, 3, 1), got, model, (lq, embedding, routing)


def test_the_tiny_network_equals_the_restatement_at_a_size_that_needs_padding():
    expected, got, _, _ = both(TINY, (40, 56))
    assert got.shape == expected.shape == (2, 40, 56, 3)
    assert np.abs(expected).max() > 0.5
    assert np.abs(got - expected).max() <= 1e-4, np.abs(got - expected).max()


def test_tlc_pooling_averages_local_windows_as_the_restatement():
    """Train size 32, base size 48: at 64 x 96 every SCA's window (1.5x its training feature) is
    smaller than the feature, so the pooling is local; the outputs still agree, and they differ
    from the global pooling's."""
    expected, got, _, _ = both(TINY, (64, 96), batch=1, tlc=(32, 48))
    assert np.abs(got - expected).max() <= 1e-4, np.abs(got - expected).max()
    global_pool, _, _, _ = both(TINY, (64, 96), batch=1)
    assert np.abs(global_pool - expected).max() > 1e-3


def test_the_full_width_network_equals_the_restatement():
    """LoRA-IR's own sizes (width 64, 28 blocks in the last encoder stage, 384-d embedding)."""
    expected, got, model, _ = both(FULL, (32, 32), batch=1, seed=1)
    assert np.abs(got - expected).max() <= 1e-4 * max(1.0, np.abs(expected).max()), np.abs(got - expected).max()


def test_one_images_experts_merge_into_the_weights_and_restore_the_same():
    expected, got, model, (lq, embedding, routing) = both(TINY, (32, 48), batch=1, seed=2)
    assert adapters.merge(model, EXPERTS, routing=jnp.asarray(routing)) == len(list(adapters.layers(model)))
    merged = np.asarray(jax.jit(model)(jnp.asarray(lq.transpose(0, 2, 3, 1)), jnp.asarray(embedding)))
    np.testing.assert_allclose(merged, got, atol=1e-5 * np.abs(got).max())  # float32 rounding of the sum


def test_scanned_blocks_equal_the_loop_in_values_and_gradients():
    """The training forward scans each stage's blocks (models.nafnet.scanned): the output and
    the gradients of every parameter and of the input equal the unrolled loop's, experts routed
    per image (batch 2); blocks of different structures are refused by name."""
    _, _, model, (lq, embedding, routing) = both(TINY, (32, 48), seed=3)
    graphdef, state = nnx.split(model)
    lq = jnp.asarray(lq.transpose(0, 2, 3, 1))

    def loss(state, lq, scan):
        with adapters.select(EXPERTS, routing=jnp.asarray(routing)):
            out = nnx.merge(graphdef, state)(lq, jnp.asarray(embedding), scan=scan)
        return jnp.sum(out * jnp.cos(out)), out

    (_, looped), loop_grads = jax.jit(jax.value_and_grad(lambda *a: loss(*a, False), (0, 1), has_aux=True))(state, lq)
    (_, scanned), scan_grads = jax.jit(jax.value_and_grad(lambda *a: loss(*a, True), (0, 1), has_aux=True))(state, lq)
    np.testing.assert_allclose(scanned, looped, atol=1e-6)
    assert "while" in jax.jit(lambda s, x: loss(s, x, True)[0]).lower(state, lq).as_text()
    pairs = list(zip(jax.tree.leaves(scan_grads), jax.tree.leaves(loop_grads)))
    assert len(pairs) > 100 and all(a.shape == b.shape for a, b in pairs)
    for a, b in pairs:
        np.testing.assert_allclose(a, b, atol=1e-5 * max(1e-3, float(np.abs(b).max())))
    adapters.inject(model.encoders[3].blocks[1], adapters.AdapterSpec("other", ("conv1",), rank=1), NumpyRngs(2))
    with pytest.raises(ValueError, match="different structures"):
        model(lq, jnp.asarray(embedding), scan=True)


def test_the_converter_names_what_does_not_fit():
    reference = randomise(LoRAIRNet(**TINY, experts=3, rank=2))
    tensors = {k: v.detach().numpy() for k, v in reference.state_dict().items()}
    assert our_name("encoders.0.blocks.0.sca.1.conv.weight") == "encoders.0.blocks.0.sca.1.weight"
    assert our_name("ups.0.0.lora_B_list") == "ups.0.0.adapters.experts.lora_B"
    broken = dict(tensors, **{"extra.weight": np.zeros(3, np.float32)})
    del broken["ending.conv.bias"]
    broken["intro.conv.weight"] = tensors["intro.conv.weight"][:8]
    with pytest.raises(WeightsError) as error:
        ported(TINY, broken)
    message = str(error.value)
    assert "ending.bias" in message and "extra.weight" in message and "intro.conv.weight" in message
