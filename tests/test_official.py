"""The authors' checkpoint layout: files written with torch.save in their dict layout import
into a restore bundle with every tensor in place, export writes them back exactly, and each
kind of bad file is refused with the file and the entries named."""

from __future__ import annotations

import json
import re

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from conftest import ROOT
from dod_jax.configs import load_config
from dod_jax.methods.dod import official
from dod_jax.methods.dod.build import base_models, build_dod
from dod_jax.methods.dod.model import all_trained
from dod_jax.methods.dod.prompts import save_prompt_embeddings
from dod_jax.restore.bundle import load_model, save_bundle
from dod_jax.methods.dod.restore import PRESETS
from dod_jax.weights.adm import save_adm
from dod_jax.weights.diffusers import save_pipeline, torch_tensors
from dod_jax.methods.dod.convert import main as official_main

MICRO = ROOT / "configs" / "micro.py"


def torch_dicts(files: dict) -> dict:
    convert = lambda v: {k: convert(x) for k, x in v.items()} if isinstance(v, dict) else (
        torch.from_numpy(np.array(v)) if isinstance(v, np.ndarray) else v)
    return {stage: convert(content) for stage, content in files.items()}


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """The authors' files of a micro-config DOD with random non-trivial trained parameters (B,
    biases, M_theta, DEMs all far from their initialisation), written as their code writes them,
    with the SD pipeline folder, the ADM .pt and prompt_embeds.pt beside them."""
    folder = tmp_path_factory.mktemp("released")
    config = load_config(MICRO)
    config.dod.update(literal_gamma=True, alpha=official.PEFT_ALPHA)
    base = base_models(config)
    model = build_dod(config, base, 0)
    state = all_trained(model)
    keys = iter(jax.random.split(jax.random.key(3), len(jax.tree.leaves(state))))
    nnx.update(model, jax.tree.map(lambda x: x + 0.05 * jax.random.normal(next(keys), x.shape, x.dtype), state))
    files = official.write_official(model, config.dod.unet_targets, config.dod.vae_targets)
    for stage, content in torch_dicts(files).items():
        torch.save(content, folder / f"{stage}.pkl")
    save_pipeline(base.sd, folder / "sd", config.scheduler.to_dict())
    torch.save({k: torch.from_numpy(np.array(v)) for k, v in torch_tensors(base.adm).items()}, folder / "adm.pt")
    torch.save(torch.from_numpy(base.prompt_embeddings["prompt"][None]), folder / "prompt_embeds.pt")
    torch.save(torch.from_numpy(base.prompt_embeddings["negative_prompt"][None]), folder / "neg_prompt_embeds.pt")
    return folder, model, files


def import_args(folder, out, *, stage2=True, **replace):
    args = {"--stage1": folder / "stage1.pkl", "--stage2": folder / "stage2.pkl", "--sd": folder / "sd",
            "--adm": folder / "adm.pt", "--prompts": folder / "prompt_embeds.pt",
            "--negative-prompts": folder / "neg_prompt_embeds.pt", "--config": MICRO, "--out": out}
    args.update(replace)
    if not stage2:
        del args["--stage2"]
    return ["import"] + [str(x) for kv in args.items() for x in kv]


def test_import_puts_every_tensor_in_place_and_the_bundle_restores(released, tmp_path, capsys):
    folder, model, _ = released
    assert official_main(import_args(folder, tmp_path / "bundle")) == 0
    loaded = load_model(tmp_path / "bundle", dtype="float32")
    assert loaded.stage == "stage2" and loaded.config.dod.literal_gamma and loaded.config.dod.alpha == official.PEFT_ALPHA
    expected, got = nnx.to_pure_dict(all_trained(model)), nnx.to_pure_dict(all_trained(loaded.model))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), expected, got)
    lq = jax.random.uniform(jax.random.key(0), (1, 32, 32, 3), minval=-1, maxval=1)
    key = jax.random.key(2)  # the posterior noise (the bundle samples its latent, as the authors' code)
    np.testing.assert_array_equal(np.asarray(loaded.model(lq, key)), np.asarray(model(lq, key)))
    official_inference = {k: v for k, v in PRESETS["official"]["config"]["dod"].items() if k != "mfm_size"}
    assert {k: loaded.config.dod[k] for k in official_inference} == official_inference
    assert dict(loaded.config.restore) == PRESETS["official"]["restore"]

    meta = json.loads((tmp_path / "bundle" / "bundle.json").read_text())
    assert set(meta["provenance"]["imported_from"]) == {"stage1", "stage2", "adm", "prompts", "negative_prompts"}
    assert meta["provenance"]["imported_from"]["stage1"]["bytes"] == (folder / "stage1.pkl").stat().st_size
    assert meta["provenance"]["official_switches"] == {"dod.literal_gamma": True, "dod.alpha": 8.0, "dod.rank": 8}
    assert {p.name for p in (tmp_path / "bundle").iterdir()} >= {"adm.safetensors", "prompts.safetensors"}

    # Without stage 2: a stage-1 model, which decodes without DEMs.
    assert official_main(import_args(folder, tmp_path / "stage1_only", stage2=False)) == 0
    assert not load_model(tmp_path / "stage1_only", dtype="float32").stage == "stage2"


def test_export_writes_the_authors_files_back_exactly(released, tmp_path):
    folder, _, files = released
    assert official_main(import_args(folder, tmp_path / "bundle")) == 0
    assert official_main(["export", "--ckpt", str(tmp_path / "bundle"), "--out", str(tmp_path / "export")]) == 0
    for name in ("stage1.pkl", "stage2.pkl", "prompt_embeds.pt", "neg_prompt_embeds.pt"):
        original, written = torch.load(folder / name, weights_only=True), torch.load(tmp_path / "export" / name, weights_only=True)
        if isinstance(original, torch.Tensor):
            assert torch.equal(original, written), name
            continue
        assert original.keys() == written.keys(), name
        for key, value in original.items():
            if isinstance(value, dict):
                assert value.keys() == written[key].keys(), key
                for k, t in value.items():
                    assert t.dtype == written[key][k].dtype and torch.equal(t, written[key][k]), f"{name} {key}[{k}]"
            else:
                assert value == written[key], key
    # A re-import of the export is the same bundle content.
    assert official_main(import_args(tmp_path / "export", tmp_path / "again", **{
        "--sd": folder / "sd", "--adm": folder / "adm.pt"})) == 0
    first, second = (load_model(tmp_path / b, dtype="float32") for b in ("bundle", "again"))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 nnx.to_pure_dict(all_trained(first.model)), nnx.to_pure_dict(all_trained(second.model)))


def test_a_dod_jax_model_exports_as_the_same_function_in_the_literal_form(tmp_path):
    """dod-jax's default gamma = 1 + output becomes the authors' literal gamma with 1 added to
    M_theta's gamma bias; the import (literal) then restores the same images."""
    config = load_config(MICRO)
    config.base.random_seed = -1
    base = base_models(load_config(MICRO))
    save_pipeline(base.sd, tmp_path / "sd", config.scheduler.to_dict())
    save_adm(base.adm, tmp_path / "adm.safetensors")
    save_prompt_embeddings(tmp_path / "prompts.safetensors", base.prompt_embeddings["prompt"], None)
    config.base.update(sd=str(tmp_path / "sd"), adm=str(tmp_path / "adm.safetensors"),
                       prompts=str(tmp_path / "prompts.safetensors"))
    model = build_dod(config, base, 0)
    state = all_trained(model)
    keys = iter(jax.random.split(jax.random.key(5), len(jax.tree.leaves(state))))
    nnx.update(model, jax.tree.map(lambda x: x + 0.05 * jax.random.normal(next(keys), x.shape, x.dtype), state))
    save_bundle(model, config, "stage2", tmp_path / "ours")
    assert official_main(["export", "--ckpt", str(tmp_path / "ours"), "--out", str(tmp_path / "export")]) == 0
    assert not (tmp_path / "export" / "neg_prompt_embeds.pt").exists()  # the base had no negative prompt
    exported = tmp_path / "export"
    assert official_main(["import", "--stage1", str(exported / "stage1.pkl"), "--stage2", str(exported / "stage2.pkl"),
                          "--sd", str(tmp_path / "sd"), "--adm", str(tmp_path / "adm.safetensors"),
                          "--prompts", str(exported / "prompt_embeds.pt"), "--config", str(MICRO),
                          "--out", str(tmp_path / "theirs")]) == 0
    lq = jax.random.uniform(jax.random.key(1), (1, 32, 32, 3), minval=-1, maxval=1)
    theirs = load_model(tmp_path / "theirs", dtype="float32")
    key = jax.random.key(2)
    np.testing.assert_allclose(np.asarray(theirs.model(lq, key)), np.asarray(model(lq, key)), atol=1e-5)


def rewrite(source, out, edit):
    """A copy of the authors' file `source` with `edit` applied to its dict, written to `out`."""
    content = torch.load(source, weights_only=True)
    edit(content)
    torch.save(content, out)


def test_bad_files_are_named_with_their_entries_and_nothing_is_written(released, tmp_path, capsys):
    folder, _, _ = released
    data = (folder / "stage1.pkl").read_bytes()
    (tmp_path / "truncated.pkl").write_bytes(data[: len(data) // 3])
    rewrite(folder / "stage1.pkl", tmp_path / "wrong_rank.pkl", lambda c: c["state_dict_unet"].update(
        {k: v[:4] if ".lora_A." in k else v for k, v in c["state_dict_unet"].items()}))
    rewrite(folder / "stage1.pkl", tmp_path / "no_mtheta.pkl", lambda c: c["state_dict_unet_de_mlp"].pop("0.bias"))
    cases = {
        "truncated": ({"--stage1": tmp_path / "truncated.pkl"}, r"truncated\.pkl: not a torch.save file"),
        "rank": ({"--stage1": tmp_path / "wrong_rank.pkl"},
                 r"wrong_rank\.pkl does not fit the model:.*mis-shaped: state_dict_unet\[.*lora_A\.default\.weight"),
        "mtheta": ({"--stage1": tmp_path / "no_mtheta.pkl"},
                   r"no_mtheta\.pkl does not fit the model:.*1 missing: state_dict_unet_de_mlp\[0\.bias\]"),
        "stage2 as stage1": ({"--stage1": folder / "stage2.pkl"},
                             r"stage2\.pkl: no rank_unet entry, not a stage-1 DOD checkpoint \(it has rank_vae_decoder"),
        "stage1 as stage2": ({"--stage2": folder / "stage1.pkl"},
                             r"stage1\.pkl: no rank_vae_decoder entry, not a stage-2 DOD checkpoint \(it has rank_unet"),
    }
    for name, (replace, message) in cases.items():
        with pytest.raises(SystemExit) as exit_info:
            official_main(import_args(folder, tmp_path / "out", **replace))
        assert exit_info.value.code != 0, name
        err = capsys.readouterr().err
        assert re.search(message, err, re.S), (name, err)
        assert "Traceback" not in err and not (tmp_path / "out").exists(), name
