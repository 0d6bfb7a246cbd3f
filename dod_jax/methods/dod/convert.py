"""The authors' released DOD in dod-jax: their checkpoints in, a restore bundle out; and back.

    python -m dod_jax.methods.dod.convert import --stage1 S1.pkl [--stage2 S2.pkl] --sd SD21_DIR \\
        --adm ADM.pt|ADM.safetensors --prompts prompt_embeds.pt [--negative-prompts neg_prompt_embeds.pt] \\
        [--config FILE] --out BUNDLE
    python -m dod_jax.methods.dod.convert export --ckpt CKPT_OR_BUNDLE --out DIR

`import` reads the authors' files with dod_jax.weights.torch_pickle (no torch needed; nothing
but tensors, dicts, lists, strings and numbers is unpickled), accounts for every tensor by
its official name (dod_jax.methods.dod.official), and writes a restore bundle that `restore --ckpt`,
`evaluate.py --ckpt` and `dod_jax.restore.bundle.load_model` take: the trained parameters,
the converted ADM (unless a converted .safetensors is given, which is then referenced) and
the prompt embeddings inside the bundle, the SD pipeline folder referenced by path. Without
`--stage2` the bundle is a stage-1 model (decodes without DEMs). The bundle records the
files it came from (name, size, sha256) and the switches the authors' weights need, which
the import sets on the config:

    dod.literal_gamma = True   their CLoRA uses M_theta's gamma as it is (no 1 + gamma)
    dod.alpha = 8.0            peft's default lora_alpha: LoRA scale 8 / r
    dod.rank                   from the file (rank_unet), with the target lists it names
    restore, dod.latent, dod.mfm_resize   the authors' inference (dod_jax.methods.dod.restore.PRESETS
                               'official': Lanczos resize to multiples of 8, the UNet alone in
                               latent tiles, a posterior sample, a bicubic MFM copy)

`--config` (default configs/dod.py) describes the ADM for a .pt file and every DOD setting
the files do not fix, so that small models import as the real ones do.

`export` writes stage1.pkl, stage2.pkl and prompt_embeds.pt (and neg_prompt_embeds.pt when the
base has a negative prompt) in the authors' layout, with torch (the torch extra), so that a
model trained with dod-jax runs in their code. A model trained with dod-jax's default
gamma = 1 + M_theta output is exported as the same function in their literal form (1 is
added to the gamma half of M_theta's last bias); one at another LoRA scale has its B matrices
rescaled. Models their code cannot express (per-layer prompts, plain LoRA, conditional VAE
LoRA, no DEMs) are refused.

This module is a command above dod_jax.methods.dod and dod_jax.restore (it builds a model and writes
a bundle); nothing imports it.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np

from dod_jax.configs import load_config
from dod_jax.methods.dod import official
from dod_jax.methods.dod.build import BaseModels, adm_config, build_dod
from dod_jax.methods.dod.prompts import save_prompt_embeddings
from dod_jax.methods.dod.restore import PRESETS
from dod_jax.errors import ConfigError, reported
from dod_jax.files import atomic_folder, sha256
from dod_jax.restore.bundle import load_model, save_bundle
from dod_jax.weights import torch_pickle
from dod_jax.weights.adm import convert_checkpoint, load_adm
from dod_jax.weights.diffusers import WeightsError, load_pipeline

ROOT = Path(__file__).resolve().parents[2]
OFFICIAL_SWITCHES = {"literal_gamma": True, "alpha": official.PEFT_ALPHA}
ADM_FILE, PROMPTS_FILE = "adm.safetensors", "prompts.safetensors"
EXPORTED = ("stage1.pkl", "stage2.pkl", "prompt_embeds.pt", "neg_prompt_embeds.pt")


def file_record(path: Path) -> dict:
    return {"name": path.name, "bytes": path.stat().st_size, "sha256": sha256(path)}


def read_dict(path: Path) -> dict:
    loaded = torch_pickle.load(path)
    if not isinstance(loaded, dict):
        raise WeightsError(f"{path}: holds a {type(loaded).__name__}, not the dict of a DOD checkpoint")
    return loaded


def read_embedding(path: Path, dim: int) -> np.ndarray:
    """A (1, tokens, dim) or (tokens, dim) prompt-embedding tensor file -> (tokens, dim)."""
    tensor = torch_pickle.load(path)
    if not isinstance(tensor, np.ndarray) or tensor.ndim not in (2, 3) or (tensor.ndim == 3 and tensor.shape[0] != 1) \
            or tensor.shape[-1] != dim:
        shape = getattr(tensor, "shape", type(tensor).__name__)
        raise WeightsError(f"{path}: expected a (1, tokens, {dim}) prompt embedding, found {shape}")
    return tensor.reshape(tensor.shape[-2:]).astype(np.float32)


def import_official(stage1: Path, stage2: Path | None, sd: Path, adm: Path, prompts: Path, negative: Path | None,
                    config_path: Path, out: Path) -> Path:
    """Write the restore bundle `out` of the authors' checkpoints (nothing is written on error)."""
    if out.exists():
        raise ConfigError(f"{out} exists; choose a new folder for the bundle")
    config = load_config(config_path)
    sources = {"stage1": str(stage1)}
    files = {"stage1": read_dict(stage1)}
    if stage2 is not None:
        sources["stage2"] = str(stage2)
        files["stage2"] = read_dict(stage2)
    rank = official.checked_rank(files, sources)
    unet_targets = files["stage1"].get("unet_lora_target_modules")
    if not (isinstance(unet_targets, list) and all(isinstance(t, str) for t in unet_targets)):
        raise WeightsError(f"{stage1}: unet_lora_target_modules is {unet_targets!r}, expected a list of names")
    config.dod.update(rank=rank, unet_targets=unet_targets, clora=True, clora_in_vae=False, prompts="group",
                      vae_targets=official.vae_targets_from_regex(files["stage1"].get("vae_lora_target_modules"), str(stage1)),
                      **OFFICIAL_SWITCHES)
    # The bundle restores as the authors' inference does (the 'official' preset), at the MFM size
    # the config gives (256 in configs/dod.py; smaller for small ADMs).
    preset = PRESETS["official"]
    config.dod.update({k: v for k, v in preset["config"]["dod"].items() if k != "mfm_size"})
    config.restore.update(preset["restore"])

    pipeline = load_pipeline(sd)
    dim = pipeline.unet.config.cross_attention_dim
    embeddings = {"prompt": read_embedding(prompts, dim)}
    if negative is not None:
        embeddings["negative_prompt"] = read_embedding(negative, dim)
    with tempfile.TemporaryDirectory(prefix="dod_import.") as scratch:
        if adm.suffix == ".safetensors":
            adm_file, config.base.adm = adm, str(adm.resolve())
        else:
            adm_file = convert_checkpoint(adm, Path(scratch) / ADM_FILE, adm_config(config))
            config.base.adm = ADM_FILE
        model = build_dod(config, BaseModels(pipeline, load_adm(adm_file), embeddings), config.train.seed)
        official.read_official(model, files, sources)
        config.base.update(sd=str(sd.resolve()), prompts=PROMPTS_FILE, random_seed=-1)
        bundle_files = {PROMPTS_FILE: lambda p: save_prompt_embeddings(
            p, embeddings["prompt"], embeddings.get("negative_prompt"),
            (f"from {prompts.name}", f"from {negative.name}" if negative else ""))}
        if config.base.adm == ADM_FILE:
            bundle_files[ADM_FILE] = lambda p: shutil.copyfile(adm_file, p)
        given = {"stage1": stage1, "stage2": stage2, "adm": adm, "prompts": prompts, "negative_prompts": negative}
        provenance = {"imported_from": {k: file_record(v) for k, v in given.items() if v is not None},
                      "official_switches": {f"dod.{k}": v for k, v in dict(OFFICIAL_SWITCHES, rank=rank).items()},
                      "command": "python -m dod_jax.methods.dod.convert import"}
        return save_bundle(model, config, "stage2" if stage2 else "stage1", out, files=bundle_files,
                           provenance=provenance)


def export_official(ckpt: Path, out: Path) -> Path:
    """Write the authors' stage1.pkl, stage2.pkl and prompt embeddings of a dod-jax model."""
    if out.exists():
        raise ConfigError(f"{out} exists; choose a new folder for the export")
    loaded = load_model(ckpt, dtype="float32")
    cfg = loaded.config.dod
    unsupported = [what for what, bad in (("dod.prompts = 'layer'", cfg.prompts != "group"), ("dod.clora = False", not cfg.clora),
                                          ("dod.clora_in_vae = True", cfg.clora_in_vae), ("dod.hde.enabled = False", not cfg.hde.enabled))
                   if bad]
    if unsupported:
        raise ConfigError(f"{ckpt}: the authors' code has no form for {', '.join(unsupported)}")
    files = official.write_official(loaded.model, cfg.unet_targets, cfg.vae_targets)
    if not cfg.literal_gamma:  # gamma = 1 + out  ==  literal gamma with 1 added to the gamma half of the bias
        fuse = files["stage1"]["state_dict_unet_fuse_mlp"]
        fuse["bias"] = fuse["bias"] + np.concatenate([np.ones(cfg.rank, np.float32), np.zeros(cfg.rank, np.float32)])
    try:
        import torch
    except ImportError:
        raise ConfigError("export writes torch.save files and needs torch (pip install -e '.[test]')") from None

    def tensors(value):
        if isinstance(value, dict):
            return {k: tensors(v) for k, v in value.items()}
        return torch.from_numpy(np.array(value)) if isinstance(value, np.ndarray) else value

    embeddings = {"prompt_embeds.pt": np.asarray(loaded.model.prompt_embedding[...])[None]}
    negative = None if loaded.config.base.random_seed >= 0 else loaded.built.extras["prompts"].get("negative_prompt")
    if negative is not None:
        embeddings["neg_prompt_embeds.pt"] = negative[None]

    def fill(folder: Path):
        for stage, content in files.items():
            torch.save(tensors(content), folder / f"{stage}.pkl")
        for name, array in embeddings.items():
            torch.save(torch.from_numpy(np.array(array, np.float32)), folder / name)

    atomic_folder(out, fill)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="dod_jax.methods.dod.convert", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    imp = commands.add_parser("import", help="the authors' checkpoints -> a restore bundle")
    imp.add_argument("--stage1", type=Path, required=True, help="the stage-1 .pkl")
    imp.add_argument("--stage2", type=Path, help="the stage-2 .pkl (without it: a stage-1 model)")
    imp.add_argument("--sd", type=Path, required=True, help="an SD 2.1-base (or SD-family) diffusers pipeline folder")
    imp.add_argument("--adm", type=Path, required=True, help="256x256_diffusion_uncond.pt, or its converted .safetensors")
    imp.add_argument("--prompts", type=Path, required=True, help="prompt_embeds.pt")
    imp.add_argument("--negative-prompts", type=Path, help="neg_prompt_embeds.pt (only stage-1 training reads it)")
    imp.add_argument("--config", type=Path, default=ROOT / "configs" / "dod.py",
                     help="a dod-jax config describing the ADM and the DOD settings the files do not fix")
    imp.add_argument("--out", type=Path, required=True, help="the bundle folder to create")
    exp = commands.add_parser("export", help="a dod-jax checkpoint or bundle -> the authors' files")
    exp.add_argument("--ckpt", type=Path, required=True, help="a bundle, a run workdir, its checkpoints folder or a step")
    exp.add_argument("--out", type=Path, required=True, help="the folder to create")
    args = parser.parse_args(argv)
    with reported(parser.prog):
        if args.command == "import":
            out = import_official(args.stage1, args.stage2, args.sd, args.adm, args.prompts, args.negative_prompts,
                                  args.config, args.out.resolve())
            print(f"wrote {out} ({'stage 1 + 2' if args.stage2 else 'stage 1 only: decodes without DEMs'})")
        else:
            out = export_official(args.ckpt, args.out.resolve())
            print(f"wrote {out}: {', '.join(sorted(p.name for p in out.iterdir()))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
