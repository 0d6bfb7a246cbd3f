"""DOD on Stable Diffusion 2.1-base: the SD configs plus the MFM backbone (ADM) and the DOD
model's own settings, at the authors' code defaults. Paper values and the ablations are
switches here (REFERENCE.md lists where paper and code differ)."""

from pathlib import Path

from ml_collections import ConfigDict, config_dict

from configs import sd21_base

LPIPS_WEIGHTS = Path(__file__).resolve().parent.parent / ".venv" / "weights" / "lpips_vgg16.safetensors"

# UNet layers carrying the generator's conditional LoRA (matched by path suffix).
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                "conv1", "conv2", "conv_shortcut", "conv", "conv_out"]
# VAE-encoder layers carrying LoRA (under encoder.; quant_conv is not a target), in the order of the
# authors' regex ^encoder\..*(conv1|conv2|...)$, which an export writes back.
VAE_TARGETS = ["conv1", "conv2", "conv_in", "conv_shortcut", "conv", "conv_out", "to_k", "to_q", "to_v", "to_out.0"]


def get_config() -> ConfigDict:
    config = sd21_base.get_config()
    config.method = "dod"  # the restoration method (dod_jax.methods registry): this file configures DOD
    config.prompt_length = 77  # tokens of the prompt embedding (CLIP's max length)
    # guided-diffusion's 256x256 unconditional ImageNet model (dod_jax.models.adm.ADMConfig fields).
    config.adm = ConfigDict({
        "image_size": 256, "model_channels": 256, "channel_mult": (1, 1, 2, 2, 4, 4), "num_res_blocks": 2,
        "attention_resolutions": (32, 16, 8), "num_head_channels": 64,
    })
    config.dod = ConfigDict({
        "rank": 8,                  # LoRA rank r (paper Table 6: 4 / 8 / 16)
        "alpha": config_dict.placeholder(float),  # None: alpha = rank, scale 1 (the code)
        "clora": True,              # False: plain LoRA in the UNet (ablation, Table 4)
        "clora_in_vae": False,      # True: the VAE-encoder LoRA is conditional too (Table 5)
        "literal_gamma": False,     # False: gamma = 1 + M_theta output; True: gamma = output (paper's literal form)
        "prompts": "group",         # 'group': one prompt per UNet block group (code); 'layer': per CLoRA layer (paper)
        "modulator": {"hidden": 256, "prompt_dim": 64, "init_scale": 1e-5},
        # 'official' (code): M_theta's Linears Kaiming-normal x init_scale with zero biases
        # (basicsr's default_init_weights), the DEMs' RRDB convs Kaiming-normal x 0.1 (ESRGAN);
        # 'default': PyTorch's default inits (M_theta's weights and biases scaled by init_scale).
        "init": "official",
        "unet_targets": UNET_TARGETS,
        "vae_targets": VAE_TARGETS,
        "hde": {
            "enabled": True,        # False: no DEMs (ablation, Table 4)
            "skip_init": 1e-5,      # SkipConv constant init (code); 0.0 is the paper's zero init
            "w_init": 1.0,
            "growth": 32,           # RRDB growth channels
        },
        # What the MFM (ADM) sees: a copy of the unpadded LQ resized to mfm_size x mfm_size, or with
        # 0 the LQ itself at full resolution. The authors' training runs it on the 256-pixel crop
        # itself (so 256 changes nothing there); the runner of their released model gives it a
        # bicubic, antialiased 256 x 256 copy at test time. mfm_resize: 'bicubic' or 'bilinear'.
        "mfm_size": 256,
        "mfm_resize": "bicubic",
        # z from the posterior: 'sample' (the authors' code: restore and evaluate draw it from
        # --seed, training from the run's key) or 'mode' (the mean: deterministic without a seed).
        "latent": "sample",
        "timestep": 999,
    })
    # The frozen base: an SD 2.1-base pipeline folder, the converted ADM encoder and the prompt
    # embeddings (README: "The DOD model"). random_seed >= 0 uses random base weights instead
    # (tests and the demo; never for results). dtype: how the frozen UNet, VAE, ADM encoder and
    # LPIPS are stored: 'bfloat16' halves their bytes and each FSDP gather (the authors' code holds
    # them in fp16; here they are rounded once and computed with in train.dtype); the
    # trained parts (LoRA, conv_in copy, M_theta, DEMs, skip convs) and the optimiser stay float32.
    # attention: how the UNet, VAE and ADM compute attention (models.layers.dot_product_attention):
    # 'auto' (query chunks on CPU, jax's default elsewhere), 'chunked', 'xla', 'cudnn' (GPU).
    config.base = ConfigDict({"sd": "", "adm": "", "prompts": "", "random_seed": -1, "dtype": "float32",
                              "attention": "auto"})
    config.data = ConfigDict({
        "root": "",                 # a folder in `layout`, or "demo" for the built-in demo set
        "layout": "aio3",           # aio3 | aio5 | cdd11 (dod_jax.data.layouts)
        "tfds_dir": "",             # prepared array_record splits (dod_jax.data.tfds_builder) instead of root
        # crops per task in a batch, 'task:n,task:n'; '' = REFERENCE.md's (3:2:2 and 1:1:1 over AIO-3)
        "stage1_ratio": "", "stage2_ratio": "",
    })
    config.train = ConfigDict({
        "stage": "stage1",          # stage1 | stage2
        "init_from": "",            # stage 2: the stage-1 run directory (or one of its checkpoint steps)
        "steps": 100_000,
        "seed": 0,
        "units": 1,                 # batch = units x sum(ratio) crops (7 in stage 1, 3 in stage 2) per process
        # True: units raised to the smallest multiple whose global batch the devices (and
        # micro_batches) divide, with a line saying so (7 crops on 8 devices: units 8, 56 crops);
        # False: such a mesh is refused
        "scale_batch": True,
        "crop": 256,
        "micro_batches": 1,         # gradient accumulation: the batch in this many slices
        # Rematerialise the UNet's and VAE's blocks in the backward pass: 'none', 'blocks' (keep
        # nothing of a block: least memory, its forward runs twice) or 'dots' (keep its matmul and
        # convolution outputs; models.layers.REMAT_POLICIES). True / False in saved configs.
        "remat": "none",
        "dtype": "float32",         # compute dtype (bfloat16 on accelerators); trained parameters stay float32
        # What stage 1's DMD real score (the frozen UNet with classifier-free guidance) computes in:
        # None = train.dtype; 'bfloat16' as the authors' code runs it in fp16 (half the activation
        # bytes of that pass; the fake score, the generator and the losses keep train.dtype).
        "real_score_dtype": config_dict.placeholder(str),
        "lr": 5e-5, "fake_lr": 5e-5, "betas": (0.9, 0.999), "weight_decay": 1e-2,
        # Both optimisers' learning rate over the run: 'constant' (the authors' code) or 'cosine'
        # (linear warm-up from 0 over `warmup` steps, then cosine decay to final_lr_fraction x lr
        # at train.steps). A resumed run continues the schedule where it stopped.
        "lr_schedule": "constant", "warmup": 0, "final_lr_fraction": 0.0,
        "clip": 1.0, "fake_clip": 1.0,
        "loss_weights": "code",     # code: l2 2, lpips 5, dmd 1, ssim 0.1; paper: 1, 2, 1, 0.2
        # explicit overrides of single weights (typed placeholders, so --config.train.weights.lpips=0 works)
        "weights": {k: config_dict.placeholder(float) for k in ("l2", "lpips", "dmd", "ssim")},
        "fake_updates": 1,          # fake-score updates per generator update
        "fake_rank": 8,
        # Where the fake score's LoRA sits (dod_jax.methods.dod.steps.FAKE_SCOPES). 'official', the
        # default: what the authors' code trains in effect (three peft adapters are added, the
        # last, "others", is the only active one: the mid block), so that a run reproduces the
        # training of the released weights; 'all': every target layer and conv_in, the code's evident intent.
        "fake_scope": "official",
        # The generator's output clamped to [-1, 1] before the image losses (MSE and LPIPS in
        # stage 1, MSE and SSIM in stage 2), as the authors' code; False: unclamped.
        "clamp_output": True,
        "lpips_weights": str(LPIPS_WEIGHTS),  # make writes it (README: LPIPS)
        "log_every": 50, "sample_every": 1000, "checkpoint_every": 2000, "keep": 3,
    })
    # How restore and evaluate.py restore with a model of this config unless their command line
    # (or --preset official, dod_jax.methods.dod.restore.PRESETS) says otherwise
    # (dod_jax.restore.engine.RestoreSettings): short sides below `min_side` lifted first (256,
    # as the authors' code); sides to multiples of 8 by `fit` ('pad': reflect padding; 'resize':
    # Lanczos down, as the runner of the authors' release), then padded to multiples of `bucket`;
    # above `tile_above` padded pixels, tiles of `tile` pixels overlapping by `tile_overlap`,
    # by `tiling` ('pixel': VAE and UNet on pixel tiles, memory bounded by one tile; 'latent':
    # the VAE whole and the UNet alone on latent tiles, as the authors' code); colour fix.
    config.restore = ConfigDict({"bucket": 64, "tile": 512, "tile_overlap": 64, "tile_above": 1024 * 1024,
                                 "min_side": 256, "color_fix": "none", "fit": "pad", "tiling": "pixel"})
    config.parallel = ConfigDict({
        "devices": 0,               # how many devices the mesh takes (0 = all)
        "data": -1, "fsdp": 1,      # mesh shape; -1 = all devices left
        "shard_frozen": False,      # FSDP-shard the frozen base by the rules (else replicated)
        "rules": (("embed", None), ("mlp", "fsdp"), ("conv_in", None), ("conv_out", "fsdp"), ("vector", None)),
        "coordinator": "", "num_processes": 0, "process_id": -1,  # multi-host (or DOD_* env, TPU/SLURM auto)
    })
    return config
