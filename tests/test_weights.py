"""Loading diffusers folders: exact round trips, the other file forms people have, and
errors that name what does not fit."""

import json
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx, serialization
from safetensors.numpy import load_file, save_file

from conftest import tiny_config
from torch_models import diffusers_model
from dod_jax.schedule import DDPMSchedule
from dod_jax.weights.diffusers import (SAFETENSORS_NAME, SDPipeline, WeightsError, WeightsMismatchError,
                                       load_diffusers_model, load_pipeline, save_diffusers_model, save_pipeline)


def params_of(model):
    return {path: np.asarray(v[...]) for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.fixture(scope="module")
def unet_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("unet")
    diffusers_model("unet", tiny_config().unet.to_dict()).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vae")
    diffusers_model("vae", tiny_config().vae.to_dict()).save_pretrained(folder)
    return folder


def copy_folder(src, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("which", ["unet", "vae"])
def test_save_round_trips_exactly_and_diffusers_reads_it(which, unet_folder, vae_folder, tmp_path):
    src = {"unet": unet_folder, "vae": vae_folder}[which]
    model = load_diffusers_model(src)
    values = [v[...] for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param))]
    assert all(isinstance(v, jax.Array) for v in values), "a parameter was left without a loaded value"
    save_diffusers_model(model, tmp_path / "ours")
    original, written = load_file(src / SAFETENSORS_NAME), load_file(tmp_path / "ours" / SAFETENSORS_NAME)
    assert sorted(original) == sorted(written)
    for name in original:
        assert original[name].dtype == written[name].dtype and np.array_equal(original[name], written[name]), name
    assert not [p for p in (tmp_path / "ours").iterdir() if p.name.startswith(".")], "temporary files left"

    from diffusers import AutoencoderKL, UNet2DConditionModel
    cls = {"unet": UNet2DConditionModel, "vae": AutoencoderKL}[which]
    reread = cls.from_pretrained(str(tmp_path / "ours"))
    for (name, a), (_, b) in zip(cls.from_pretrained(str(src)).state_dict().items(), reread.state_dict().items()):
        assert torch.equal(a, b), name
    assert load_diffusers_model(tmp_path / "ours").config == model.config


def test_legacy_vae_attention_names_load(vae_folder, tmp_path):
    folder = copy_folder(vae_folder, tmp_path)
    tensors = load_file(folder / SAFETENSORS_NAME)
    legacy = {}
    for name, t in tensors.items():
        for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            name = re.sub(rf"(mid_block\.attentions\.0)\.{re.escape(new)}\.", rf"\1.{old}.", name)
        legacy[name] = t
    assert "encoder.mid_block.attentions.0.query.weight" in legacy
    save_file(legacy, folder / SAFETENSORS_NAME)
    got, expected = params_of(load_diffusers_model(folder)), params_of(load_diffusers_model(vae_folder))
    for path in expected:
        np.testing.assert_array_equal(got[path], expected[path])


def test_sharded_and_fp16_variant_files_load(unet_folder, tmp_path):
    folder = copy_folder(unet_folder, tmp_path)
    tensors = load_file(folder / SAFETENSORS_NAME)
    (folder / SAFETENSORS_NAME).unlink()
    names = sorted(tensors)
    shards = {"part-1.safetensors": names[: len(names) // 2], "part-2.safetensors": names[len(names) // 2:]}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, folder / shard)
    index = {"metadata": {}, "weight_map": {k: s for s, keys in shards.items() for k in keys}}
    (folder / f"{SAFETENSORS_NAME}.index.json").write_text(json.dumps(index))
    sharded, expected = params_of(load_diffusers_model(folder)), params_of(load_diffusers_model(unet_folder))
    assert all(np.array_equal(sharded[p], expected[p]) for p in expected)

    save_file({k: v.astype(np.float16) for k, v in tensors.items()}, folder / "diffusion_pytorch_model.fp16.safetensors")
    half = load_diffusers_model(folder, variant="fp16")
    assert all(v.dtype == jnp.float32 for v in params_of(half).values())
    for p, v in params_of(half).items():
        np.testing.assert_array_equal(v, expected[p].astype(np.float16).astype(np.float32))
    assert all(v.dtype == jnp.bfloat16 for v in params_of(load_diffusers_model(folder, param_dtype=jnp.bfloat16)).values())


def diffusers_flax_tree(tensors: dict) -> dict:
    """diffusers' own PyTorch -> Flax renaming (convert_pytorch_state_dict_to_flax), restated:
    'name.N' -> 'name_N', attention projections renamed, weights transposed to Flax layout."""
    tree = {}
    for name, t in tensors.items():
        name = re.sub(r"(\w+)\.(\d+)", r"\1_\2", name)
        parts = name.split(".")
        renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out_0": "proj_attn"}
        parts = [renames.get(p, p) for p in parts]
        leaf = parts[-1]
        if leaf == "weight" and t.ndim == 4:
            parts[-1], t = "kernel", t.transpose(2, 3, 1, 0)
        elif leaf == "weight" and t.ndim == 2:
            parts[-1], t = "kernel", t.T
        elif leaf == "weight":
            parts[-1] = "scale"
        node = tree
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = np.ascontiguousarray(t)
    return tree


@pytest.mark.parametrize("which", ["unet", "vae"])
def test_diffusers_flax_msgpack_loads(which, unet_folder, vae_folder, tmp_path):
    src = {"unet": unet_folder, "vae": vae_folder}[which]
    folder = copy_folder(src, tmp_path)
    tree = diffusers_flax_tree(load_file(folder / SAFETENSORS_NAME))
    (folder / SAFETENSORS_NAME).unlink()
    (folder / "diffusion_flax_model.msgpack").write_bytes(serialization.msgpack_serialize(tree))
    got, expected = params_of(load_diffusers_model(folder)), params_of(load_diffusers_model(src))
    assert got.keys() == expected.keys()
    for p in expected:
        np.testing.assert_array_equal(got[p], expected[p])

    del tree["post_quant_conv" if which == "vae" else "conv_in"]["bias"]
    (folder / "diffusion_flax_model.msgpack").write_bytes(serialization.msgpack_serialize(tree))
    with pytest.raises(WeightsMismatchError, match="1 missing: (post_quant_conv|conv_in)/bias"):
        load_diffusers_model(folder)


def rewrite(folder, edit):
    tensors = load_file(folder / SAFETENSORS_NAME)
    edit(tensors)
    save_file(tensors, folder / SAFETENSORS_NAME)


def test_missing_unexpected_and_misshaped_tensors_are_all_named(unet_folder, tmp_path):
    folder = copy_folder(unet_folder, tmp_path)

    def edit(t):
        del t["mid_block.attentions.0.proj_out.weight"]
        t["extra.weight"] = np.zeros(3, np.float32)
        t["conv_in.weight"] = np.zeros((32, 4, 5, 5), np.float32)

    rewrite(folder, edit)
    with pytest.raises(WeightsMismatchError) as info:
        load_diffusers_model(folder)
    err = info.value
    assert err.missing == ["mid_block.attentions.0.proj_out.weight"]
    assert err.unexpected == ["extra.weight"]
    assert err.misshaped == [("conv_in.weight", (32, 4, 5, 5), (32, 4, 3, 3))]
    message = str(err)
    assert str(folder / SAFETENSORS_NAME) in message
    for text in ("1 missing", "1 unexpected", "1 mis-shaped", "model expects (32, 4, 3, 3)"):
        assert text in message


def test_weights_that_belong_to_another_config_are_refused(unet_folder, tmp_path):
    folder = copy_folder(unet_folder, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["block_out_channels"] = [32, 64, 96]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsMismatchError, match="mis-shaped"):
        load_diffusers_model(folder)


def test_truncated_and_corrupt_files_are_named(unet_folder, tmp_path):
    folder = copy_folder(unet_folder, tmp_path)
    path = folder / SAFETENSORS_NAME
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match=re.escape(str(path))):
        load_diffusers_model(folder)
    path.write_bytes(b"\x00" * 64)
    with pytest.raises(WeightsError, match=re.escape(str(path))):
        load_diffusers_model(folder)


def test_config_problems_are_named(unet_folder, tmp_path):
    folder = copy_folder(unet_folder, tmp_path)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())

    config_path.write_text(json.dumps(dict(config, class_embed_type="timestep")))
    with pytest.raises(WeightsError, match=r"config\.json.*class_embed_type='timestep'"):
        load_diffusers_model(folder)
    config_path.write_text(json.dumps(dict(config, _class_name="ControlNetModel")))
    with pytest.raises(WeightsError, match="ControlNetModel"):
        load_diffusers_model(folder)
    config_path.write_text("{not json")
    with pytest.raises(WeightsError, match="not valid JSON"):
        load_diffusers_model(folder)
    config_path.unlink()
    with pytest.raises(WeightsError, match="config.json: missing"):
        load_diffusers_model(folder)
    with pytest.raises(WeightsError, match="no such model folder"):
        load_diffusers_model(tmp_path / "absent")


def test_folder_without_weights_says_what_it_holds(unet_folder, tmp_path):
    folder = copy_folder(unet_folder, tmp_path)
    (folder / SAFETENSORS_NAME).rename(folder / "diffusion_pytorch_model.bin")
    with pytest.raises(WeightsError, match=r"no weights found.*diffusion_pytorch_model\.bin.*conversion"):
        load_diffusers_model(folder)


def test_pipeline_folder_round_trip(unet_folder, vae_folder, tmp_path):
    from conftest import sd21_config
    pipe = SDPipeline(load_diffusers_model(unet_folder), load_diffusers_model(vae_folder), DDPMSchedule.create())
    save_pipeline(pipe, tmp_path / "pipe", sd21_config().scheduler.to_dict())
    loaded = load_pipeline(tmp_path / "pipe")
    np.testing.assert_array_equal(np.asarray(loaded.schedule.alphas_cumprod), np.asarray(pipe.schedule.alphas_cumprod))
    for mine, theirs in ((loaded.unet, pipe.unet), (loaded.vae, pipe.vae)):
        a, b = params_of(mine), params_of(theirs)
        assert all(np.array_equal(a[p], b[p]) for p in b)

    shutil.rmtree(tmp_path / "pipe" / "scheduler")
    with pytest.raises(WeightsError, match="missing scheduler/"):
        load_pipeline(tmp_path / "pipe")
    shutil.copytree(tmp_path / "pipe" / "unet", tmp_path / "pipe" / "scheduler")
    shutil.rmtree(tmp_path / "pipe" / "vae")
    shutil.copytree(tmp_path / "pipe" / "unet", tmp_path / "pipe" / "vae")
    with pytest.raises(WeightsError, match="holds a UNet2DCondition, expected AutoencoderKL"):
        load_pipeline(tmp_path / "pipe")
