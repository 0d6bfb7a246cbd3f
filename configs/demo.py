"""The main job's DOD: the tiny config's architecture on a base the project pretrained itself
on the built-in demo photos (dod_jax/assets/demo_base, loaded through the real loaders), with
training settings that fit the demo's time on a 2-core CPU.

The `pretrain` section is the recipe of that base (dod_jax.methods.dod.pretrain_base), which
reproduces the shipped files:

    python -m dod_jax.methods.dod.pretrain_base --config configs/demo.py --out dod_jax/assets/demo_base
"""

from pathlib import Path

from ml_collections import ConfigDict

from configs import tiny

DEMO_BASE = Path(__file__).resolve().parent.parent / "dod_jax" / "assets" / "demo_base"


def get_config() -> ConfigDict:
    config = tiny.get_config()
    # 16 latent channels (as SD 3's VAE) instead of SD 2.1's 4: at 8x downsampling the tiny VAE
    # then keeps enough of a photo to reconstruct it sharply after minutes of training.
    config.vae.latent_channels = 16
    # One GroupNorm group instead of SD's 32: at the tiny VAE's 32 channels, 32 groups normalise
    # every channel on its own, which takes each crop's colour out of the features; with 32-pixel
    # crops the VAE then missed held-out photos' colours by up to 45 levels (chelsea / coffee:
    # 17.3 / 13.5 dB against 22.9 / 19.9 dB with one group, after 300 steps; measured on
    # diffusers' AutoencoderKL in PyTorch, which trains as ours does).
    config.vae.norm_num_groups = 1
    config.unet.update({"in_channels": 16, "out_channels": 16})
    config.base.update({"sd": str(DEMO_BASE / "sd"), "adm": str(DEMO_BASE / "adm.safetensors"),
                        "prompts": str(DEMO_BASE / "prompts.safetensors"), "random_seed": -1})
    # The MFM sees the LQ at its own resolution (the authors' code at test time): training crops
    # are 64 pixels and test photos 256 x 384, so a fixed-size resized copy would show the ADM
    # noise and rain at another scale in training than at test.
    config.dod.mfm_size = 0
    # The fake score's LoRA on every target layer and conv_in (the authors' intent, not what
    # their code trains in effect): the demo's steps and learning rates were tuned with it
    # (before conv_in joined it).
    config.train.fake_scope = "all"
    # One crop per task and step: at a fixed time budget, more and smaller steps train further.
    config.data.stage1_ratio = "dehaze:1,derain:1,denoise:1"
    # The networks only ever see 64-pixel crops (the base's VAE and UNet, and DOD's training),
    # so restore in tiles of that size: whole 256 x 384 photos would give GroupNorm and
    # attention statistics they never saw.
    config.restore.update({"tile": 64, "tile_overlap": 16, "tile_above": 0})
    # DEMs with 16 growth channels instead of the authors' 32: their RRDBs at the tiny VAE's full
    # resolution were most of a stage-2 step (2.3 s against 1.1 s on a 2-core Xeon: weight
    # gradients of convolutions run at 10-50 GFLOP/s on XLA:CPU), and the smaller DEMs restore
    # better after the same 300 steps (average PSNR / SSIM / LPIPS-VGG on the demo test photos:
    # 18.67 / 0.621 / 0.399 against 17.65 / 0.590 / 0.419 with 32).
    config.dod.hde.growth = 16
    # Few checkpoints and sample sheets: each costs seconds of the demo's minutes.
    config.train.update({"log_every": 10, "sample_every": 100, "checkpoint_every": 100})
    # The main job's two runs (dod_jax.demo): per-stage values for `train`. Stage 2 is where the
    # demo gains its perceptual quality: the DEMs learn to carry the LQ's full-resolution detail
    # past the tiny VAE's bottleneck, and they need the steps. Measured on the demo test photos
    # (stage 1 / stage 2 steps at stage-2 lr: LPIPS-VGG, against the LQ's 0.434): 300 / 120 at
    # 3e-4: 0.500; 300 / 200 at 1e-3: 0.442; 300 / 300 at 1e-3: 0.409; 200 / 300 at 1e-3: 0.406
    # (and PSNR 19.86 dB, against 19.29 with 300 stage-1 steps); 150 / 300: 0.428; stage 2 at
    # 2e-3 diverges (150 steps: 0.471, PSNR 16.6 dB); 200 / 300 with train.lr_schedule 'cosine'
    # (20 warm-up steps, decay to 0): PSNR 20.61 dB but LPIPS-VGG 0.434, smoother outputs.
    config.demo = ConfigDict({"stage1": {"steps": 200}, "stage2": {"steps": 300, "lr": 1e-3}})
    config.pretrain = ConfigDict({
        "seed": 0,
        # The VAE: an autoencoder on LQ and GT crops of the demo's training photos; MSE + LPIPS-VGG
        # + KL (per latent position, summed over channels), AdamW with warm-up and cosine decay.
        # A term weighted 0 is left out of the step (LPIPS 0: VGG's passes too, half a step).
        # Many small crops rather than few large ones: at the same pixels per step, 16 crops of
        # 32 reconstructed held-out photos 2-5 dB better than 4 of 64 after 300 steps (PyTorch).
        "vae_steps": 1500, "vae_crop": 32, "vae_units": 4, "vae_lr": 1e-3,
        "l1": 0.0, "mse": 1.0, "lpips": 0.1, "kl": 1e-4,
        # The UNet: epsilon prediction on the frozen VAE's scaled latents at t ~ U{0..999};
        # GT crops carry the prompt embedding, LQ crops the negative prompt, so that DMD's
        # classifier-free guidance (real score) points from degraded towards clean.
        "unet_steps": 1200, "unet_crop": 128, "unet_units": 1, "unet_lr": 1e-3,
        "warmup": 100, "final_lr_fraction": 0.05, "weight_decay": 1e-4, "clip": 1.0,
        # Crops per task in a batch (the VAE and UNet see each crop's LQ and GT).
        "ratio": "dehaze:1,derain:1,denoise:2",
    })
    return config
