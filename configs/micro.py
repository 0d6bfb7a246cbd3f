"""The tiny config cut to two levels everywhere (UNet, VAE, ADM), one layer per block, a
32x32 MFM input and 32x32 crops: the training tests' model. Its steps compile in about half
the tiny config's time with every block type and loss term still in them."""

from configs import tiny


def get_config():
    config = tiny.get_config()
    config.unet.update({"attention_head_dim": [2, 4], "block_out_channels": [32, 32], "layers_per_block": 1,
                        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
                        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"]})
    config.vae.update({"block_out_channels": [32, 64], "down_block_types": ["DownEncoderBlock2D"] * 2,
                       "up_block_types": ["UpDecoderBlock2D"] * 2})
    config.adm.update({"image_size": 32, "channel_mult": (1, 2), "num_res_blocks": 1, "attention_resolutions": (2,)})
    config.dod.mfm_size = 32
    config.prompt_length = 8
    config.train.crop = 32
    return config
