"""AIO-5 (AIO-3 plus deblur and low light) on SD 2.1-base. The paper gives no AIO-5 ratio; the
default ratios name the AIO-3 tasks only, so GoPro and LOL-v1 join here with weights of the
same size as the others."""

from configs import dod


def get_config():
    config = dod.get_config()
    config.data.layout = "aio5"
    config.data.stage1_ratio = "dehaze:3,derain:2,denoise:2,deblur:2,lowlight:2"
    config.data.stage2_ratio = "dehaze:1,derain:1,denoise:1,deblur:1,lowlight:1"
    return config
