"""LoRA-IR (Setting I of the authors' release; ../shared/LORA_IR.md): the DG-Router on CLIP
ViT-L/14-336 and NAFNet-64 with DAM heads and 3 routed rank-8 experts on every convolution,
trained in three stages (train.stage): 'router' (the router's MLP and head, cross-entropy on
the task labels), 'stage1' (the IR network without experts, PSNR loss) and 'stage2' (with the
experts). Where the paper and the authors' code differ, the code is the default and the paper a
switch (lorair.finetune)."""

from ml_collections import ConfigDict, config_dict

from configs import dod

LPIPS_WEIGHTS = dod.LPIPS_WEIGHTS


def get_config() -> ConfigDict:
    config = ConfigDict()
    config.method = "lorair"
    # The frozen CLIP tower: a transformers CLIPVisionModelWithProjection folder
    # (openai/clip-vit-large-patch14-336 saved with save_pretrained), or random weights in the
    # `clip` shapes when random_seed >= 0 (tests and demos only). dtype: how it is stored.
    config.base = ConfigDict({"clip": "", "random_seed": -1, "dtype": "float32", "attention": "auto"})
    config.clip = ConfigDict({"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                              "num_attention_heads": 16, "image_size": 336, "patch_size": 14, "projection_dim": 768})
    config.lorair = ConfigDict({
        "width": 64, "enc_blocks": (1, 1, 1, 28), "middle_blocks": 1, "dec_blocks": (1, 1, 1, 1),
        "embed_dim": 384,           # the degradation embedding e_clip
        "dam_hidden": 128,
        "classes": 3,               # the router's classes: the tasks of the data, in the stage ratio's order
        "experts": 3, "rank": 8,
        "alpha": 16.0,              # the code: alpha = 2r, scale 2
        "top_k": 1,                 # experts per image (softmax over the top k router logits)
        # NAFNet-TLC's local SCA pooling as (train_size, base_size), e.g. (256, 384); None: global
        # pooling, what the authors' code does in effect (its windows are fixed lazily at the
        # first forward, so the training crops and a first test image pool globally)
        "tlc": config_dict.placeholder(tuple),
        # Stage 2 trains 'all' parameters of the IR network (the code: it marks only the LoRA
        # trainable, then sets requires_grad on everything) or 'experts' only (the paper's
        # parameter-efficient fine-tuning)
        "finetune": "all",
        # Per stage: AdamW (the router: Adam, weight decay 0), cosine from lr to final_lr over
        # train.steps, gradient-norm clip (None: none), as the authors' configs
        "optim": {
            "router": {"lr": 2e-4, "final_lr": 1e-5, "betas": (0.9, 0.999), "weight_decay": 0.0,
                       "clip": config_dict.placeholder(float)},
            "stage1": {"lr": 1e-3, "final_lr": 5e-4, "betas": (0.9, 0.9), "weight_decay": 1e-3, "clip": 0.01},
            "stage2": {"lr": 1e-4, "final_lr": 1e-5, "betas": (0.9, 0.9), "weight_decay": 1e-3, "clip": 0.01},
        },
    })
    config.data = ConfigDict({
        "root": "", "layout": "aio3", "tfds_dir": "",
        # crops per task in a batch; the authors draw tasks uniformly
        "router_ratio": "derain:1,dehaze:1,denoise:1", "stage1_ratio": "derain:1,dehaze:1,denoise:1",
        "stage2_ratio": "derain:1,dehaze:1,denoise:1",
    })
    config.train = ConfigDict({
        "stage": "router",          # router | stage1 | stage2
        "init_from": "",            # stage1: the router run; stage2: the stage-1 run
        "steps": 200_000, "seed": 0,
        "units": 8,                 # batch = units x sum(ratio) crops per process
        "scale_batch": True, "crop": 256, "micro_batches": 1, "dtype": "float32",
        "lpips_weights": str(LPIPS_WEIGHTS),  # evaluate.py's LPIPS-VGG
        "log_every": 50, "sample_every": 1000, "checkpoint_every": 2000, "keep": 3,
    })
    # Restore as the authors' test script: no lift of small images, the network pads to 16 itself.
    config.restore = ConfigDict({"bucket": 16, "tile": 512, "tile_overlap": 64, "tile_above": 4096 * 4096,
                                 "min_side": 0, "color_fix": "none", "fit": "pad", "tiling": "pixel"})
    config.parallel = dod.get_config().parallel
    return config
