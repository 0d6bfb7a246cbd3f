"""DOD on Stable Diffusion 2.1-base: the SD configs plus the MFM backbone (ADM) and the DOD
model's own settings, at the authors' code defaults. Paper values and the ablations are
switches here (REFERENCE.md lists where paper and code differ)."""

from ml_collections import ConfigDict

from configs import sd21_base

# UNet layers carrying the generator's conditional LoRA (matched by path suffix).
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                "conv1", "conv2", "conv_shortcut", "conv", "conv_out"]
# VAE-encoder layers carrying LoRA (under encoder.; quant_conv is not a target).
VAE_TARGETS = ["conv_in", "conv1", "conv2", "conv_shortcut", "conv", "conv_out", "to_q", "to_k", "to_v", "to_out.0"]


def get_config() -> ConfigDict:
    config = sd21_base.get_config()
    config.prompt_length = 77  # tokens of the prompt embedding (CLIP's max length)
    # guided-diffusion's 256x256 unconditional ImageNet model (dod_jax.models.adm.ADMConfig fields).
    config.adm = ConfigDict({
        "image_size": 256, "model_channels": 256, "channel_mult": (1, 1, 2, 2, 4, 4), "num_res_blocks": 2,
        "attention_resolutions": (32, 16, 8), "num_head_channels": 64,
    })
    config.dod = ConfigDict({
        "rank": 8,                  # LoRA rank r (paper Table 6: 4 / 8 / 16)
        "alpha": None,              # None: alpha = rank, scale 1 (the code)
        "clora": True,              # False: plain LoRA in the UNet (ablation, Table 4)
        "clora_in_vae": False,      # True: the VAE-encoder LoRA is conditional too (Table 5)
        "literal_gamma": False,     # False: gamma = 1 + M_theta output; True: gamma = output (paper's literal form)
        "prompts": "group",         # 'group': one prompt per UNet block group (code); 'layer': per CLoRA layer (paper)
        "modulator": {"hidden": 256, "prompt_dim": 64, "init_scale": 1e-5},
        "unet_targets": UNET_TARGETS,
        "vae_targets": VAE_TARGETS,
        "hde": {
            "enabled": True,        # False: no DEMs (ablation, Table 4)
            "skip_init": 1e-5,      # SkipConv constant init (code); 0.0 is the paper's zero init
            "w_init": 1.0,
            "growth": 32,           # RRDB growth channels
        },
        "mfm_size": 256,            # MFM on a resized copy of the LQ; 0 = full resolution (the code at test time)
        "latent": "sample",         # z from the posterior: 'sample' (code, needs a key) or 'mode'
        "timestep": 999,
    })
    return config
