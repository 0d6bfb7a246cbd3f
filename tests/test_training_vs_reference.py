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
from diffusers import DDPMScheduler
from configs.dod import LPIPS_WEIGHTS
from dod_jax import adapters
from dod_jax.configs import load_config
from dod_jax.data.demo import demo_photos
from dod_jax.dod.official import write_official
from dod_jax.losses.dmd import draw_timesteps_and_noise
from dod_jax.losses.lpips import load_lpips
from dod_jax.models.layers import NumpyRngs
from dod_jax.restore.bundle import load_model
from dod_jax.training.steps import FAKE, Stage, add_fake_score, loss_weights
from dod_jax.weights.official import main as official_main
from dod_reference import AUTHORS_UNET_TARGETS, authors_model, config_file, save_released
from test_training import adam_first_moments

SIZE, BATCH, STEPS = 32, 2, 3
# The authors' optimiser settings, which configs/dod.py holds, except: a learning rate 20x
# theirs and a weight decay 50x, so that three steps move the parameters, and the decay moves
# them, well beyond float32 rounding (at 5e-5 and 1e-2 the decay is 5e-7 of a weight a step).
AUTHORS = {"lr": 5e-5, "betas": (0.9, 0.999), "weight_decay": 1e-2, "clip": 1.0, "ssim": 0.1}
LR, WEIGHT_DECAY = 1e-3, 0.5
SSIM_WEIGHT = AUTHORS["ssim"]  # the code's l_ssim (the paper's 0.2)
L2_WEIGHT, LPIPS_WEIGHT, DMD_WEIGHT = 2.0, 5.0, 1.0  # the code's l_l2, l_lpips (the paper's 1 and 2), l_dmd
# REFERENCE.md's DMD: CFG 7.5 for the real score; t from randint(20, 980) for DMD and
# randint(0, 1000) for the fake score's loss (inclusive ranges here), as the authors draw them.
GUIDANCE, DMD_T, FAKE_T = 7.5, (20, 979), (0, 999)
# Stage 1 at 1e-5 (a step moves every trained parameter by 1e-5) and a decay moving weights by
# 5e-4 a step: Adam's first steps move each parameter by lr * sign(g), so where a gradient is at
# rounding level (to_q / to_k LoRA of attention over the few tokens of the tiny UNet's inner
# levels) rounding picks the direction, and those moves feed back: at 1e-4 the runs parted by
# step 3 (98.2% of the parameters within 1e-5 of PyTorch's in float64, 99.84% for PyTorch's own
# float32 run; DMD 5e-3 apart), at 1e-5 both stay as close to float64 as each other.
OPTIMISER = {"stage2": (LR, WEIGHT_DECAY), "stage1": (1e-5, 50.0)}
# Parameters count as equal within a tenth of a step or less.
PARAMS_ATOL = {"stage2": 1e-5, "stage1": 1e-6}
# Measured, stage 2: losses within 2e-7 relative (SSIM, near 0, within 1e-7); Adam's first moments
# after step 1 within 2.5e-5 of each tensor's scale; the parameters after 1-3 steps 99.988% or
# more within 1e-5, the largest difference 8.1e-5. Stage 1 (the whole step, fake scope
# 'official'): losses within 8e-7 but DMD's, within 7.1e-5 (CFG 7.5 and x0 = (z_t - sqrt(1 -
# abar) eps) / sqrt(abar) at t up to 979 multiply the UNets' rounding: PyTorch in float32 is 4e-5
# from itself in float64); first moments within 6.4e-4 of a tensor's scale where that is 1e-3 of
# the largest moment (1.5e-6 of the largest, float32 rounding through UNet, VAE and VGG; PyTorch
# float32 is 4.5e-4 from float64 by this measure); the parameters 99.947%, 98.94% and 98.13%
# within 1e-6 after steps 1-3 (every one further apart after step 1 with a gradient under 1.4e-7
# of the largest: rounding decided its direction, and such moves feed the next steps), the
# largest difference 2.95e-5 (three steps of 1e-5) after step 3.
MOMENT_RTOL = {"stage2": 1e-4, "stage1": 2e-3}
TERM_RTOL = {"dmd": 2e-4}  # the others 1e-5
PARAMS_WITHIN = {"stage2": 0.999, "stage1": 0.975}


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
    return model, bundle, folder


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


class AuthorsScores:
    """DMD's two scores as the authors' code builds them (REFERENCE.md): the real score a frozen
    copy of the base UNet, guided by CFG between the negative prompt and the prompt; the fake
    score another copy with three peft adapters added one after another (the target layers of the
    down blocks and conv_in; of the up blocks and conv_out; the others). `scope` 'official':
    diffusers keeps the last added active, so the mid block's LoRA is what trains (their code);
    'all': all three active (its intent). Fake-score LoRA A starts as dod-jax's (`fake_a`:
    {layer name: A in PyTorch's layout}), B at zero as peft and dod-jax start it."""

    SETS = ("down", "up", "others")

    def __init__(self, folder, prompt, negative_prompt, rank: int, targets, fake_a: dict, scope: str):
        from diffusers import UNet2DConditionModel
        from peft import LoraConfig
        self.real = UNet2DConditionModel.from_pretrained(folder / "sd" / "unet").eval().requires_grad_(False)
        self.fake = UNet2DConditionModel.from_pretrained(folder / "sd" / "unet").eval().requires_grad_(False)
        scheduler = DDPMScheduler.from_pretrained(folder / "sd" / "scheduler")
        self.abar = scheduler.alphas_cumprod.float()
        self.prompt, self.negative_prompt = prompt, negative_prompt
        names = [n for n, m in self.fake.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
                 and any(n == t or n.endswith("." + t) for t in targets)]
        down = [n for n in names if n.startswith("down_blocks.")] + ["conv_in"]
        up = [n for n in names if n.startswith("up_blocks.") or n == "conv_out"]
        sets = dict(zip(self.SETS, (down, up, [n for n in names if n not in down + up])))
        for name, layers in sets.items():
            self.fake.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=layers), adapter_name=name)
        assert self.fake.active_adapters() == ["others"]
        if scope == "all":
            self.fake.set_adapters(list(self.SETS))
        active = {n: name for name in self.fake.active_adapters() for n in sets[name]}
        assert set(fake_a) == set(active), ("layers dod-jax's fake score adapts and the authors' do not, or the other "
                                            "way round", sorted(set(fake_a) ^ set(active)))
        modules = dict(self.fake.named_modules())
        with torch.no_grad():
            for n, a in fake_a.items():
                modules[n].lora_A[active[n]].weight.copy_(torch.from_numpy(np.array(a)))
                assert not modules[n].lora_B[active[n]].weight.any()
        self.trained = {("fake", n, ab): getattr(modules[n], f"lora_{ab}")[name].weight
                        for n, name in active.items() for ab in "AB"}
        # the authors' fake optimiser holds all three adapters; only active ones get gradients
        self.parameters = [p for n, p in self.fake.named_parameters() if "lora_" in n]

    def noised(self, z, t, noise):
        abar = self.abar[t].reshape(-1, 1, 1, 1)
        return abar.sqrt() * z + (1 - abar).sqrt() * noise, abar

    @torch.no_grad()
    def dmd_loss(self, x0, t, noise):
        """MSE(x0, stopgrad(x0 - (x0_fake - x0_real) / mean |x0 - x0_real|)), gradients to x0."""
        z_t, abar = self.noised(x0.detach(), t, noise)
        b = x0.shape[0]
        prompt, negative = self.prompt.expand(b, -1, -1), self.negative_prompt.expand(b, -1, -1)
        eps_text, eps_negative = self.real(torch.cat([z_t, z_t]), torch.cat([t, t]),
                                           encoder_hidden_states=torch.cat([prompt, negative])).sample.chunk(2)
        eps_real = eps_negative + GUIDANCE * (eps_text - eps_negative)
        eps_fake = self.fake(z_t, t, encoder_hidden_states=prompt).sample
        x0_real, x0_fake = ((z_t - (1 - abar).sqrt() * eps) / abar.sqrt() for eps in (eps_real, eps_fake))
        grad = (x0_fake - x0_real) / (x0.detach() - x0_real).abs().mean(dim=(1, 2, 3), keepdim=True)
        with torch.enable_grad():
            return F.mse_loss(x0, (x0 - grad).detach())

    def fake_loss(self, x0, t, noise):
        """The fake score's epsilon-MSE on the detached generator latent."""
        z_t, _ = self.noised(x0.detach(), t, noise)
        return F.mse_loss(self.fake(z_t, t, encoder_hidden_states=self.prompt.expand(x0.shape[0], -1, -1)).sample, noise)


def authors_steps(reference, stage: str, steps, scores: AuthorsScores | None = None):
    """The authors' steps of `stage` on `steps` (dicts of the batch and the draws: posterior
    noise; with `scores`, DMD's and the fake score's t and noise): per step the loss terms, then
    (Adam's first moments after step 1, the trained parameters after each step), keyed as
    authors_trained and AuthorsScores.trained key them. With `scores`, stage
    1 adds DMD to the generator's loss, then updates the fake score on the detached latents."""
    start = {k: v.clone() for k, v in reference.state_dict().items()}  # the fixture's model is shared
    try:
        return _authors_steps(reference, stage, steps, scores)
    finally:
        reference.load_state_dict(start)


def _authors_steps(reference, stage: str, steps, scores: AuthorsScores | None):
    trained = authors_trained(reference, stage)
    for p in reference.parameters():
        p.requires_grad_(False)
    for p in trained.values():
        p.requires_grad_(True)
    lr, wd = OPTIMISER[stage]
    opt = torch.optim.AdamW(trained.values(), lr=lr, betas=AUTHORS["betas"], eps=1e-8, weight_decay=wd)
    if scores is not None:
        for p in scores.parameters:
            p.requires_grad_(True)
        fake_opt = torch.optim.AdamW(scores.parameters, lr=lr, betas=AUTHORS["betas"], eps=1e-8, weight_decay=wd)
        trained = {**trained, **scores.trained}
    losses = authors_losses(stage)
    terms, params, moments = [], [], None
    for step in steps:
        step = {k: nchw(v) if k in ("lq", "gt", "noise", "dmd_noise", "fake_noise") else torch.from_numpy(v)
                for k, v in step.items()}
        x0, restored = reference.generate(step["lq"], step["noise"], use_dems=stage == "stage2")  # clamped
        step_terms = losses(restored, step["gt"])
        if scores is not None:
            step_terms["dmd"] = scores.dmd_loss(x0, step["dmd_t"], step["dmd_noise"])
            step_terms["loss"] = step_terms["loss"] + DMD_WEIGHT * step_terms["dmd"]
        opt.zero_grad()
        step_terms["loss"].backward()
        torch.nn.utils.clip_grad_norm_(opt.param_groups[0]["params"], AUTHORS["clip"])
        opt.step()
        if scores is not None:
            step_terms["fake_loss"] = scores.fake_loss(x0, step["fake_t"], step["fake_noise"])
            fake_opt.zero_grad()
            step_terms["fake_loss"].backward()
            torch.nn.utils.clip_grad_norm_(scores.parameters, AUTHORS["clip"])
            fake_opt.step()
        terms.append({k: v.item() for k, v in step_terms.items()})
        if moments is None:
            state = {**opt.state, **(fake_opt.state if scores is not None else {})}
            moments = {k: state[p]["exp_avg"].numpy().copy() for k, p in trained.items()}
        params.append({k: p.detach().numpy().copy() for k, p in trained.items()})
    return terms, moments, params


def as_authors(stage, state, frozen, params, targets, keys) -> dict:
    """`params` (a tree like state.params) at `keys` of the authors' dicts, in PyTorch's layouts."""
    files = write_official(stage.merge(state.replace(params=params), frozen), *targets)
    return {(f, section, name): files[f][section][name] for f, section, name in keys}


def torch_layout(kernel) -> np.ndarray:
    """A Linear (in, out) or Conv2d (kh, kw, in, out) kernel in PyTorch's layout."""
    kernel = np.asarray(kernel)
    return kernel.T if kernel.ndim == 2 else kernel.transpose(3, 2, 0, 1)


def fake_as_authors(stage, state, frozen, fake_params) -> dict:
    """`fake_params` (a tree like state.fake_params) as AuthorsScores.trained keys them."""
    model = stage.merge(state.replace(fake_params=fake_params), frozen)
    return {("fake", path, ab): torch_layout(getattr(lora, f"lora_{ab}").kernel[...])
            for path, _, lora in adapters.adapted(model.unet, FAKE) for ab in "AB"}


def relative_errors(got: dict, expected: dict) -> dict:
    """Per tensor: max |got - expected| / max |expected| (at least 1e-3 of the largest over all)."""
    assert got.keys() == expected.keys() and got
    floor = 1e-3 * max(np.abs(v).max() for v in expected.values())
    return {k: float(np.abs(got[k] - expected[k]).max() / max(np.abs(expected[k]).max(), floor)) for k in expected}


def steps_equal_the_authors_steps(reference, bundle, folder, stage: str, fake_scope: str | None = None):
    """Run `stage` for STEPS steps on both sides and compare the losses, Adam's first moments
    after step 1 and the trained parameters after every step. Stage 1 is the whole step: the
    generator's update with DMD (the fake score's LoRA in `fake_scope`), then the fake score's."""
    loaded = load_model(bundle, dtype="float32")
    model = loaded.model
    targets = (loaded.config.dod.unet_targets, loaded.config.dod.vae_targets)
    train = loaded.config.train
    defaults = load_config(ROOT / "configs" / "dod.py").train
    assert (defaults.lr, tuple(defaults.betas), defaults.weight_decay, defaults.clip, loss_weights(defaults)["ssim"]) == \
        tuple(AUTHORS.values())
    assert (loss_weights(defaults)["l2"], loss_weights(defaults)["lpips"], loss_weights(defaults)["dmd"]) == \
        (L2_WEIGHT, LPIPS_WEIGHT, DMD_WEIGHT)
    assert (defaults.fake_lr, defaults.fake_clip, defaults.fake_updates) == (AUTHORS["lr"], AUTHORS["clip"], 1)
    assert defaults.lr_schedule == "constant" and defaults.clamp_output
    lr, wd = OPTIMISER[stage]
    train.update(stage=stage, lr=lr, fake_lr=lr, weight_decay=wd, micro_batches=1, steps=STEPS)
    assert (tuple(train.betas), train.clip, loss_weights(train)["ssim"], train.lr_schedule, train.clamp_output) == \
        (AUTHORS["betas"], AUTHORS["clip"], SSIM_WEIGHT, "constant", True)  # the bundle's own settings
    lpips, scores = None, None
    if stage == "stage1":
        negative_prompt = np.random.default_rng(7).standard_normal(model.prompt_embedding[...].shape).astype(np.float32)
        add_fake_score(model, negative_prompt, rank=train.fake_rank, targets=targets[0], rngs=NumpyRngs(0),
                       scope=fake_scope)
        lpips = load_lpips(LPIPS_WEIGHTS)
        fake_a = {path: torch_layout(lora.lora_A.kernel[...]) for path, _, lora in adapters.adapted(model.unet, FAKE)}
        scores = AuthorsScores(folder, reference.prompt, torch.from_numpy(negative_prompt).reshape(reference.prompt.shape),
                               train.fake_rank, AUTHORS_UNET_TARGETS, fake_a, fake_scope)
    stage_obj, state, frozen = Stage.create(model, train, lpips)
    step = jax.jit(stage_obj.train_step)
    keys = list(authors_trained(reference, stage))

    def ours(generator, fake):
        return {**as_authors(stage_obj, state, frozen, generator, targets, keys),
                **(fake_as_authors(stage_obj, state, frozen, fake) if scores is not None else {})}

    metrics, moments, params, steps = [], None, [], []
    for batch in batches():
        # the step's own draws (dod_jax.training.steps, dod_jax.losses.dmd), handed to PyTorch
        draws = dict(batch)
        latent_keys, dmd_keys = jax.vmap(jax.random.split)(stage_obj.sample_keys(state, 0, BATCH)).transpose(1, 0)
        draws["noise"] = np.asarray(model.latent_noise(latent_keys, batch["lq"].shape))
        if scores is not None:
            shape = (BATCH,) + draws["noise"].shape[1:]
            draws["dmd_t"], draws["dmd_noise"] = map(np.asarray, draw_timesteps_and_noise(dmd_keys, shape, *DMD_T))
            draws["fake_t"], draws["fake_noise"] = map(np.asarray, draw_timesteps_and_noise(
                stage_obj.sample_keys(state, 1, BATCH), shape, *FAKE_T))
        steps.append(draws)
        state, step_metrics, restored = step(state, frozen, jax.tree.map(jnp.asarray, batch))
        metrics.append(jax.device_get(step_metrics))
        if stage == "stage1":
            assert np.abs(np.asarray(restored)).max() < 1, "the clamp is active: see released_in_range"
        if moments is None:
            moments = ours(adam_first_moments(state.opt_state),
                           adam_first_moments(state.fake_opt_state) if scores is not None else None)
        params.append(ours(state.params, state.fake_params))
    their_terms, their_moments, their_params = authors_steps(reference, stage, steps, scores)
    errors = relative_errors(moments, their_moments)
    print("first moments after step 1, worst:", sorted(errors.items(), key=lambda kv: -kv[1])[:3])
    # Adam's m after step 1 is 0.1 g; each optimiser's gradients on their own scale
    gradient_max = {group: max(np.abs(m).max() for k, m in their_moments.items() if k[0] == group)
                    for group in {k[0] for k in their_moments}}
    atol = PARAMS_ATOL[stage]
    off_gradients = np.concatenate([np.abs(their_moments[k][np.abs(params[0][k] - theirs) > atol]) / gradient_max[k[0]]
                                    for k, theirs in their_params[0].items()])
    within = []
    for i, (ours_i, theirs) in enumerate(zip(params, their_params)):
        diffs = np.concatenate([np.abs(ours_i[k] - theirs[k]).ravel() for k in theirs])
        within.append((np.mean(diffs < atol), diffs.max()))
        print(f"parameters after step {i + 1}: {within[-1][0]:.5f} within {atol:.0e}, largest {within[-1][1]:.2e}")
    for ours_i, theirs in zip(metrics, their_terms):
        print({k: (float(ours_i[k]), v) for k, v in theirs.items()})
    for ours_i, theirs in zip(metrics, their_terms):
        # SSIM is near 0 (a random-weight restorer's output is unlike its target); on its own
        # scale of 1, absolutely
        for k, v in theirs.items():
            np.testing.assert_allclose(float(ours_i[k]), v, rtol=TERM_RTOL.get(k, 1e-5), atol=1e-6 if k == "ssim" else 0,
                                       err_msg=k)
    assert max(errors.values()) < MOMENT_RTOL[stage]
    # Adam's first step moves a parameter by lr * sign(g) wherever |g| >> eps: the steps part only
    # where the gradient is at rounding level, where its sign is the rounding's
    print(f"parameters more than {atol:.0e} apart after step 1: {off_gradients.size}, their gradients at most "
          f"{off_gradients.max(initial=0):.1e} of the largest")
    assert off_gradients.max(initial=0) < 1e-6
    for i, (fraction, largest) in enumerate(within):
        assert fraction >= PARAMS_WITHIN[stage] and largest <= (i + 1) * 2.1 * lr, i


def test_stage2_steps_equal_the_authors_steps(released):
    steps_equal_the_authors_steps(*released, "stage2")


@pytest.mark.parametrize("fake_scope", ["official", "all"])
def test_stage1_steps_equal_the_authors_steps(released_in_range, fake_scope):
    steps_equal_the_authors_steps(*released_in_range, "stage1", fake_scope)
