"""LoRA-IR at toy sizes on random weights, for tests and demos: a 2-layer CLIP on 32-pixel
views, NAFNet width 16 with one block per stage but two in the last encoder stage (so training
goes through models.nafnet.scanned), rank-2 experts, 32-pixel crops of the demo set."""

from ml_collections import ConfigDict

from configs import lorair


def get_config() -> ConfigDict:
    config = lorair.get_config()
    config.base.random_seed = 0
    config.clip.update(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       image_size=32, patch_size=8, projection_dim=16)
    config.lorair.update(width=16, enc_blocks=(1, 1, 1, 2), embed_dim=24, dam_hidden=16, rank=2, alpha=4.0)
    config.train.update(units=1, crop=32, steps=20, log_every=5, sample_every=20, checkpoint_every=10)
    config.data.update(root="demo", layout="aio5")
    return config
