"""AIO-3 (dehaze, derain, denoise) on SD 2.1-base: stage 1 by default, at the authors' code
settings. Point base.* at the weights and data.root at the AIO-3 folder (README: Data):

    python train.py --config configs/aio3.py --workdir runs/aio3_s1 \\
        --config.base.sd=stable-diffusion-2-1-base --config.base.adm=adm_256_uncond_encoder.safetensors \\
        --config.base.prompts=prompts.safetensors --config.data.root=data/aio3
    python train.py --config configs/aio3.py --workdir runs/aio3_s2 ... \\
        --config.train.stage=stage2 --config.train.init_from=runs/aio3_s1/checkpoints
"""

from configs import dod


def get_config():
    config = dod.get_config()
    config.data.layout = "aio3"
    return config
