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
"""

from __future__ import annotations

import re

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
