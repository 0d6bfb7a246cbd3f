"""A tiny DOD: a model of the SD 2.x family (same block types, linear projections, GEGLU, VAE
with mid attention), a small ADM and the DOD defaults with a small MFM input, small enough to
build, save, load and run in seconds on a CPU."""

from ml_collections import ConfigDict

from configs import dod


def get_config() -> ConfigDict:
    config = dod.get_config()
    config.unet.update({
        "attention_head_dim": [2, 4, 4],
        "block_out_channels": [32, 64, 64],
        "cross_attention_dim": 64,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "sample_size": 16,
    })
    config.vae.update({
        "block_out_channels": [32, 32, 64, 64],
        "layers_per_block": 1,
        "sample_size": 128,
    })
    config.adm.update({"image_size": 64, "model_channels": 32, "channel_mult": (1, 2, 2),
                       "attention_resolutions": (16,), "num_head_channels": 16})
    config.dod.mfm_size = 64
    config.image_size = 128
    config.base.random_seed = 0
    config.data.root = "demo"
    config.train.update({"steps": 60, "crop": 64, "lr": 1e-3, "fake_lr": 1e-3,
                         "log_every": 5, "sample_every": 20, "checkpoint_every": 20})
    return config
