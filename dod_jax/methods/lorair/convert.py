"""The authors' released LoRA-IR weights -> a restore bundle that `restore --ckpt` and
`evaluate.py --ckpt` take:

    python -m dod_jax.methods.lorair.convert --router setting1_router.pth --ir setting1_ir.pth \\
        --out lorair_bundle [--config configs/lorair.py]

Both files are read with dod_jax.weights.torch_pickle (no torch; their `params` dicts), every
tensor by name and shape (the router's in dod_jax.methods.lorair.router, the IR network's in
.official). The router file carries the whole CLIP tower (bfloat16); it goes into the bundle as
its base (`clip/`, a transformers CLIPVisionModelWithProjection folder in float32), so the
bundle needs nothing else. The sizes come from the config (Setting I's by default); an IR file
without experts makes a stage-1 bundle (restored without them).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dod_jax.configs import load_config
from dod_jax.errors import reported
from dod_jax.files import file_identity
from dod_jax.methods.lorair.method import build_model
from dod_jax.methods.lorair.official import has_experts, read_ir
from dod_jax.methods.lorair.router import read_router
from dod_jax.models.clip import CLIPVisionConfig, CLIPVisionWithProjection
from dod_jax.models.layers import NumpyRngs
from dod_jax.restore.bundle import save_bundle
from dod_jax.weights import torch_pickle
from dod_jax.weights.clip import save_clip_vision
from dod_jax.weights.diffusers import WeightsError

ROOT = Path(__file__).resolve().parents[3]
CLIP_DIR = "clip"


def read_params(path: Path) -> dict:
    loaded = torch_pickle.load(path)
    if not isinstance(loaded, dict) or not isinstance(loaded.get("params"), dict):
        raise WeightsError(f"{path}: holds no 'params' dict, as the authors' LoRA-IR checkpoints do")
    return loaded["params"]


def import_lorair(router_file: Path, ir_file: Path, config_path: Path, out: Path) -> Path:
    """Write the restore bundle `out` of the authors' router and IR files (nothing on error)."""
    router_params, ir_params = read_params(router_file), read_params(ir_file)
    config = load_config(config_path)
    tower = CLIPVisionWithProjection(CLIPVisionConfig.from_transformers(config.clip.to_dict()),
                                     attention_impl=config.base.attention, rngs=NumpyRngs(0))
    model = build_model(config, tower)
    read_router(model.router, router_params, str(router_file))
    read_ir(model.ir, ir_params, str(ir_file))
    config.base.update(clip=CLIP_DIR, random_seed=-1)
    provenance = {"imported_from": {"router": file_identity(router_file), "ir": file_identity(ir_file)},
                  "command": "python -m dod_jax.methods.lorair.convert"}
    return save_bundle(model, config, "stage2" if has_experts(ir_params) else "stage1", out,
                       files={CLIP_DIR: lambda p: save_clip_vision(tower, p)}, provenance=provenance)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dod_jax.methods.lorair.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("--router", required=True, type=Path, help="setting1_router.pth")
    parser.add_argument("--ir", required=True, type=Path, help="setting1_ir.pth")
    parser.add_argument("--out", required=True, type=Path, help="the bundle folder to create")
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "lorair.py",
                        help="the sizes of the released model (Setting I's by default)")
    args = parser.parse_args(argv)
    with reported(parser.prog):
        out = import_lorair(args.router, args.ir, args.config, args.out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
