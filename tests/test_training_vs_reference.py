"""dod-jax's training steps against the authors' steps, re-stated in PyTorch from REFERENCE.md
(tests/dod_reference.py: diffusers, peft, their module names), on the tiny config in float32,
from the same released weights on both sides (the authors' pickles imported by
`dod_jax.methods.dod.convert`), with AdamW (0.9, 0.999, eps 1e-8) after gradient clipping at 1.0
on the clamped restoration's losses. The random draws come from one place: dod-jax's per-sample
keys give the posterior noise, which the PyTorch side receives as it is.

Stage 1, the whole step: the generator's update (the UNet's CLoRA and conv_in, the encoder's
LoRA and M_theta) on l_l2 MSE + l_lpips LPIPS-VGG (the lpips package on the PyTorch side,
holding dod-jax's LPIPS file) + l_dmd DMD (the real score's CFG against the negative prompt, the
fake score's LoRA in either scope), then the fake score's update on its epsilon loss; DMD's and
the fake score's t and noise come from dod-jax's keys too.
Stage 2: the stage-1 parts frozen, the skip convs and DEMs trained on MSE + l_ssim (1 - SSIM).

What the two sides may differ by, and the bound it puts here: torch's clip scales by
1 / (norm + 1e-6), optax's by 1 / norm (a relative 1e-6 / norm on every clipped gradient).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conftest import ROOT
from configs.dod import LPIPS_WEIGHTS
from dod_jax import adapters
from dod_jax.configs import load_config
from dod_jax.data.demo import demo_photos
from dod_jax.methods.dod.official import write_official
from dod_jax.methods.dod.dmd import draw_timesteps_and_noise
from dod_jax.losses.lpips import load_lpips
from dod_jax.models.layers import NumpyRngs
from dod_jax.restore.bundle import load_model
from dod_jax.methods.dod.steps import FAKE, Stage, add_fake_score, loss_weights
from dod_jax.weights.diffusers import to_torch_layout
from dod_jax.methods.dod.convert import main as official_main
from dod_reference import (AUTHORS_UNET_TARGETS, AuthorsScores, AuthorsTraining, authors_model, authors_trained,
                           config_file, save_released)
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
# Measured (Intel Ice Lake; on an AMD EPYC with avx512 the same to the digits shown where not
# given), stage 2: losses within 2e-7 relative (SSIM, near 0, within 1e-7); Adam's first moments
# after step 1 within 2.5e-5 of each tensor's scale; the parameters after 1-3 steps 99.988% or
# more within 1e-5 (AMD 99.993%), the largest difference 8.1e-5 (AMD 9.3e-5). Stage 1 (the whole
# step, fake scope 'official'): losses within 8e-7 but DMD's, within 7.1e-5 (CFG 7.5 and x0 =
# (z_t - sqrt(1 - abar) eps) / sqrt(abar) at t up to 979 multiply the UNets' rounding: PyTorch in
# float32 is 4e-5 from itself in float64); first moments within 6.4e-4 of a tensor's scale (AMD
# 7.1e-4) where that is 1e-3 of the largest moment (1.5e-6 of the largest, float32 rounding
# through UNet, VAE and VGG; PyTorch float32 is 4.5e-4 from float64 by this measure); the
# parameters 99.947%, 98.94% and 98.13% within 1e-6 after steps 1-3 (AMD 99.943%, 99.10%,
# 98.26%; every one further apart after step 1 with a gradient at most 9.2e-5 of its tensor's
# scale: rounding decided its direction, and such moves feed the next steps), the largest
# difference 2.95e-5 (AMD 3.1e-5; three steps of 1e-5) after step 3. Fake scope 'all' (AMD):
# 99.967%, 99.59%, 99.29%, DMD 1.5e-3 apart at step 3.
MOMENT_RTOL = {"stage2": 1e-4, "stage1": 2e-3}
# Loss terms: 1e-5 relative, but DMD's: 2e-4 at step 1, and after it 5e-3. From step 2 DMD's x0
# difference comes through UNets whose parameters have parted where rounding set Adam's sign (the
# generator's and the fake score's, 0.1-1% of them by 1e-5 each), amplified as at step 1: measured
# on an AMD EPYC (avx512), 'all' 1.5e-3 at step 3, 'official' 1e-4; on an Intel Ice Lake 1e-4.
TERM_RTOL = {"dmd": (2e-4, 5e-3)}
PARAMS_WITHIN = {"stage2": 0.999, "stage1": 0.975}


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


def release(mktemp, config_name: str = "tiny", **model_options):
    """The re-statement with random weights, saved as the authors' files and imported: (the
    PyTorch model, the dod-jax bundle, the folder of the authors' files). `mktemp(name)` makes
    a new folder."""
    folder = mktemp("authors_" + config_name)
    config = load_config(config_file(folder, config_name))
    model = authors_model(config, folder, **model_options)
    save_released(model, folder)
    bundle = mktemp("imported") / "bundle"
    assert official_main(["import", "--stage1", str(folder / "stage1.pkl"), "--stage2", str(folder / "stage2.pkl"),
                          "--sd", str(folder / "sd"), "--adm", str(folder / "adm.pt"),
                          "--prompts", str(folder / "prompt_embeds.pt"), "--config", str(next(folder.glob("*.py"))),
                          "--out", str(bundle)]) == 0
    return model, bundle, folder


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    return release(tmp_path_factory.mktemp)


@pytest.fixture(scope="module")
def released_in_range(tmp_path_factory):
    """Restorations inside (-1, 1), so the clamp leaves no flat regions: there LPIPS-VGG's
    max-pooling meets exact ties, its gradient jumps (measured: a 1e-6 change of the unclamped
    pixels moved the gradient by 3e-3 of its largest entry, 1e-6 with average pooling), and
    two correct implementations part by their rounding (1.5e-2 of some tensors' gradients)."""
    return release(tmp_path_factory.mktemp, decoder_out_scale=0.25)


def authors_steps(reference, stage: str, steps, scores=None):
    """The authors' steps of `stage` (dod_reference.AuthorsTraining, at OPTIMISER's settings) on
    `steps` (dicts of the batch and the draws): per step the loss terms, then (Adam's first
    moments after step 1, the trained parameters after each step). The fixture's model is
    shared: it is left as it was."""
    start = {k: v.clone() for k, v in reference.state_dict().items()}
    try:
        training = authors_training(reference, stage, scores)
        terms, params, moments = [], [], None
        for draws in steps:
            terms.append(training.step(draws))
            moments = training.first_moments() if moments is None else moments
            params.append(training.parameters())
        return terms, moments, params
    finally:
        reference.load_state_dict(start)


def authors_training(reference, stage: str, scores=None) -> AuthorsTraining:
    """The authors' `stage` on `reference` at OPTIMISER's settings and the code's loss weights
    (stage 1 with the lpips package's LPIPS-VGG and DMD's `scores`)."""
    lr, weight_decay = OPTIMISER[stage]
    return AuthorsTraining(reference, stage, lr=lr, weight_decay=weight_decay, betas=AUTHORS["betas"],
                           clip=AUTHORS["clip"], lpips=torch_lpips() if stage == "stage1" else None, scores=scores,
                           weights={"l2": L2_WEIGHT, "lpips": LPIPS_WEIGHT, "dmd": DMD_WEIGHT, "ssim": SSIM_WEIGHT})


def torch_lpips():
    """The lpips package's LPIPS-VGG holding dod-jax's LPIPS weights."""
    from safetensors.numpy import load_file
    from test_lpips import reference_lpips
    return reference_lpips(load_file(LPIPS_WEIGHTS))


def as_authors(stage, state, frozen, params, targets, keys) -> dict:
    """`params` (a tree like state.params) at `keys` of the authors' dicts, in PyTorch's layouts."""
    files = write_official(stage.merge(state.replace(params=params), frozen), *targets)
    return {(f, section, name): files[f][section][name] for f, section, name in keys}


def torch_layout(kernel) -> np.ndarray:
    """A Linear (in, out) or Conv2d (kh, kw, in, out) kernel in PyTorch's layout."""
    return to_torch_layout("linear" if kernel.ndim == 2 else "conv", np.asarray(kernel))


def fake_as_authors(stage, state, frozen, fake_params) -> dict:
    """`fake_params` (a tree like state.fake_params) as AuthorsScores.trained keys them."""
    model = stage.merge(state.replace(fake_params=fake_params), frozen)
    return {("fake", path, ab): torch_layout(getattr(lora, f"lora_{ab}").kernel[...])
            for path, _, lora in adapters.adapted(model.unet, FAKE) for ab in "AB"}


def moment_scales(expected: dict) -> dict:
    """Per tensor, the scale its differences are measured on: its largest |value|, at least 1e-3
    of the largest over all."""
    floor = 1e-3 * max(np.abs(v).max() for v in expected.values())
    return {k: max(float(np.abs(v).max()), floor) for k, v in expected.items()}


@dataclasses.dataclass
class Paired:
    """dod-jax's stage (from the imported bundle) beside what the PyTorch side needs of it: in
    stage 1 the negative prompt and the fake score's LoRA (its A: {layer: A in PyTorch's layout})
    in `fake_scope`, and `scores`, the AuthorsScores made from them (None until made)."""
    model: object
    stage: Stage
    state: object
    frozen: object
    targets: tuple
    fake_scope: str | None
    negative_prompt: np.ndarray | None
    fake_a: dict | None
    scores: AuthorsScores | None = None

    def draws(self, batch: dict) -> dict:
        """`batch` with the draws dod-jax's next step makes (dod_jax.methods.dod.steps,
        dod_jax.methods.dod.dmd): the posterior noise, and in stage 1 DMD's and the fake score's t
        and noise, drawn over the authors' ranges."""
        draws = dict(batch)
        b = batch["lq"].shape[0]
        latent_keys, dmd_keys = jax.vmap(jax.random.split)(self.stage.sample_keys(self.state, 0, b)).transpose(1, 0)
        draws["noise"] = np.asarray(self.model.latent_noise(latent_keys, batch["lq"].shape))
        if self.fake_a is not None:
            shape = draws["noise"].shape
            draws["dmd_t"], draws["dmd_noise"] = map(np.asarray, draw_timesteps_and_noise(dmd_keys, shape, *DMD_T))
            draws["fake_t"], draws["fake_noise"] = map(np.asarray, draw_timesteps_and_noise(
                self.stage.sample_keys(self.state, 1, b), shape, *FAKE_T))
        return draws

    def authors_scores(self, reference, folder) -> AuthorsScores:
        """DMD's scores on the PyTorch side, matching this stage 1's (it needs only the numpy
        fields: dod-jax's side may be freed first)."""
        rank = next(iter(self.fake_a.values())).shape[0]  # A in PyTorch's layout: (rank, in, ...)
        return AuthorsScores(folder, reference.prompt,
                             torch.from_numpy(self.negative_prompt).reshape(reference.prompt.shape),
                             rank, AUTHORS_UNET_TARGETS, self.fake_a, self.fake_scope, GUIDANCE)


def paired(reference, bundle, folder, stage: str, fake_scope: str | None, steps: int, scores: bool = True) -> Paired:
    """dod-jax's `stage` from `bundle` at OPTIMISER's settings (stage 1 with its fake score's
    LoRA in `fake_scope` and a random negative prompt), with the matching AuthorsScores unless
    `scores` is False."""
    loaded = load_model(bundle, dtype="float32")
    model = loaded.model
    targets = (loaded.config.dod.unet_targets, loaded.config.dod.vae_targets)
    train = loaded.config.train
    lr, wd = OPTIMISER[stage]
    train.update(stage=stage, lr=lr, fake_lr=lr, weight_decay=wd, micro_batches=1, steps=steps)
    assert (tuple(train.betas), train.clip, loss_weights(train)["ssim"], train.lr_schedule, train.clamp_output) == \
        (AUTHORS["betas"], AUTHORS["clip"], SSIM_WEIGHT, "constant", True)  # the bundle's own settings
    lpips, negative_prompt, fake_a = None, None, None
    if stage == "stage1":
        negative_prompt = np.random.default_rng(7).standard_normal(model.prompt_embedding[...].shape).astype(np.float32)
        add_fake_score(model, negative_prompt, rank=train.fake_rank, targets=targets[0], rngs=NumpyRngs(0),
                       scope=fake_scope)
        lpips = load_lpips(LPIPS_WEIGHTS)
        fake_a = {path: torch_layout(lora.lora_A.kernel[...]) for path, _, lora in adapters.adapted(model.unet, FAKE)}
    pair = Paired(model, *Stage.create(model, train, lpips), targets, fake_scope, negative_prompt, fake_a)
    if stage == "stage1" and scores:
        pair.scores = pair.authors_scores(reference, folder)
    return pair


def steps_equal_the_authors_steps(reference, bundle, folder, stage: str, fake_scope: str | None = None):
    """Run `stage` for STEPS steps on both sides and compare the losses, Adam's first moments
    after step 1 and the trained parameters after every step. Stage 1 is the whole step: the
    generator's update with DMD (the fake score's LoRA in `fake_scope`), then the fake score's."""
    defaults = load_config(ROOT / "configs" / "dod.py").train
    assert (defaults.lr, tuple(defaults.betas), defaults.weight_decay, defaults.clip, loss_weights(defaults)["ssim"]) == \
        tuple(AUTHORS.values())
    assert (loss_weights(defaults)["l2"], loss_weights(defaults)["lpips"], loss_weights(defaults)["dmd"]) == \
        (L2_WEIGHT, LPIPS_WEIGHT, DMD_WEIGHT)
    assert (defaults.fake_lr, defaults.fake_clip, defaults.fake_updates) == (AUTHORS["lr"], AUTHORS["clip"], 1)
    assert defaults.lr_schedule == "constant" and defaults.clamp_output
    pair = paired(reference, bundle, folder, stage, fake_scope, STEPS)
    step = jax.jit(pair.stage.train_step)
    keys = list(authors_trained(reference, stage))

    def ours(generator, fake):
        return {**as_authors(pair.stage, pair.state, pair.frozen, generator, pair.targets, keys),
                **(fake_as_authors(pair.stage, pair.state, pair.frozen, fake) if pair.scores is not None else {})}

    metrics, moments, params, steps = [], None, [], []
    for batch in batches():
        steps.append(pair.draws(batch))  # the step's own draws, handed to PyTorch
        pair.state, step_metrics, restored = step(pair.state, pair.frozen, jax.tree.map(jnp.asarray, batch))
        metrics.append(jax.device_get(step_metrics))
        if stage == "stage1":
            assert np.abs(np.asarray(restored)).max() < 1, "the clamp is active: see released_in_range"
        if moments is None:
            moments = ours(adam_first_moments(pair.state.opt_state),
                           adam_first_moments(pair.state.fake_opt_state) if pair.scores is not None else None)
        params.append(ours(pair.state.params, pair.state.fake_params))
    their_terms, their_moments, their_params = authors_steps(reference, stage, steps, pair.scores)
    assert moments.keys() == their_moments.keys() and moments
    scales = moment_scales(their_moments)
    errors = {k: float(np.abs(moments[k] - m).max()) / scales[k] for k, m in their_moments.items()}
    print("first moments after step 1, worst:", sorted(errors.items(), key=lambda kv: -kv[1])[:3])
    atol = PARAMS_ATOL[stage]
    # per parameter further apart than atol after step 1: its first moment (0.1 g) on its tensor's
    # scale, where the moment check allows the two sides to differ by MOMENT_RTOL
    off_gradients = np.concatenate([np.abs(their_moments[k][np.abs(params[0][k] - theirs) > atol]) / scales[k]
                                    for k, theirs in their_params[0].items()])
    within = []
    for i, (ours_i, theirs) in enumerate(zip(params, their_params)):
        diffs = np.concatenate([np.abs(ours_i[k] - theirs[k]).ravel() for k in theirs])
        within.append((np.mean(diffs < atol), diffs.max()))
        print(f"parameters after step {i + 1}: {within[-1][0]:.5f} within {atol:.0e}, largest {within[-1][1]:.2e}")
    for ours_i, theirs in zip(metrics, their_terms):
        print({k: (float(ours_i[k]), v) for k, v in theirs.items()})
    for i, (ours_i, theirs) in enumerate(zip(metrics, their_terms)):
        # SSIM is near 0 (a random-weight restorer's output is unlike its target); on its own
        # scale of 1, absolutely
        for k, v in theirs.items():
            np.testing.assert_allclose(float(ours_i[k]), v, rtol=TERM_RTOL.get(k, (1e-5,) * 2)[i > 0],
                                       atol=1e-6 if k == "ssim" else 0, err_msg=f"{k}, step {i + 1}")
    assert max(errors.values()) < MOMENT_RTOL[stage]
    # Adam's first step moves a parameter by lr * sign(g) wherever |g| >> eps: the steps part only
    # where the gradient is small enough for the difference the moment check allows to flip its sign
    print(f"parameters more than {atol:.0e} apart after step 1: {off_gradients.size}, their gradients at most "
          f"{off_gradients.max(initial=0):.1e} of their tensor's scale")
    assert off_gradients.max(initial=0) < MOMENT_RTOL[stage]
    for i, (fraction, largest) in enumerate(within):
        assert fraction >= PARAMS_WITHIN[stage] and largest <= (i + 1) * 2.1 * OPTIMISER[stage][0], i


def test_stage2_steps_equal_the_authors_steps(released):
    steps_equal_the_authors_steps(*released, "stage2")


@pytest.mark.parametrize("fake_scope", ["official", "all"])
def test_stage1_steps_equal_the_authors_steps(released_in_range, fake_scope):
    steps_equal_the_authors_steps(*released_in_range, "stage1", fake_scope)
