"""The authors' DOD, re-stated in PyTorch from REFERENCE.md (tests/dod_reference.py: diffusers,
peft, their module names), with random non-trivial weights everywhere, saved as their code
saves it, imported by `python -m dod_jax.weights.official import`: dod-jax restores the same
images, for a stage-1 and a stage-1+2 bundle, at the posterior mode and with the same
posterior noise on both sides; and what dod-jax exports loads into the re-statement and
restores the same image there."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from adm_reference import ADMEncoderTorch
from conftest import diffusers_model, nchw, nhwc, perturb_
from dod_jax.configs import load_config
from dod_jax.dod.official import vae_target_regex
from dod_jax.models.layers import normal_per_sample
from dod_jax.restore.bundle import load_model
from dod_jax.weights.official import main as official_main
from dod_reference import AuthorsDOD

SIZE = 32


def config_file(tmp_path, name: str):
    """A config like configs/<name>.py whose MFM sees the LQ at full resolution (the authors'
    code at test time), as --config for the import."""
    path = tmp_path / f"{name}_full_mfm.py"
    path.write_text(f"from configs import {name}\n\n\ndef get_config():\n    config = {name}.get_config()\n"
                    "    config.dod.mfm_size = 0\n    return config\n")
    return path


def authors_model(config, folder, seed=0, trained_seed=4):
    """The re-statement with random weights (the base from `seed`, what DOD trains from
    `trained_seed`); the base (before LoRA and the trained conv_in) is saved as a diffusers
    folder and the ADM as its .pt, as the import reads them."""
    unet = diffusers_model("unet", config.unet.to_dict(), seed + 1)
    vae = diffusers_model("vae", config.vae.to_dict(), seed + 2)
    unet.save_pretrained(folder / "sd" / "unet")
    vae.save_pretrained(folder / "sd" / "vae")
    scheduler = DDPMScheduler.from_config(config.scheduler.to_dict())
    scheduler.save_pretrained(folder / "sd" / "scheduler")
    a = config.adm
    torch.manual_seed(seed + 3)
    adm = perturb_(ADMEncoderTorch(a.image_size, 3, a.model_channels, a.channel_mult, a.num_res_blocks,
                                   a.attention_resolutions, a.num_head_channels).eval(), seed + 3)
    torch.save(adm.state_dict(), folder / "adm.pt")
    prompt = torch.randn(1, config.prompt_length, config.unet.cross_attention_dim, generator=torch.Generator().manual_seed(seed))
    torch.save(prompt, folder / "prompt_embeds.pt")
    model = AuthorsDOD(unet, vae, adm, a.model_channels * a.channel_mult[-1], scheduler.alphas_cumprod, prompt,
                       config.dod.rank, config.dod.unet_targets, vae_target_regex(config.dod.vae_targets)).eval()
    # Everything trained moves off its initialisation: B matrices, the UNet's trained conv_in,
    # M_theta (its prompts and biases too), the DEMs and their w, so a mix-up of any two shows.
    trained = {model.unet: lambda n: "lora" in n or n.startswith("conv_in."),
               model.vae: lambda n: "lora" in n or "sft_blocks" in n or "skip_conv" in n,
               model.mtheta: lambda n: True}
    generator = torch.Generator().manual_seed(trained_seed)
    with torch.no_grad():
        for module, is_trained in trained.items():
            scale = 0.5 if module is model.mtheta else 0.05
            for name, p in module.named_parameters():
                if is_trained(name):
                    p.add_(torch.randn(p.shape, generator=generator) * scale)
    return model


@pytest.fixture(scope="module", params=["micro", "tiny"])
def released(tmp_path_factory, request):
    folder = tmp_path_factory.mktemp(f"authors_{request.param}")
    config = load_config(config_file(folder, request.param))
    model = authors_model(config, folder)
    torch.save(model.stage1_dict(config.dod.unet_targets, vae_target_regex(config.dod.vae_targets)), folder / "stage1.pkl")
    torch.save(model.stage2_dict(), folder / "stage2.pkl")
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
    assert loaded.use_hde == stage2 and loaded.config.dod.latent == "sample"  # the bundle samples, as the authors
    lq = lq_images()
    with torch.no_grad():
        expected = nhwc(reference(nchw(lq), use_dems=stage2))
    mode = load_model(tmp_path / "bundle", dtype="float32", dod={"latent": "mode"})
    got = np.clip(np.asarray(mode.model(jax.numpy.asarray(lq), use_hde=stage2)), -1, 1)
    err = np.abs(got - expected).max()
    print(f"{folder.name}, {'stage 1+2' if stage2 else 'stage 1'}, posterior mode: max abs error {err:.2e}")
    assert err < 1e-4 and np.abs(expected).std() > 0.05

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
    assert err < 1e-4


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
