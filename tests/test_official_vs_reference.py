"""The authors' DOD, re-stated in PyTorch from REFERENCE.md (tests/dod_reference.py: diffusers,
peft, their module names), with random non-trivial weights everywhere, saved as their code
saves it, imported by `python -m dod_jax.methods.dod.convert import`: dod-jax restores the same
images, for a stage-1 and a stage-1+2 bundle, at the posterior mode and with the same
posterior noise on both sides, on the micro and tiny configs and at the full SD 2.1-base +
ADM-256 config (256 x 256); and what dod-jax exports loads into the re-statement and restores
the same image there."""

from __future__ import annotations

import gc

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from flax import nnx

from conftest import ROOT, nchw, nhwc
from dod_jax.configs import load_config
from dod_jax.models.layers import normal_per_sample
from dod_jax.restore.bundle import load_model
from dod_jax.methods.dod.convert import main as official_main
from dod_jax.methods.dod.official import vae_target_regex
from dod_reference import AUTHORS_UNET_TARGETS, AUTHORS_VAE_REGEX, authors_model, config_file, save_released

SIZE = 32
PEFT_DEFAULT_ALPHA = 8  # peft's LoraConfig default, which the authors' code keeps: LoRA scale 8 / r


def test_dod_jax_adapts_the_layers_the_authors_code_adapts():
    """configs/dod.py's target lists against REFERENCE.md's literals; an export writes the VAE's
    as the authors' regex, character for character."""
    config = load_config(ROOT / "configs" / "dod.py")
    assert tuple(config.dod.unet_targets) == AUTHORS_UNET_TARGETS
    assert vae_target_regex(config.dod.vae_targets) == AUTHORS_VAE_REGEX


# micro-rank4: rank 4 under peft's alpha 8, a LoRA scale of 2 on both sides (1 at rank 8), so
# dod.alpha must reach the adapters and an export must scale B back.
@pytest.fixture(scope="module", params=["micro", "tiny", "micro-rank4"])
def released(tmp_path_factory, request):
    folder = tmp_path_factory.mktemp(f"authors_{request.param}")
    name, _, rank = request.param.partition("-rank")
    config = load_config(config_file(folder, name, int(rank) if rank else None))
    model = authors_model(config, folder)
    save_released(model, folder)
    return folder, config, model


def imported(folder, out, stage2: bool):
    args = ["import", "--stage1", str(folder / "stage1.pkl"), "--sd", str(folder / "sd"), "--adm", str(folder / "adm.pt"),
            "--prompts", str(folder / "prompt_embeds.pt"), "--config", str(next(folder.glob("*_full_mfm.py"))),
            "--out", str(out)]
    if stage2:
        args += ["--stage2", str(folder / "stage2.pkl")]
    assert official_main(args) == 0
    return load_model(out, dtype="float32")


def lq_images(batch=2, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (batch, SIZE, SIZE, 3)).astype(np.float32)


@pytest.mark.parametrize("stage2", [False, True], ids=["stage1", "stage1+2"])
def test_dod_jax_restores_what_the_authors_model_restores(released, tmp_path, stage2):
    folder, config, reference = released
    loaded = imported(folder, tmp_path / "bundle", stage2)
    assert (loaded.stage == "stage2") == stage2 and loaded.config.dod.latent == "sample"  # the bundle samples, as the authors
    lq = lq_images()
    with torch.no_grad():
        expected = nhwc(reference(nchw(lq), use_dems=stage2))
    mode = load_model(tmp_path / "bundle", dtype="float32", sections={"dod": {"latent": "mode"}})
    got = np.clip(np.asarray(mode.model(jax.numpy.asarray(lq), use_hde=stage2)), -1, 1)
    err = np.abs(got - expected).max()
    print(f"{folder.name}, {'stage 1+2' if stage2 else 'stage 1'}, posterior mode: max abs error {err:.2e}")
    # 1e-4 at LoRA scale 1; the adapters' share of the output, and of its rounding, grows with
    # the scale (measured at rank 4, scale 2: 1.3e-4 and 1.5e-4)
    tolerance = 1e-4 * PEFT_DEFAULT_ALPHA / config.dod.rank
    assert err < tolerance and np.abs(expected).std() > 0.05

    # The same posterior noise on both sides (the authors' code samples the latent).
    key = jax.random.key(11)
    z_shape = (2, SIZE // 2 ** (len(config.vae.block_out_channels) - 1), SIZE // 2 ** (len(config.vae.block_out_channels) - 1),
               config.vae.latent_channels)
    noise = np.asarray(normal_per_sample(key, z_shape))
    with torch.no_grad():
        expected = nhwc(reference(nchw(lq), noise=nchw(noise), use_dems=stage2))
    got = np.clip(np.asarray(loaded.model(jax.numpy.asarray(lq), key, use_hde=stage2)), -1, 1)
    err = np.abs(got - expected).max()
    print(f"{folder.name}, {'stage 1+2' if stage2 else 'stage 1'}, posterior sample: max abs error {err:.2e}")
    assert err < tolerance


def test_what_dod_jax_exports_runs_in_the_authors_model(released, tmp_path):
    folder, config, reference = released
    imported(folder, tmp_path / "bundle", True)
    assert official_main(["export", "--ckpt", str(tmp_path / "bundle"), "--out", str(tmp_path / "export")]) == 0
    fresh_folder = tmp_path / "fresh"
    fresh_folder.mkdir()
    fresh = authors_model(config, fresh_folder, seed=0, trained_seed=5)  # the same base, other trained weights
    lq = lq_images(1, seed=3)
    with torch.no_grad():
        before = nhwc(fresh(nchw(lq)))
        fresh.load_official(torch.load(tmp_path / "export" / "stage1.pkl", weights_only=True),
                            torch.load(tmp_path / "export" / "stage2.pkl", weights_only=True))
        expected = nhwc(reference(nchw(lq)))
        got = nhwc(fresh(nchw(lq)))
    assert np.abs(before - expected).max() > 1e-2  # the fresh model differed before loading
    np.testing.assert_allclose(got, expected, atol=1e-6)


@pytest.mark.fullsize
def test_dod_jax_restores_what_the_authors_model_restores_at_full_size(tmp_path):
    """SD 2.1-base + ADM-256, a 256 x 256 image, the stage-1+2 bundle restoring with and without
    its DEMs (stage 1), at the posterior mode (zero noise on the dod-jax side, the mean on the
    PyTorch side) and with the same posterior noise. The random weight offsets are 0.02 of the
    small configs' (at those the full-size activations overflow to NaN). The PyTorch model is
    dropped before dod-jax loads the bundle, so the two full-size models are never held at once."""
    folder = tmp_path / "authors"
    folder.mkdir()
    config = load_config(config_file(folder, "dod"))
    reference = authors_model(config, folder, perturbation=0.02)
    save_released(reference, folder)
    lq = np.random.default_rng(0).uniform(-1, 1, (1, 256, 256, 3)).astype(np.float32)
    noise = np.asarray(normal_per_sample(jax.random.key(11), (1, 32, 32, config.vae.latent_channels)))
    cases = [(use_hde, latent) for use_hde in (False, True) for latent in ("mode", "sample")]
    expected = {}
    with torch.no_grad():
        for use_hde, latent in cases:
            expected[use_hde, latent] = nhwc(reference(nchw(lq), noise=nchw(noise) if latent == "sample" else None,
                                                       use_dems=use_hde))
            assert np.abs(expected[use_hde, latent]).std() > 0.05
    del reference
    gc.collect()

    loaded = imported(folder, tmp_path / "bundle", True)
    graphdef, state = nnx.split(loaded.model)
    restore = jax.jit(lambda state, lq, noise, use_hde: (m := nnx.merge(graphdef, state)).restore(
        lq, m.film(lq), noise, use_hde), static_argnums=3)
    errors = {}
    for use_hde, latent in cases:
        given = noise if latent == "sample" else np.zeros_like(noise)  # mean + std * 0 is the mode
        got = np.clip(np.asarray(restore(state, jnp.asarray(lq), jnp.asarray(given), use_hde)), -1, 1)
        errors[("stage1+2" if use_hde else "stage1", latent)] = float(np.abs(got - expected[use_hde, latent]).max())
    print(f"full size, max abs errors: {errors}")
    assert max(errors.values()) < 2e-4, errors
