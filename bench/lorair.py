"""LoRA-IR's restore of one image, dod-jax against the PyTorch re-statement, at Setting I's
sizes (CLIP ViT-L/14-336 router, NAFNet-64 with 28 blocks and 3 rank-8 experts), the same
random weights on both sides.

PyTorch: transformers' CLIPVisionModelWithProjection and a torch router head
(tests/test_lorair_router.py), the IR network of tests/lorair_reference.py, which at batch 1 in
eval mode merges the routed experts into each convolution's weight as the authors' code does;
no_grad, float32, the machine's threads. dod-jax: the restore engine around LoRA-IR's runner
(the router jitted, then the IR network jitted with the experts selected), float32, XLA's
defaults. Both take the same five PIL views; a case is timed from the uint8 image to the
restoration, median of --reps after one warm-up, and its outputs are compared. --train B S adds
one gradient of the IR network on B random S x S crops (the training path: experts routed top-1
per image, each stage's blocks scanned; PyTorch in train mode, backward) as `train`.

    python bench/lorair.py [--sizes 256 512] [--reps 3] [--train 4 128]   -> bench/results/lorair_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from bench.forward import median_seconds  # noqa: E402
from dod_jax import adapters  # noqa: E402
from dod_jax.adapters import top_k_routing  # noqa: E402
from dod_jax.configs import load_config  # noqa: E402
from dod_jax.data.demo import demo_photos  # noqa: E402
from dod_jax.machine import cpu_model  # noqa: E402
from dod_jax.methods.lorair.method import LoRAIRRunner, build_model  # noqa: E402
from dod_jax.methods.lorair.official import EXPERTS, read_ir  # noqa: E402
from dod_jax.methods.lorair.router import read_router, router_views  # noqa: E402
from dod_jax.models.clip import CLIPVisionConfig, CLIPVisionWithProjection  # noqa: E402
from dod_jax.models.layers import NumpyRngs  # noqa: E402
from dod_jax.restore.engine import Restorer, RestoreSettings  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--train", type=int, nargs=2, metavar=("BATCH", "SIZE"))
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    import torch
    from lorair_reference import LoRAIRNet, randomise
    from test_lorair_router import reference_router

    config = load_config(ROOT / "configs" / "lorair.py")
    cfg = config.lorair
    tower, head, router_tensors = reference_router(0, config.clip.to_dict(), cfg.embed_dim, cfg.classes)
    ir = randomise(LoRAIRNet(width=cfg.width, enc=tuple(cfg.enc_blocks), middle=cfg.middle_blocks,
                             dec=tuple(cfg.dec_blocks), embed=cfg.embed_dim, hidden=cfg.dam_hidden,
                             experts=cfg.experts, rank=cfg.rank), seed=1).eval()
    ours = build_model(config, CLIPVisionWithProjection(CLIPVisionConfig.from_transformers(config.clip.to_dict()),
                                                         rngs=NumpyRngs(0)))
    read_router(ours.router, router_tensors, "the reference router")
    read_ir(ours.ir, {k: v.detach().numpy() for k, v in ir.state_dict().items()}, "the reference IR network")
    restorer = Restorer(LoRAIRRunner(ours, use_experts=True), RestoreSettings.from_config(config))
    size_of_views = config.clip.image_size

    def torch_restore(image):
        with torch.no_grad():
            views = torch.from_numpy(router_views(image, size_of_views).transpose(0, 3, 1, 2).copy())
            embeds = tower(pixel_values=views).image_embeds[None]
            e_clip = head["de_extractor"](torch.cat([embeds[:, 0], embeds[:, 1:].mean(1)], dim=-1))
            routing = torch.from_numpy(np.array(top_k_routing(head["cls_head"](e_clip).numpy(), cfg.top_k)))
            lq = torch.from_numpy(image.transpose(2, 0, 1)[None].astype(np.float32) / 255)
            return ir(lq, e_clip, routing).clamp(0, 1)[0].numpy().transpose(1, 2, 0)

    results = {"what": __doc__.split("\n\n")[0].replace("\n", " "), "command": "python bench/lorair.py "
               + " ".join(argv if argv is not None else sys.argv[1:]), "cpu": cpu_model(),
               "machine": platform.machine(), "torch_threads": torch.get_num_threads(), "runs": []}
    photo = demo_photos()["astronaut"]
    for size in args.sizes:
        image = np.asarray(Image.fromarray(photo).resize((size, size)))
        outputs = {}
        torch_s, torch_all = median_seconds(lambda: outputs.__setitem__("torch", torch_restore(image)), args.reps)
        jax_s, jax_all = median_seconds(
            lambda: outputs.__setitem__("jax", restorer.restore([image.astype(np.float32) / 255])[0]), args.reps)
        run = {"size": size, "batch": 1, "jax_seconds": round(jax_s, 3), "torch_seconds": round(torch_s, 3),
               "jax_over_torch": round(jax_s / torch_s, 3), "jax_all": [round(t, 3) for t in jax_all],
               "torch_all": [round(t, 3) for t in torch_all],
               "max_abs_diff": float(np.abs(outputs["jax"] - outputs["torch"]).max())}
        print(json.dumps(run), flush=True)
        results["runs"].append(run)
    if args.train:
        results["train"] = train_case(ours.ir, ir, cfg, *args.train, args.reps)
        print(json.dumps(results["train"]), flush=True)
    path = args.out / "lorair_cpu.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


def train_case(ours, reference, cfg, batch: int, size: int, reps: int) -> dict:
    """One gradient of mean(restored^2) over every IR parameter, dod-jax jitted against PyTorch's
    backward, from the same crops, embeddings and top-1 routing."""
    import torch
    rng = np.random.default_rng(0)
    lq = rng.uniform(0, 1, (batch, size, size, 3)).astype(np.float32)
    embedding = rng.standard_normal((batch, cfg.embed_dim)).astype(np.float32)
    routing = np.eye(cfg.experts, dtype=np.float32)[np.arange(batch) % cfg.experts]
    graphdef, state = nnx.split(ours)

    def loss(state):
        with adapters.select(EXPERTS, routing=jnp.asarray(routing)):
            restored = nnx.merge(graphdef, state)(jnp.asarray(lq), jnp.asarray(embedding), scan=True)
        return jnp.mean(restored ** 2), restored

    gradient = jax.jit(jax.grad(loss, has_aux=True))
    outputs = {}
    jax_s, jax_all = median_seconds(
        lambda: outputs.__setitem__("jax", np.asarray(jax.block_until_ready(gradient(state))[1])), reps)
    reference.train()
    torch_in = [torch.from_numpy(a) for a in (lq.transpose(0, 3, 1, 2).copy(), embedding, routing)]

    def torch_step():
        reference.zero_grad()
        restored = reference(*torch_in)
        (restored ** 2).mean().backward()
        outputs["torch"] = restored.detach().numpy().transpose(0, 2, 3, 1)

    torch_s, torch_all = median_seconds(torch_step, reps)
    reference.eval()
    return {"batch": batch, "size": size, "jax_seconds": round(jax_s, 3), "torch_seconds": round(torch_s, 3),
            "jax_over_torch": round(jax_s / torch_s, 3), "jax_all": [round(t, 3) for t in jax_all],
            "torch_all": [round(t, 3) for t in torch_all],
            "max_abs_diff": float(np.abs(outputs["jax"] - outputs["torch"]).max())}


if __name__ == "__main__":
    sys.exit(main())
