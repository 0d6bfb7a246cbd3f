"""A PyTorch re-statement of the authors' DOD at inference, written from REFERENCE.md ("The
authors' code in detail") with diffusers and peft, for the parity tests of the official import.

    the base        diffusers UNet2DConditionModel and AutoencoderKL
    UNet LoRA       peft LoraConfig(r, "gaussian" init, the 13 target names), adapter "default",
                    every LoRA layer's forward made conditional: W0 x + s B(gamma (A x) + beta),
                    gamma and beta (used as they are) from its block group's row of M_theta
    conv_in         the trained conv_in replaces the UNet's own
    VAE encoder     peft LoraConfig(r, the regex over encoder names), adapter "vae_skip", plain LoRA
    M_theta         de_mlp = Sequential(Linear(1024, 256), ReLU), block_mlp = Sequential(Linear(64, 64),
                    ReLU), fuse_mlp = Linear(320, 2r), block = Embedding(10, 64)
    MFM             the ADM encoder half (adm_reference) at t = 0 on the LQ, mean-pooled
    HDE             decoder.skip_conv_k (1x1, no bias) and decoder.sft_blocks_k (ResBlock 2C->C, one
                    ESRGAN RRDB, ResBlock C->C, scalar w) before each decoder up-block, fed by the
                    encoder's down-block inputs, deepest first
    one step        eps = UNet(z, 999, prompt); x0 = (z - sqrt(1 - abar) eps) / sqrt(abar);
                    image = clamp(decoder(post_quant_conv(x0 / scaling)), -1, 1)

The state dicts of these modules carry the official names, so `stage1_dict` / `stage2_dict`
are the authors' checkpoint layout. `authors_model` and `save_released` make a "released"
model with random non-trivial weights and its files, for the parity tests and bench/official.py.
`AuthorsTraining` re-states their training steps (with `AuthorsScores`, DMD's real and fake
scores), for tests/test_training_vs_reference.py and bench/train_step_vs_torch.py.
"""

from __future__ import annotations

import re

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from peft import LoraConfig
from torch import nn

from adm_reference import ADMEncoderTorch
from torch_models import diffusers_model, perturb_

# The authors' LoRA targets as ../shared/REFERENCE.md states them (their stage-1 checkpoint's
# unet_lora_target_modules and vae_lora_target_modules): literals, not dod-jax's own lists, so a
# target dropped from or added to configs/dod.py shows in the parity tests.
AUTHORS_UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                        "conv1", "conv2", "conv_shortcut", "conv", "conv_out")
AUTHORS_VAE_REGEX = r"^encoder\..*(conv1|conv2|conv_in|conv_shortcut|conv|conv_out|to_k|to_q|to_v|to_out\.0)$"

UNET_GROUPS = 10


def block_group(name: str) -> int:
    m = re.match(r"(down|up)_blocks\.(\d+)\.", name)
    if m:
        return int(m.group(2)) + (0 if m.group(1) == "down" else 5)
    return 4 if name.startswith("mid_block.") else UNET_GROUPS - 1


class ResBlock(nn.Module):
    def __init__(self, cin, cout, groups=32):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(groups, cin, eps=1e-6), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = nn.GroupNorm(groups, cout, eps=1e-6), nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.conv_out = nn.Conv2d(cin, cout, 1)
        self.cin, self.cout = cin, cout

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + (self.conv_out(x) if self.cin != self.cout else x)


class DenseBlock(nn.Module):
    def __init__(self, nf, gc):
        super().__init__()
        for i in range(5):
            setattr(self, f"conv{i + 1}", nn.Conv2d(nf + i * gc, gc if i < 4 else nf, 3, padding=1))

    def forward(self, x):
        feats = [x]
        for i in range(4):
            feats.append(F.leaky_relu(getattr(self, f"conv{i + 1}")(torch.cat(feats, 1)), 0.2))
        return x + 0.2 * self.conv5(torch.cat(feats, 1))


class RRDB(nn.Module):
    def __init__(self, nf, gc):
        super().__init__()
        self.rdb1, self.rdb2, self.rdb3 = DenseBlock(nf, gc), DenseBlock(nf, gc), DenseBlock(nf, gc)

    def forward(self, x):
        return x + 0.2 * self.rdb3(self.rdb2(self.rdb1(x)))


class FuseBlock(nn.Module):
    def __init__(self, channels, growth, groups):
        super().__init__()
        self.encode_enc_1 = ResBlock(2 * channels, channels, groups)
        self.encode_enc_2 = nn.Sequential(RRDB(channels, growth))
        self.encode_enc_3 = ResBlock(channels, channels, groups)
        self.w = nn.Parameter(torch.tensor(1.0))

    def forward(self, enc, dec):
        h = self.encode_enc_3(self.encode_enc_2(self.encode_enc_1(torch.cat([enc, dec], 1))))
        return dec + self.w * h


class MTheta(nn.Module):
    def __init__(self, feature_dim, rank, hidden=256, prompt_dim=64):
        super().__init__()
        self.de_mlp = nn.Sequential(nn.Linear(feature_dim, hidden), nn.ReLU())
        self.block_mlp = nn.Sequential(nn.Linear(prompt_dim, prompt_dim), nn.ReLU())
        self.fuse_mlp = nn.Linear(hidden + prompt_dim, 2 * rank)
        self.block = nn.Embedding(UNET_GROUPS, prompt_dim)

    def forward(self, c):
        de = self.de_mlp(c)                       # (B, hidden)
        e = self.block_mlp(self.block.weight)     # (10, prompt_dim)
        joint = torch.cat([de[None].expand(e.shape[0], -1, -1), e[:, None].expand(-1, c.shape[0], -1)], -1)
        return self.fuse_mlp(joint)               # (10, B, 2r)


class AuthorsDOD(nn.Module):
    def __init__(self, unet, vae, adm, feature_dim, alphas_cumprod, prompt, rank, unet_targets, vae_regex, growth=32):
        super().__init__()
        self.unet, self.vae, self.adm, self.rank = unet, vae, adm, rank
        self.register_buffer("prompt", prompt)
        self.abar = float(alphas_cumprod[999])
        unet.add_adapter(LoraConfig(r=rank, init_lora_weights="gaussian", target_modules=list(unet_targets)))
        vae.add_adapter(LoraConfig(r=rank, init_lora_weights="gaussian", target_modules=vae_regex), adapter_name="vae_skip")
        self.film = None
        for name, module in unet.named_modules():
            if hasattr(module, "lora_A") and "default" in module.lora_A:
                module.forward = self._conditional(module, block_group(name))
        self.mtheta = MTheta(feature_dim, rank)
        boc = list(vae.config.block_out_channels)
        skips, channels = ([boc[0]] + boc[:-1])[::-1], [boc[-1]] + boc[::-1][:-1]
        groups = vae.config.norm_num_groups
        for k, (s, c) in enumerate(zip(skips, channels), start=1):
            setattr(vae.decoder, f"skip_conv_{k}", nn.Conv2d(s, c, 1, bias=False))
            setattr(vae.decoder, f"sft_blocks_{k}", FuseBlock(c, growth, groups))

    def _conditional(self, layer, group):
        def forward(x, *args, **kwargs):
            out = layer.base_layer(x, *args, **kwargs)
            a = layer.lora_A["default"](x)
            gamma, beta = self.film[group].split(self.rank, dim=-1)   # (B, r) each, used literally
            shape = (x.shape[0], self.rank, 1, 1) if a.ndim == 4 else (x.shape[0], 1, self.rank)
            return out + layer.lora_B["default"](a * gamma.reshape(shape) + beta.reshape(shape)) * layer.scaling["default"]
        return forward

    def encode(self, lq, noise=None):
        enc = self.vae.encoder
        h, skips = enc.conv_in(lq), []
        for down in enc.down_blocks:
            skips.append(h)
            h = down(h)
        h = enc.conv_out(enc.conv_act(enc.conv_norm_out(enc.mid_block(h))))
        mean, logvar = self.vae.quant_conv(h).chunk(2, dim=1)
        z = mean if noise is None else mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * noise
        return z * self.vae.config.scaling_factor, skips

    def decode(self, x0, skips, use_dems):
        dec = self.vae.decoder
        h = dec.mid_block(dec.conv_in(self.vae.post_quant_conv(x0 / self.vae.config.scaling_factor)), None)
        deepest_first = skips[::-1]
        for k, up in enumerate(dec.up_blocks, start=1):
            if use_dems:
                h = getattr(dec, f"sft_blocks_{k}")(getattr(dec, f"skip_conv_{k}")(deepest_first[k - 1]), h)
            h = up(h, None)
        return dec.conv_out(dec.conv_act(dec.conv_norm_out(h)))

    @torch.no_grad()
    def forward(self, lq, noise=None, use_dems=True):
        return self.restore(lq, noise, use_dems)

    def restore(self, lq, noise=None, use_dems=True):
        """The restoration with autograd on (training); forward() is this without it."""
        return self.generate(lq, noise, use_dems)[1]

    def generate(self, lq, noise=None, use_dems=True):
        """(the generator's latent x0, the clamped restoration), with autograd on."""
        c = self.adm(lq, torch.zeros(lq.shape[0])).mean(dim=(2, 3))
        self.film = self.mtheta(c)
        z, skips = self.encode(lq, noise)
        context = self.prompt.expand(lq.shape[0], -1, -1)
        eps = self.unet(z, torch.full((lq.shape[0],), 999), encoder_hidden_states=context).sample
        x0 = (z - (1 - self.abar) ** 0.5 * eps) / self.abar ** 0.5
        return x0, self.decode(x0, skips, use_dems).clamp(-1, 1)

    def stage1_dict(self, unet_targets, vae_regex) -> dict:
        unet = {k: v for k, v in self.unet.state_dict().items() if "lora" in k or "conv_in" in k}
        vae = {k: v for k, v in self.vae.state_dict().items() if "lora" in k or "skip_conv" in k}
        return {"rank_unet": self.rank, "rank_vae": self.rank, "unet_lora_target_modules": list(unet_targets),
                "vae_lora_target_modules": vae_regex, "state_dict_unet": unet, "state_dict_vae": vae,
                "state_dict_unet_de_mlp": self.mtheta.de_mlp.state_dict(),
                "state_dict_unet_block_mlp": self.mtheta.block_mlp.state_dict(),
                "state_dict_unet_fuse_mlp": self.mtheta.fuse_mlp.state_dict(),
                "state_dict_unet_block": self.mtheta.block.state_dict()}

    def stage2_dict(self) -> dict:
        vae = {k: v for k, v in self.vae.state_dict().items() if "sft_blocks" in k or "skip_conv" in k}
        return {"rank_vae_decoder": self.rank, "state_dict_vae": vae}

    def load_official(self, stage1: dict, stage2: dict | None):
        """Load the authors' dicts as their code does (by name into the modules)."""
        for target, key in ((self.mtheta.de_mlp, "state_dict_unet_de_mlp"), (self.mtheta.block_mlp, "state_dict_unet_block_mlp"),
                            (self.mtheta.fuse_mlp, "state_dict_unet_fuse_mlp"), (self.mtheta.block, "state_dict_unet_block")):
            target.load_state_dict(stage1[key], strict=True)
        for model, key in ((self.unet, "state_dict_unet"), (self.vae, "state_dict_vae")):
            result = model.load_state_dict(stage1[key], strict=False)
            assert not result.unexpected_keys, result.unexpected_keys
        if stage2 is not None:
            assert not self.vae.load_state_dict(stage2["state_dict_vae"], strict=False).unexpected_keys


# ------------------------------------------------------------------ a released model

def config_file(folder, name: str, rank: int | None = None):
    """A config like configs/<name>.py whose MFM sees the LQ at full resolution (the authors'
    code at test time), as --config for the import; `rank` replaces the LoRA rank (8)."""
    path = folder / f"{name}_full_mfm.py"
    path.write_text(f"from configs import {name}\n\n\ndef get_config():\n    config = {name}.get_config()\n"
                    "    config.dod.mfm_size = 0\n" + (f"    config.dod.rank = {rank}\n" if rank else "")
                    + "    return config\n")
    return path


def authors_model(config, folder, seed=0, trained_seed=4, perturbation=1.0, decoder_out_scale=1.0):
    """The re-statement with random weights (the base from `seed`, what DOD trains from
    `trained_seed`); the base (before LoRA and the trained conv_in) is saved as a diffusers
    folder and the ADM as its .pt, as the import reads them. `perturbation` scales the random
    offsets on every weight (0.05, and 0.5 on M_theta): full-size models need them smaller, as
    offsets far above their weights' own scale make the activations overflow.
    `decoder_out_scale` scales the VAE decoder's conv_out (weight and bias): a random model's
    restorations overshoot [-1, 1] and the clamp leaves flat regions, where a max-pooling loss
    (LPIPS-VGG) is not differentiable; 0.25 keeps the tiny model's restorations inside."""
    unet = diffusers_model("unet", config.unet.to_dict(), seed + 1, scale=0.05 * perturbation)
    vae = diffusers_model("vae", config.vae.to_dict(), seed + 2, scale=0.05 * perturbation)
    with torch.no_grad():
        for p in vae.decoder.conv_out.parameters():
            p.mul_(decoder_out_scale)
    unet.save_pretrained(folder / "sd" / "unet")
    vae.save_pretrained(folder / "sd" / "vae")
    scheduler = DDPMScheduler.from_config(config.scheduler.to_dict())
    scheduler.save_pretrained(folder / "sd" / "scheduler")
    a = config.adm
    torch.manual_seed(seed + 3)
    adm = perturb_(ADMEncoderTorch(a.image_size, 3, a.model_channels, a.channel_mult, a.num_res_blocks,
                                   a.attention_resolutions, a.num_head_channels).eval(), seed + 3,
                   0.05 * perturbation)
    torch.save(adm.state_dict(), folder / "adm.pt")
    prompt = torch.randn(1, config.prompt_length, config.unet.cross_attention_dim, generator=torch.Generator().manual_seed(seed))
    torch.save(prompt, folder / "prompt_embeds.pt")
    model = AuthorsDOD(unet, vae, adm, a.model_channels * a.channel_mult[-1], scheduler.alphas_cumprod, prompt,
                       config.dod.rank, AUTHORS_UNET_TARGETS, AUTHORS_VAE_REGEX).eval()
    # Everything trained moves off its initialisation: B matrices, the UNet's trained conv_in,
    # M_theta (its prompts and biases too), the DEMs and their w, so a mix-up of any two shows.
    trained = {model.unet: lambda n: "lora" in n or n.startswith("conv_in."),
               model.vae: lambda n: "lora" in n or "sft_blocks" in n or "skip_conv" in n,
               model.mtheta: lambda n: True}
    generator = torch.Generator().manual_seed(trained_seed)
    with torch.no_grad():
        for module, is_trained in trained.items():
            scale = (0.5 if module is model.mtheta else 0.05) * perturbation
            for name, p in module.named_parameters():
                if is_trained(name):
                    p.add_(torch.randn(p.shape, generator=generator) * scale)
    return model


def save_released(model: AuthorsDOD, folder):
    """stage1.pkl and stage2.pkl of `model`, as the authors' code saves them, into `folder`."""
    torch.save(model.stage1_dict(AUTHORS_UNET_TARGETS, AUTHORS_VAE_REGEX), folder / "stage1.pkl")
    torch.save(model.stage2_dict(), folder / "stage2.pkl")


# ------------------------------------------------------------------ their training steps
# REFERENCE.md, "Training in the authors' code": stage 1 trains the generator on l_l2 MSE +
# l_lpips LPIPS-VGG of the clamped restoration + l_dmd DMD, then the fake score on its epsilon
# loss; stage 2 the DEMs and skip convs on MSE + l_ssim (1 - SSIM). AdamW after clip_grad_norm_.

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


class AuthorsScores:
    """DMD's two scores as the authors' code builds them (REFERENCE.md): the real score a frozen
    copy of the base UNet, guided by CFG between the negative prompt and the prompt; the fake
    score another copy with three peft adapters added one after another (the target layers of the
    down blocks and conv_in; of the up blocks and conv_out; the others). `scope` 'official':
    diffusers keeps the last added active, so the mid block's LoRA is what trains (their code);
    'all': all three active (its intent). Fake-score LoRA A starts as dod-jax's (`fake_a`:
    {layer name: A in PyTorch's layout}), B at zero as peft and dod-jax start it."""

    SETS = ("down", "up", "others")

    def __init__(self, folder, prompt, negative_prompt, rank: int, targets, fake_a: dict, scope: str,
                 guidance: float):
        from diffusers import UNet2DConditionModel
        self.real = UNet2DConditionModel.from_pretrained(folder / "sd" / "unet").eval().requires_grad_(False)
        self.fake = UNet2DConditionModel.from_pretrained(folder / "sd" / "unet").eval().requires_grad_(False)
        scheduler = DDPMScheduler.from_pretrained(folder / "sd" / "scheduler")
        self.abar = scheduler.alphas_cumprod.float()
        self.prompt, self.negative_prompt, self.guidance = prompt, negative_prompt, guidance
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
        eps_real = eps_negative + self.guidance * (eps_text - eps_negative)
        eps_fake = self.fake(z_t, t, encoder_hidden_states=prompt).sample
        x0_real, x0_fake = ((z_t - (1 - abar).sqrt() * eps) / abar.sqrt() for eps in (eps_real, eps_fake))
        grad = (x0_fake - x0_real) / (x0.detach() - x0_real).abs().mean(dim=(1, 2, 3), keepdim=True)
        with torch.enable_grad():
            return F.mse_loss(x0, (x0 - grad).detach())

    def fake_loss(self, x0, t, noise):
        """The fake score's epsilon-MSE on the detached generator latent."""
        z_t, _ = self.noised(x0.detach(), t, noise)
        return F.mse_loss(self.fake(z_t, t, encoder_hidden_states=self.prompt.expand(x0.shape[0], -1, -1)).sample, noise)


class AuthorsTraining:
    """The authors' training steps of `stage` on `reference` (an AuthorsDOD): `step(draws)` runs
    one on a dict of NHWC arrays (lq, gt, the posterior noise; stage 1 also dmd_t, dmd_noise,
    fake_t, fake_noise) and returns its loss terms. `weights`: l2, lpips, dmd, ssim; `lpips` the
    lpips package's LPIPS-VGG (stage 1); `scores` an AuthorsScores (stage 1), whose fake score is
    updated after the generator with an AdamW of its own at the same settings."""

    def __init__(self, reference, stage: str, *, lr, weight_decay, betas, clip, weights: dict, lpips=None,
                 scores: AuthorsScores | None = None):
        self.reference, self.stage, self.clip, self.weights = reference, stage, clip, weights
        self.lpips, self.scores = lpips, scores
        self.trained = authors_trained(reference, stage)
        for p in reference.parameters():
            p.requires_grad_(False)
        for p in self.trained.values():
            p.requires_grad_(True)
        adamw = lambda params: torch.optim.AdamW(params, lr=lr, betas=betas, eps=1e-8, weight_decay=weight_decay)
        self.optimisers = [adamw(self.trained.values())]
        if scores is not None:
            for p in scores.parameters:
                p.requires_grad_(True)
            self.optimisers.append(adamw(scores.parameters))
            self.trained = {**self.trained, **scores.trained}

    def step(self, draws: dict) -> dict[str, float]:
        t = {k: torch.from_numpy(np.array(np.transpose(v, (0, 3, 1, 2)) if np.ndim(v) == 4 else v, order="C"))
             for k, v in draws.items()}
        x0, restored = self.reference.generate(t["lq"], t["noise"], use_dems=self.stage == "stage2")  # clamped
        w, gt = self.weights, t["gt"]
        terms = {"mse": F.mse_loss(restored, gt)}
        if self.stage == "stage2":
            terms["ssim"] = torch_ssim(restored, gt).mean()
            terms["loss"] = terms["mse"] + w["ssim"] * (1 - terms["ssim"])
        else:
            terms["lpips"] = self.lpips(restored, gt).mean()
            terms["loss"] = w["l2"] * terms["mse"] + w["lpips"] * terms["lpips"]
            if self.scores is not None:
                terms["dmd"] = self.scores.dmd_loss(x0, t["dmd_t"], t["dmd_noise"])
                terms["loss"] = terms["loss"] + w["dmd"] * terms["dmd"]
        self._update(self.optimisers[0], terms["loss"])
        if self.scores is not None:
            terms["fake_loss"] = self.scores.fake_loss(x0, t["fake_t"], t["fake_noise"])
            self._update(self.optimisers[1], terms["fake_loss"])
        return {k: v.item() for k, v in terms.items()}

    def _update(self, optimiser, loss):
        optimiser.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(optimiser.param_groups[0]["params"], self.clip)
        optimiser.step()

    def first_moments(self) -> dict:
        state = {p: s for opt in self.optimisers for p, s in opt.state.items()}
        return {k: state[p]["exp_avg"].numpy().copy() for k, p in self.trained.items()}

    def parameters(self) -> dict:
        return {k: p.detach().numpy().copy() for k, p in self.trained.items()}
