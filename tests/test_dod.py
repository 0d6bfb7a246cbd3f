"""The assembled DOD model on the tiny config with random base weights: equivalence with the
plain SD one-step path at initialisation, the DEM hook, gradients per training stage, per-image
CLoRA merging, the ablation switches, and the parameter groups on the real SD 2.1 config."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import ROOT, tiny_config
from dod_jax import adapters
from dod_jax.configs import load_config
from dod_jax.methods.dod import GENERATOR, abstract_dod, build_dod, parameter_counts, random_base, trainable
from dod_jax.methods.dod.model import STAGE_GROUPS
from dod_jax.methods.dod.restore import merge_generator, state_arrays
from merge_check import loras, randomise_generator_b, randomise_mtheta, two_images
from sd_one_step import one_step

SIZE = 64


def tiny_dod(**dod_overrides):
    """The tiny DOD on random base weights; its latent is the posterior mode unless overridden
    (deterministic without a key)."""
    config = tiny_config()
    config.dod.update({"latent": "mode", **dod_overrides})
    base = random_base(config, seed=0)
    return build_dod(config, base, seed=0), base


def lq_batch(n=2, seed=0):
    return jnp.asarray(np.random.default_rng(seed).uniform(-1, 1, (n, SIZE, SIZE, 3)), jnp.float32)


def restore_fn(model):
    graphdef, state = nnx.split(model)
    return jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)), state


@pytest.fixture(scope="module")
def zero_w_model():
    return tiny_dod(hde={"enabled": True, "skip_init": 1e-5, "w_init": 0.0, "growth": 32})


def test_at_initialisation_dod_is_the_plain_sd_one_step_and_dems_hook_in(zero_w_model):
    model, base = zero_w_model
    lq = lq_batch()
    run, state = restore_fn(model)
    restored = np.asarray(run(state, lq))

    plain, plain_state = one_step(base.sd)  # the same UNet/VAE objects; no adapter set selected
    context = jnp.broadcast_to(jnp.asarray(base.prompt_embeddings["prompt"]), (2, 77, 64))
    expected = np.asarray(plain(plain_state, lq, context))
    assert restored.shape == (2, SIZE, SIZE, 3)
    # The two graphs fuse differently (XLA rounds per fusion), and x0 carries
    # eps's rounding times 1/sqrt(alpha_bar) = 14.6: end-to-end float32 agreement, as elsewhere.
    np.testing.assert_allclose(restored, expected, atol=1e-4)

    # w = 1 (the code's init) puts the DEMs' output into the decoder.
    for dem in model.hde.dems:
        dem.w.set_value(jnp.ones_like(dem.w[...]))
    _, state_w1 = nnx.split(model)
    assert np.abs(np.asarray(run(state_w1, lq)) - expected).max() > 1e-3


@pytest.mark.parametrize("stage,use_hde", [("stage1", False), ("stage2", True)])
def test_gradients_reach_exactly_the_stage_groups(stage, use_hde):
    model, _ = tiny_dod()
    randomise_generator_b(model)
    graphdef, params, rest = nnx.split(model, trainable(stage), ...)
    lq, target = lq_batch(), lq_batch(seed=1)

    @jax.jit
    def grads(params, rest):
        def loss(p):
            return jnp.mean((nnx.merge(graphdef, p, rest)(lq, use_hde=use_hde) - target) ** 2)
        return jax.grad(loss)(params)

    flat = dict(nnx.to_flat_state(grads(params, rest)))
    counts = parameter_counts(model)
    assert sum(int(g[...].size) for g in flat.values()) == sum(counts[f"{stage}/{g}"] for g in STAGE_GROUPS[stage])
    dead = [p for p, g in flat.items() if not np.any(np.asarray(g[...]) != 0)]
    assert not dead, f"no gradient reaches {dead}"
    other = "stage2" if stage == "stage1" else "stage1"
    assert not set(flat) & set(dict(nnx.to_flat_state(nnx.state(model, trainable(other)))))
    assert not any(p[0] in ("adm",) or (p[0] in ("unet", "vae") and "adapters" not in p)
                   for p in flat), "a frozen base weight is in the trained set"


def test_merged_clora_equals_unmerged_per_image_and_images_get_their_own_modulation():
    model, _ = tiny_dod()
    randomise_generator_b(model)
    randomise_mtheta(model)  # at its initialisation every image's modulation is the identity
    lq = jnp.asarray(two_images(SIZE), jnp.float32)
    graphdef, state = nnx.split(model)
    film = np.asarray(jax.jit(lambda s: nnx.merge(graphdef, s).film(lq))(state))
    assert film.shape == (10, 2, 16)
    assert np.abs(film[:, 0] - film[:, 1]).max() > 0.05  # two images, two modulations

    run, state = restore_fn(model)
    unmerged = np.asarray(run(state, lq))

    @jax.jit
    def merged(state, image):
        m = nnx.merge(graphdef, state)
        assert m.merge_generator(m.film(image)) == len(m.unet_adapted) + 1 + len(m.vae_adapted)  # + conv_in
        return m(image)

    for i in range(2):
        got = np.asarray(merged(state, lq[i:i + 1]))
        # Layer by layer merged and unmerged agree to 1e-5 (test_adapters); through the whole
        # path the float32 rounding differences pass x0 = (z - sqrt(1-abar) eps) / sqrt(abar),
        # which multiplies them by 1/sqrt(abar_999) = 14.6. Measured: 2.3e-5.
        np.testing.assert_allclose(got[0], unmerged[i], atol=5e-5)

    # The restore's fold (its own compiled call) gives the same restoration, and only the arrays
    # it wrote are new: the rest of the merged state is the model's own (no 5 GB copy an image).
    merged_graphdef, merged_state = merge_generator(graphdef, state, lq[1:2])
    restored = jax.jit(lambda g, s, x: nnx.merge(g, s)(x), static_argnums=0)(merged_graphdef, merged_state, lq[1:2])
    np.testing.assert_allclose(np.asarray(restored)[0], unmerged[1], atol=5e-5)
    given, merged_flat = state_arrays(state), state_arrays(merged_state)
    shared = {path for path, value in merged_flat.items() if value is given.get(path)}
    assert {path[0] for path in shared} >= {"adm", "hde", "modulator"} and ("vae", "decoder") in {p[:2] for p in shared}
    folded = [path for path in merged_flat if path not in shared]
    assert len(folded) >= len(model.unet_adapted) + len(model.vae_adapted)
    assert all(path[0] in ("unet", "vae") and "adapters" not in path for path in folded)
    with pytest.raises(ValueError, match="batch must be 1"):
        model.merge_generator(model.film(lq))


def test_ablation_switches_change_the_structure():
    def built(**overrides):
        config = tiny_config()
        config.dod.update(overrides)
        return abstract_dod(config)

    default = built()
    assert default.modulator.prompts.shape == (10, 64)
    assert all(lora.film_key is not None for lora in loras(default.unet, GENERATOR))
    assert all(lora.film_key is None for lora in loras(default.vae, GENERATOR))

    plain = built(clora=False)
    assert plain.modulator is None
    assert all(lora.film_key is None for lora in loras(plain.unet, GENERATOR))

    in_vae = built(clora_in_vae=True)
    assert in_vae.modulator.prompts.shape == (11, 64)
    assert {lora.film_key for lora in loras(in_vae.vae, GENERATOR)} == {10}

    per_layer = built(prompts="layer")
    assert per_layer.modulator.prompts.shape == (len(per_layer.unet_adapted), 64)
    assert sorted(lora.film_key for lora in loras(per_layer.unet, GENERATOR)) == list(
        range(len(per_layer.unet_adapted)))

    assert built(hde={"enabled": False, "skip_init": 0.0, "w_init": 1.0, "growth": 32}).hde is None
    for rank in (4, 16):
        m = built(rank=rank)
        assert {lora.rank for lora in loras(m.unet, GENERATOR)} == {rank}
        assert m.modulator.film.kernel.shape[-1] == 2 * rank
    with pytest.raises(ValueError, match="dod.prompts"):
        built(prompts="per_block")


def test_stage1_lora_counts_on_sd21_match_peft_rule_on_diffusers_unet():
    # Independent count: walk diffusers' own UNet (on the meta device, no memory) with PEFT's
    # target rule and add r * (fan_in + out) for every matched Linear / Conv2d.
    import torch
    from diffusers import UNet2DConditionModel

    config = load_config(ROOT / "configs" / "dod.py")
    rank, targets = config.dod.rank, list(config.dod.unet_targets)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**{k: v for k, v in config.unet.to_dict().items() if not k.startswith("_")})
    expected, layers = 0, 0
    for name, module in unet.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and adapters.matches(name, targets):
            fan_in = module.in_features if isinstance(module, torch.nn.Linear) else module.in_channels * int(
                np.prod(module.kernel_size))
            out = module.out_features if isinstance(module, torch.nn.Linear) else module.out_channels
            expected += rank * (fan_in + out)
            layers += 1
    model = abstract_dod(config)
    assert len(model.unet_adapted) == layers
    assert parameter_counts(model)["stage1/unet_clora"] == expected
    assert parameter_counts(model)["stage1/unet_conv_in"] == 4 * 320 * 9 + 320
