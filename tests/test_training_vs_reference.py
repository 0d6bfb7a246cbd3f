"""dod-jax's training steps against the authors' steps, re-stated in PyTorch from REFERENCE.md
(tests/dod_reference.py: diffusers, peft, their module names), on the tiny config in float32,
from the same released weights on both sides (the authors' pickles imported by
`dod_jax.weights.official`), with AdamW (0.9, 0.999, eps 1e-8) after gradient clipping at 1.0
on the clamped restoration's losses. The random draws come from one place: dod-jax's per-sample
keys give the posterior noise, which the PyTorch side receives as it is.

Stage 1, the generator's update: the UNet's CLoRA and conv_in, the encoder's LoRA and M_theta
trained on l_l2 MSE + l_lpips LPIPS-VGG (the lpips package on the PyTorch side, holding
dod-jax's LPIPS file); DMD's weight is 0 and the fake score is not updated here.
Stage 2: the stage-1 parts frozen, the skip convs and DEMs trained on MSE + l_ssim (1 - SSIM).

What the two sides may differ by, and the bound it puts here: torch's clip scales by
1 / (norm + 1e-6), optax's by 1 / norm (a relative 1e-6 / norm on every clipped gradient).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, nchw
from configs.dod import LPIPS_WEIGHTS
from dod_jax.configs import load_config
from dod_jax.data.demo import demo_photos
from dod_jax.dod.official import write_official
from dod_jax.losses.lpips import load_lpips
from dod_jax.models.layers import NumpyRngs
from dod_jax.restore.bundle import load_model
from dod_jax.training.steps import Stage, add_fake_score, loss_weights
from dod_jax.weights.official import main as official_main
from dod_reference import authors_model, config_file, save_released
from test_training import adam_first_moments

SIZE, BATCH, STEPS = 32, 2, 3
# The authors' optimiser settings, which configs/dod.py holds, except: a learning rate 20x
# theirs and a weight decay 50x, so that three steps move the parameters, and the decay moves
# them, well beyond float32 rounding (at 5e-5 and 1e-2 the decay is 5e-7 of a weight a step).
AUTHORS = {"lr": 5e-5, "betas": (0.9, 0.999), "weight_decay": 1e-2, "clip": 1.0, "ssim": 0.1}
LR, WEIGHT_DECAY = 1e-3, 0.5
SSIM_WEIGHT = AUTHORS["ssim"]  # the code's l_ssim (the paper's 0.2)
L2_WEIGHT, LPIPS_WEIGHT = 2.0, 5.0  # the code's l_l2 and l_lpips (the paper's 1 and 2)
# Stage 1 at a tenth of that learning rate (a step still moves every trained parameter by 1e-4)
# and ten times the decay (5e-4 of a weight a step): Adam's first steps move each parameter by
# lr * sign(g), so where a gradient is at rounding level (to_q / to_k LoRA of attention over the
# few tokens of the tiny UNet's inner levels) its rounding picks the direction; at 1e-3 those
# moves fed back and the runs parted (99.7% of the parameters within 1e-5 after step 1, 73% after
# step 3, the step-3 MSE 5e-5 apart).
OPTIMISER = {"stage2": (LR, WEIGHT_DECAY), "stage1": (1e-4, 5.0)}
# Measured, stage 2: losses within 2e-7 relative (SSIM, near 0, within 1e-7); Adam's first moments
# after step 1 within 2.5e-5 of each tensor's scale; the parameters after 1-3 steps 99.988% or
# more within 1e-5, the largest difference 8.1e-5. Stage 1: losses within 6e-7; first moments
# within 1.5e-3 of a tensor's scale where that is 1e-3 of the largest moment (to_q LoRA in the
# down blocks' attention: 1.5e-6 of the largest, float32 rounding through UNet, VAE and VGG);
# 99.885% of the parameters within
# 1e-5 after 1-3 steps, every one further apart after step 1 with a gradient under 5e-7 of the
# largest, the largest difference 2.8e-4 after step 3.
MOMENT_RTOL = {"stage2": 1e-4, "stage1": 2e-3}
PARAMS_WITHIN_1E5 = 0.998


def torch_ssim(x, y, data_range=2.0, size=11, sigma=1.5, k1=0.01, k2=0.03):
    """Per-image SSIM of NCHW tensors: Gaussian window, valid region, averaged over channels."""
    g = torch.exp(-(torch.arange(size, dtype=torch.float64) - (size - 1) / 2) ** 2 / (2 * sigma ** 2))
    g = (g / g.sum()).float()
    c = x.shape[1]
    rows, cols = g.reshape(1, 1, size, 1).repeat(c, 1, 1, 1), g.reshape(1, 1, 1, size).repeat(c, 1, 1, 1)
    blur = lambda t: F.conv2d(F.conv2d(t, rows, groups=c), cols, groups=c)
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return s.mean(dim=(1, 2, 3))


def batches(seed=0):
    """Crops of demo photos (so SSIM is far from 0) with noise added for the LQ, in [-1, 1]."""
    rng = np.random.default_rng(seed)
    photos = list(demo_photos().values())
    for _ in range(STEPS):
        crops = []
        for _ in range(BATCH):
            photo = photos[rng.integers(len(photos))]
            y, x = rng.integers(0, photo.shape[0] - SIZE), rng.integers(0, photo.shape[1] - SIZE)
            crops.append(photo[y:y + SIZE, x:x + SIZE])
        gt = np.stack(crops).astype(np.float32) / 127.5 - 1
        yield {"lq": np.clip(gt + rng.normal(0, 0.3, gt.shape), -1, 1).astype(np.float32), "gt": gt}


def release(tmp_path_factory, **model_options):
    """The re-statement with random weights, saved as the authors' files and imported: (the
    PyTorch model, the dod-jax bundle)."""
    folder = tmp_path_factory.mktemp("authors_tiny")
    config = load_config(config_file(folder, "tiny"))
    model = authors_model(config, folder, **model_options)
    save_released(model, folder)
    bundle = tmp_path_factory.mktemp("imported") / "bundle"
    assert official_main(["import", "--stage1", str(folder / "stage1.pkl"), "--stage2", str(folder / "stage2.pkl"),
                          "--sd", str(folder / "sd"), "--adm", str(folder / "adm.pt"),
                          "--prompts", str(folder / "prompt_embeds.pt"), "--config", str(next(folder.glob("*.py"))),
                          "--out", str(bundle)]) == 0
    return model, bundle


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    return release(tmp_path_factory)


@pytest.fixture(scope="module")
def released_in_range(tmp_path_factory):
    """Restorations inside (-1, 1), so the clamp leaves no flat regions: there LPIPS-VGG's
    max-pooling meets exact ties, its gradient jumps (measured: a 1e-6 change of the unclamped
    pixels moved the gradient by 3e-3 of its largest entry, 1e-6 with average pooling), and
    two correct implementations part by their rounding (1.5e-2 of some tensors' gradients)."""
    return release(tmp_path_factory, decoder_out_scale=0.25)


# The sections of the authors' stage-1 dict that hold M_theta's modules (their layout).
MTHETA_SECTIONS = {"de_mlp": "state_dict_unet_de_mlp", "block_mlp": "state_dict_unet_block_mlp",
                   "fuse_mlp": "state_dict_unet_fuse_mlp", "block": "state_dict_unet_block"}


def authors_trained(reference, stage: str) -> dict:
    """{(file, section, name): parameter} of what the authors' `stage` trains, keyed by its place
    in their dicts: stage 1 the UNet's LoRA and conv_in, the encoder's LoRA and M_theta; stage 2
    the skip convs and DEMs."""
    if stage == "stage2":
        return {("stage2", "state_dict_vae", n): p for n, p in reference.vae.named_parameters()
                if "sft_blocks" in n or "skip_conv" in n}
    trained = {("stage1", "state_dict_unet", n): p for n, p in reference.unet.named_parameters()
               if "lora" in n or n.startswith("conv_in.")}
    trained.update({("stage1", "state_dict_vae", n): p for n, p in reference.vae.named_parameters() if "lora" in n})
    for n, p in reference.mtheta.named_parameters():
        module, _, name = n.partition(".")
        trained[("stage1", MTHETA_SECTIONS[module], name)] = p
    return trained


def authors_losses(stage: str):
    """The authors' loss of `stage` on the clamped restoration: restored, gt -> {term: value,
    'loss': the weighted sum}."""
    if stage == "stage2":
        def losses(restored, gt):
            mse, ssim = F.mse_loss(restored, gt), torch_ssim(restored, gt).mean()
            return {"mse": mse, "ssim": ssim, "loss": mse + SSIM_WEIGHT * (1 - ssim)}
        return losses
    from safetensors.numpy import load_file
    from test_lpips import reference_lpips
    lpips = reference_lpips(load_file(LPIPS_WEIGHTS))

    def losses(restored, gt):
        mse, perceptual = F.mse_loss(restored, gt), lpips(restored, gt).mean()
        return {"mse": mse, "lpips": perceptual, "loss": L2_WEIGHT * mse + LPIPS_WEIGHT * perceptual}
    return losses


def authors_steps(reference, stage: str, steps):
    """The authors' steps of `stage` on `steps` ((batch, posterior noise) pairs): per step the
    loss terms, then (Adam's first moments after step 1, the trained parameters after each
    step), keyed as authors_trained keys them."""
    trained = authors_trained(reference, stage)
    for p in reference.parameters():
        p.requires_grad_(False)
    for p in trained.values():
        p.requires_grad_(True)
    lr, wd = OPTIMISER[stage]
    opt = torch.optim.AdamW(trained.values(), lr=lr, betas=AUTHORS["betas"], eps=1e-8, weight_decay=wd)
    losses = authors_losses(stage)
    terms, params, moments = [], [], None
    for batch, noise in steps:
        restored = reference.restore(nchw(batch["lq"]), nchw(noise), use_dems=stage == "stage2")  # clamped
        step_terms = losses(restored, nchw(batch["gt"]))
        opt.zero_grad()
        step_terms["loss"].backward()
        torch.nn.utils.clip_grad_norm_(trained.values(), AUTHORS["clip"])
        opt.step()
        terms.append({k: v.item() for k, v in step_terms.items()})
        if moments is None:
            moments = {k: opt.state[p]["exp_avg"].numpy().copy() for k, p in trained.items()}
        params.append({k: p.detach().numpy().copy() for k, p in trained.items()})
    return terms, moments, params


def as_authors(stage, state, frozen, params, targets, keys) -> dict:
    """`params` (a tree like state.params) at `keys` of the authors' dicts, in PyTorch's layouts."""
    files = write_official(stage.merge(state.replace(params=params), frozen), *targets)
    return {(f, section, name): files[f][section][name] for f, section, name in keys}


def relative_errors(got: dict, expected: dict) -> dict:
    """Per tensor: max |got - expected| / max |expected| (at least 1e-3 of the largest over all)."""
    assert got.keys() == expected.keys() and got
    floor = 1e-3 * max(np.abs(v).max() for v in expected.values())
    return {k: float(np.abs(got[k] - expected[k]).max() / max(np.abs(expected[k]).max(), floor)) for k in expected}


def steps_equal_the_authors_steps(reference, bundle, stage: str):
    """Run `stage` for STEPS steps on both sides and compare the losses, Adam's first moments
    after step 1 and the trained parameters after every step."""
    loaded = load_model(bundle, dtype="float32")
    targets = (loaded.config.dod.unet_targets, loaded.config.dod.vae_targets)
    train = loaded.config.train
    defaults = load_config(ROOT / "configs" / "dod.py").train
    assert (defaults.lr, tuple(defaults.betas), defaults.weight_decay, defaults.clip, loss_weights(defaults)["ssim"]) == \
        tuple(AUTHORS.values())
    assert (loss_weights(defaults)["l2"], loss_weights(defaults)["lpips"]) == (L2_WEIGHT, LPIPS_WEIGHT)
    assert defaults.lr_schedule == "constant" and defaults.clamp_output
    lr, wd = OPTIMISER[stage]
    train.update(stage=stage, lr=lr, weight_decay=wd, micro_batches=1, steps=STEPS)
    assert (tuple(train.betas), train.clip, loss_weights(train)["ssim"], train.lr_schedule, train.clamp_output) == \
        (AUTHORS["betas"], AUTHORS["clip"], SSIM_WEIGHT, "constant", True)  # the bundle's own settings
    lpips = None
    if stage == "stage1":  # the generator's update alone: no DMD term, no fake-score update
        train.update(fake_updates=0, lpips_weights=str(LPIPS_WEIGHTS))
        train.weights.dmd = 0.0
        add_fake_score(loaded.model, np.zeros(loaded.model.prompt_embedding[...].shape, np.float32),
                       rank=train.fake_rank, targets=targets[0], rngs=NumpyRngs(0))  # Stage.create asks for it
        lpips = load_lpips(LPIPS_WEIGHTS)
    stage_obj, state, frozen = Stage.create(loaded.model, train, lpips)
    step = jax.jit(stage_obj.train_step)
    keys = list(authors_trained(reference, stage))

    metrics, moments, params, steps = [], None, [], []
    for batch in batches():
        sample_keys = stage_obj.sample_keys(state, 0, BATCH)  # the step's own draws, handed to PyTorch
        noise = np.asarray(loaded.model.latent_noise(jax.vmap(jax.random.split)(sample_keys)[:, 0], batch["lq"].shape))
        steps.append((batch, noise))
        state, step_metrics, restored = step(state, frozen, jax.tree.map(jnp.asarray, batch))
        metrics.append(jax.device_get(step_metrics))
        if stage == "stage1":
            assert np.abs(np.asarray(restored)).max() < 1, "the clamp is active: see released_in_range"
        if moments is None:
            moments = as_authors(stage_obj, state, frozen, adam_first_moments(state.opt_state), targets, keys)
        params.append(as_authors(stage_obj, state, frozen, state.params, targets, keys))
    their_terms, their_moments, their_params = authors_steps(reference, stage, steps)

    errors = relative_errors(moments, their_moments)
    print("first moments after step 1, worst:", max(errors.items(), key=lambda kv: kv[1]))
    gradient_max = max(np.abs(m).max() for m in their_moments.values())  # Adam's m after step 1 is 0.1 g
    off = {k: (np.abs(params[0][k] - their_params[0][k]) > 1e-5) for k in their_params[0]}
    off_gradients = np.concatenate([np.abs(their_moments[k][where]).ravel() for k, where in off.items()]) / gradient_max
    within = []
    for i, (ours, theirs) in enumerate(zip(params, their_params)):
        diffs = np.concatenate([np.abs(ours[k] - theirs[k]).ravel() for k in theirs])
        within.append((np.mean(diffs < 1e-5), diffs.max()))
        print(f"parameters after step {i + 1}: {within[-1][0]:.5f} within 1e-5, largest {within[-1][1]:.2e}")
    for ours, theirs in zip(metrics, their_terms):
        print({k: (float(ours[k]), v) for k, v in theirs.items()})
    for ours, theirs in zip(metrics, their_terms):
        # SSIM is near 0 (a random-weight restorer's output is unlike its target); on its own
        # scale of 1, absolutely
        for k, v in theirs.items():
            np.testing.assert_allclose(float(ours[k]), v, rtol=1e-5, atol=1e-6 if k == "ssim" else 0, err_msg=k)
    assert max(errors.values()) < MOMENT_RTOL[stage]
    # Adam's first step moves a parameter by lr * sign(g) wherever |g| >> eps: the steps part only
    # where the gradient is at rounding level, where its sign is the rounding's
    print(f"parameters more than 1e-5 apart after step 1: {off_gradients.size}, their gradients at most "
          f"{off_gradients.max(initial=0):.1e} of the largest")
    assert off_gradients.max(initial=0) < 1e-6
    lr = OPTIMISER[stage][0]
    for i, (fraction, largest) in enumerate(within):
        assert fraction >= PARAMS_WITHIN_1E5 and largest <= (i + 1) * 2.1 * lr, i


def test_stage2_steps_equal_the_authors_steps(released):
    steps_equal_the_authors_steps(*released, "stage2")


def test_stage1_generator_steps_equal_the_authors_steps(released_in_range):
    steps_equal_the_authors_steps(*released_in_range, "stage1")
