"""One-step forward at the SD 2.1-base config: VAE encode -> UNet at t=999 -> x0 -> VAE decode.

dod_jax (jitted) against diffusers' PyTorch models holding the same random weights (written
by diffusers, read by our loader). Prints median wall times, their ratio and XLA's FLOP count
of the jitted function, and writes bench/results/forward_<device>.json.

    python bench/forward.py [--sizes 256 512] [--reps 5] [--batch 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from dod_jax.configs import load_config  # noqa: E402
from dod_jax.schedule import DDPMSchedule  # noqa: E402
from dod_jax.weights.diffusers import SDPipeline, load_diffusers_model  # noqa: E402
from sd_one_step import one_step  # noqa: E402


def median_seconds(fn, reps: int, warmup: int = 1) -> tuple[float, list[float]]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def jax_unet_step(unet):
    graphdef, state = nnx.split(unet)

    @jax.jit
    def step(state, z, context):
        return nnx.merge(graphdef, state)(z, jnp.full((z.shape[0],), 999), context)

    return step, state


def torch_forward(unet, vae, schedule_torch):
    import torch
    sf = vae.config.scaling_factor
    abar = schedule_torch.alphas_cumprod[999]

    @torch.no_grad()
    def forward(image, context):
        z = vae.encode(image).latent_dist.mode() * sf
        t = torch.full((image.shape[0],), 999)
        eps = unet(z, t, context).sample
        x0 = (z - (1 - abar).sqrt() * eps) / abar.sqrt()
        return vae.decode(x0 / sf).sample

    return forward


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()

    import diffusers
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    cfg = load_config(ROOT / "configs" / "sd21_base.py")
    strip = lambda d: {k: v for k, v in d.items() if not k.startswith("_")}
    torch.manual_seed(0)
    t_unet, t_vae = UNet2DConditionModel(**strip(cfg.unet.to_dict())).eval(), AutoencoderKL(**strip(cfg.vae.to_dict())).eval()
    with tempfile.TemporaryDirectory() as tmp:
        t_unet.save_pretrained(f"{tmp}/unet")
        t_vae.save_pretrained(f"{tmp}/vae")
        unet, vae = load_diffusers_model(f"{tmp}/unet"), load_diffusers_model(f"{tmp}/vae")
    schedule = DDPMSchedule.from_config(cfg.scheduler.to_dict())
    forward, state = one_step(SDPipeline(unet, vae, schedule))
    unet_step_fn, unet_state = jax_unet_step(unet)
    t_forward = torch_forward(t_unet, t_vae, DDPMScheduler.from_config(strip(cfg.scheduler.to_dict())))

    device = jax.devices()[0]
    results = {
        "what": "VAE encode + one UNet step (t=999) + VAE decode, SD 2.1-base config, random weights, float32",
        "device": f"{device.platform}: {device.device_kind}", "cpu_count": os.cpu_count(),
        "machine": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
        "versions": {"jax": jax.__version__, "torch": torch.__version__, "diffusers": diffusers.__version__},
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "batch": args.batch, "reps": args.reps, "runs": [],
    }
    rng = np.random.default_rng(0)
    for size in args.sizes:
        image = rng.uniform(-1, 1, (args.batch, size, size, 3)).astype(np.float32)
        context = rng.standard_normal((args.batch, 77, 1024)).astype(np.float32)
        image_j, context_j = jnp.asarray(image), jnp.asarray(context)
        t0 = time.perf_counter()
        compiled = forward.lower(state, image_j, context_j).compile()
        compile_s = time.perf_counter() - t0
        flops = (compiled.cost_analysis() or {}).get("flops")
        jax_s, jax_all = median_seconds(lambda: compiled(state, image_j, context_j).block_until_ready(), args.reps)
        image_t, context_t = torch.from_numpy(image.transpose(0, 3, 1, 2).copy()), torch.from_numpy(context)
        torch_s, torch_all = median_seconds(lambda: t_forward(image_t, context_t), args.reps)
        z = jnp.asarray(rng.standard_normal((args.batch, size // 8, size // 8, 4)), jnp.float32)
        unet_step = unet_step_fn.lower(unet_state, z, context_j).compile()
        jax_unet_s, _ = median_seconds(lambda: unet_step(unet_state, z, context_j).block_until_ready(), args.reps)
        z_t, t_t = torch.from_numpy(np.asarray(z).transpose(0, 3, 1, 2).copy()), torch.full((args.batch,), 999)
        with torch.no_grad():
            torch_unet_s, _ = median_seconds(lambda: t_unet(z_t, t_t, context_t), args.reps)
        out_j = np.asarray(compiled(state, image_j, context_j))
        out_t = t_forward(image_t, context_t).numpy().transpose(0, 2, 3, 1)
        run = {"size": size, "latent": size // 8, "jax_median_s": jax_s, "torch_median_s": torch_s,
               "torch_over_jax": torch_s / jax_s, "jax_times_s": jax_all, "torch_times_s": torch_all,
               "unet_only": {"jax_median_s": jax_unet_s, "torch_median_s": torch_unet_s,
                             "torch_over_jax": torch_unet_s / jax_unet_s},
               "jax_compile_s": compile_s, "xla_flops": flops, "max_abs_diff_vs_torch": float(np.abs(out_j - out_t).max())}
        results["runs"].append(run)
        print(f"{size}x{size} (latent {size // 8}): dod_jax {jax_s:.3f}s  diffusers {torch_s:.3f}s  "
              f"torch/jax {torch_s / jax_s:.2f}x  XLA flops {flops:.3e}  compile {compile_s:.1f}s  "
              f"max|diff| {run['max_abs_diff_vs_torch']:.1e}; UNet alone: dod_jax {jax_unet_s:.3f}s "
              f"diffusers {torch_unet_s:.3f}s torch/jax {torch_unet_s / jax_unet_s:.2f}x", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    tag = "_onednn" if "xla_cpu_use_onednn=true" in results["xla_flags"] else ""
    path = args.out / f"forward_{device.platform}{tag}.json"
    path.write_text(json.dumps(results, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
