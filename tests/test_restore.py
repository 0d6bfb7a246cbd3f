"""Restore: tiles and their blending, colour fixes, the Restorer's batching, buckets and tiled
path, restore bundles, and the `restore` command on good and bad files."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from conftest import ROOT
from dod_jax import compilation_cache
from dod_jax.configs import ADDED_KEYS, load_config, saved_config
from dod_jax.data.demo import demo_photos
from dod_jax.methods.dod.build import base_models, build_dod
from dod_jax.restore.images import finish, prepare
from dod_jax.methods.dod.model import all_trained
from dod_jax.errors import ConfigError
from dod_jax.restore import cli
from dod_jax.restore.bundle import BundleError, load_model, save_bundle
from dod_jax.restore.color import adain, split_frequencies, wavelet
from dod_jax.methods.dod.restore import DODRunner
from dod_jax.restore.engine import Restorer, RestoreSettings
from dod_jax.tiles import blend, gaussian_weights, starts


@pytest.fixture(scope="module")
def micro():
    config = load_config(ROOT / "configs" / "micro.py")
    model = build_dod(config, base_models(config), 0)
    # Non-zero adapters, M_theta and DEMs, so that every trained tensor shapes the output.
    state = all_trained(model)
    keys = iter(jax.random.split(jax.random.key(7), len(jax.tree.leaves(state))))
    nnx.update(model, jax.tree.map(lambda x: x + 0.02 * jax.random.normal(next(keys), x.shape, x.dtype), state))
    return config, model


def psnr(a, b, peak=255.0):
    return 10 * np.log10(peak ** 2 / np.mean((a.astype(np.float64) - b) ** 2))


# ----------------------------------------------------------------------------- tiles

@pytest.mark.parametrize("length,tile,overlap,multiple", [(100, 100, 8, 1), (100, 40, 8, 1), (384, 128, 32, 8),
                                                          (520, 128, 64, 8)])
def test_tile_starts_cover_the_axis_with_the_overlap(length, tile, overlap, multiple):
    s = starts(length, tile, overlap, multiple)
    assert s[0] == 0 and s[-1] + tile == max(length, tile)
    assert all(x % multiple == 0 for x in s)
    assert all(b - a <= tile - overlap for a, b in zip(s, s[1:]))


def test_blend_of_a_local_function_equals_the_function_on_the_whole():
    """Any function that maps each position on its own (here scaled by 2 on each side) comes
    out of the Gaussian blend exactly as if run on the whole input."""
    rng = np.random.default_rng(0)
    image = rng.normal(size=(40, 56, 3)).astype(np.float32)
    local = lambda a: np.repeat(np.repeat(np.tanh(a) * 3 + 1, 2, 0), 2, 1)
    got = blend(lambda y, x: local(image[y:y + 16, x:x + 24]), (40, 56), (16, 24), 6, scale=2)
    np.testing.assert_allclose(got, local(image), atol=1e-5)
    w = gaussian_weights(16, 24)[..., 0]
    assert w.min() > 0 and w[8, 12] == w.max()


# ------------------------------------------------------------------------- colour fixes

def test_colour_fixes_keep_detail_and_take_the_reference_colours():
    photo = demo_photos()["coffee"].astype(np.float64) / 255
    high, low = split_frequencies(photo)
    np.testing.assert_allclose(high + low, photo, atol=1e-12)
    tinted = np.clip(photo * [0.7, 1.0, 1.2] + 0.05, 0, 1)
    fixed = wavelet(tinted, photo)
    # The low band is the reference's; the detail is the restoration's.
    np.testing.assert_allclose(split_frequencies(fixed)[1], low, atol=0.03)
    assert psnr(fixed, photo, 1.0) > psnr(tinted, photo, 1.0) + 10
    matched = adain(tinted, photo)
    np.testing.assert_allclose(matched.mean((0, 1)), photo.mean((0, 1)), atol=2e-3)
    np.testing.assert_allclose(matched.std((0, 1)), photo.std((0, 1)), atol=2e-3)


# ----------------------------------------------------------------------------- Restorer

def dod_restorer(model, settings: RestoreSettings | None = None) -> Restorer:
    """The restore engine around DOD's runner, as Loaded.restorer builds it for a DOD bundle."""
    settings = settings or RestoreSettings()
    return Restorer(DODRunner(model, seed=settings.seed), settings)


def test_batches_of_equal_buckets_compile_once_and_equal_single_restores(micro):
    _, model = micro
    photo = demo_photos()["coffee"]
    images = [photo[:120, :150], photo[:128, :160], photo[:100, :155], photo[:128, :192]]
    batched = dod_restorer(model, RestoreSettings(batch_size=3, bucket=32, min_side=64))
    got = batched.restore(images)
    # Three images pad to the 128x160 bucket and run as one batch; one pads to 128x192.
    assert batched.runner._whole._cache_size() == 2
    single = dod_restorer(model, RestoreSettings(batch_size=1, bucket=32, min_side=64))
    for image, out in zip(images, got):
        assert out.shape == image.shape and out.dtype == np.uint8
        np.testing.assert_array_less(np.abs(out.astype(int) - single.restore([image])[0]), 2)


def test_a_single_tile_is_the_whole_image_path(micro):
    """Tiled restore splits DOD into encode, UNet step and decode (re-encoding each tile for
    its DEM skips); with one tile covering the image it must equal the whole path."""
    _, model = micro
    image = demo_photos()["chelsea"][:64, :96].astype(np.float32) / 255
    whole = dod_restorer(model, RestoreSettings(min_side=64)).restore([image])[0]
    tiled = dod_restorer(model, RestoreSettings(tile=128, tile_overlap=64, tile_above=0, min_side=64)).restore([image])[0]
    np.testing.assert_allclose(tiled, whole, atol=2e-5)


def test_a_full_resolution_mfm_averages_its_features_over_the_tiles(micro):
    """With dod.mfm_size 0 the tiled path runs the ADM on each tile at full resolution and
    modulates with the mean of the tiles' c: one tile is the whole path again, and over
    several tiles the modulation is M_theta of the tiles' mean feature."""
    _, model = micro
    model.mfm_size = 0
    try:
        image = demo_photos()["chelsea"][:64, :96].astype(np.float32) / 255
        whole = dod_restorer(model, RestoreSettings(min_side=64)).restore([image])[0]
        one_tile = dod_restorer(model, RestoreSettings(tile=128, tile_overlap=64, tile_above=0, min_side=64))
        np.testing.assert_allclose(one_tile.restore([image])[0], whole, atol=2e-5)
        tiles = dod_restorer(model, RestoreSettings(tile=32, tile_overlap=0, tile_above=0, min_side=64, bucket=32))
        used, modulate = [], tiles.runner._modulate
        tiles.runner._modulate = lambda state, c: used.append(np.asarray(c)) or modulate(state, c)
        tiles.restore([image])
        lq = image * 2 - 1  # 32-pixel tiles without overlap: at 0 / 32 down and 0 / 32 / 64 across
        features = [model.degradation_feature(lq[None, y:y + 32, x:x + 32]) for y in (0, 32) for x in (0, 32, 64)]
        assert len(used) == 1 and tiles.runner._feature._cache_size() == 1
        np.testing.assert_allclose(used[0], np.mean(np.stack(features), axis=0), atol=1e-5)
    finally:
        model.mfm_size = 32


def test_tiled_restore_is_close_to_the_whole_image(micro):
    """Overlapping tiles see less context than the whole image (GroupNorm statistics and
    attention span one tile), so they differ from it; a random-weight network depends on
    that context far more than a trained restorer. So the bounds come from this model: tiles
    blended over their overlap are closer to the whole-image restoration than tiles butted
    together without overlap (seams), and far closer than the input is (what the model does
    to the image). Measured on the fixture at 128x256: 26.8 dB between tiled (128-pixel
    tiles, overlap 64) and whole, 24.2 dB without overlap, the input 8.5 dB from the whole."""
    _, model = micro
    image = demo_photos()["coffee"][:128, :256]
    whole = dod_restorer(model, RestoreSettings(min_side=64)).restore([image])[0]
    tiled = {overlap: dod_restorer(model, RestoreSettings(tile=128, tile_overlap=overlap, tile_above=0, min_side=64))
             for overlap in (64, 0)}
    out = {overlap: restorer.restore([image])[0] for overlap, restorer in tiled.items()}
    assert tiled[64].runner._decode_tile._cache_size() == 1  # every tile one shape
    assert psnr(out[64], whole) > psnr(out[0], whole) + 1.0
    assert psnr(out[64], whole) > psnr(image, whole) + 10.0


# ----------------------------------------------------- the authors' inference switches

def test_the_posterior_sample_is_drawn_from_the_seed_and_the_image_alone(micro):
    """dod.latent 'sample' (the authors' code): without noise the model refuses to run; the
    Restorer draws it from --seed and the image's pixels, so a seed gives one result whatever
    the batch, and another seed another."""
    _, model = micro
    assert model.sample_latent
    lq = jax.numpy.zeros((1, 32, 32, 3))
    with pytest.raises(ValueError, match="dod.latent is 'sample'"):
        model(lq)
    photo = demo_photos()["coffee"].astype(np.float32) / 255
    image, other = photo[:64, :96], photo[64:128, 96:192]
    alone = dod_restorer(model, RestoreSettings(min_side=64, seed=3)).restore([image])[0]
    batched = dod_restorer(model, RestoreSettings(min_side=64, seed=3, batch_size=2)).restore([other, image])[1]
    np.testing.assert_allclose(batched, alone, atol=1e-5)  # a batch of 2 compiles another program
    reseeded = dod_restorer(model, RestoreSettings(min_side=64, seed=4)).restore([image])[0]
    assert np.abs(reseeded - alone).max() > 0.01


def test_the_mfm_sees_the_unpadded_image_resized_bicubic_with_antialiasing(micro):
    """The modulation comes from the unpadded image: padding to another bucket leaves it as it
    is. The MFM's copy is jax's bicubic antialiased resize, which agrees with torch's
    (F.interpolate bicubic, antialias=True): measured 2.4e-7 at 100x150 -> 32x32 and 4.8e-7 at
    256x385 -> 256x256."""
    torch = pytest.importorskip("torch")
    _, model = micro
    photo = demo_photos()["chelsea"][:100, :150].astype(np.float32) / 255
    seen = {}
    for bucket in (8, 64):
        restorer = dod_restorer(model, RestoreSettings(min_side=64, bucket=bucket))
        film = restorer.runner._film
        restorer.runner._film = lambda state, x, b=bucket: seen.setdefault(b, np.asarray(x)) is not None and film(state, x)
        restorer.restore([photo])
    np.testing.assert_array_equal(seen[8], seen[64])
    copy = np.asarray(model.mfm_input(jax.numpy.asarray(photo[None] * 2 - 1)))
    np.testing.assert_array_equal(seen[8], copy)
    reference = torch.nn.functional.interpolate(torch.from_numpy(photo[None] * 2 - 1).permute(0, 3, 1, 2), (32, 32),
                                                mode="bicubic", antialias=True, align_corners=False)
    np.testing.assert_allclose(copy, reference.permute(0, 2, 3, 1).numpy(), atol=1e-5)


def test_fit_resize_brings_sides_down_to_multiples_of_8_by_lanczos():
    """fit='resize' (the runner of the authors' release): no padding, a Lanczos resize down to
    multiples of 8, equal to Pillow's on the 8-bit image up to its rounding (8-bit Pillow rounds
    and clips between its two passes: measured at most 3.4/255 apart, 0.3/255 on average); the
    restoration comes back at the input's size."""
    photo = demo_photos()["coffee"][:101, :150]
    prepared = prepare(photo, min_side=64, fit="resize")
    assert prepared.padded.shape == (96, 144, 3) and prepared.lifted == (96, 144)
    pillow = np.asarray(Image.fromarray(photo).resize((144, 96), Image.Resampling.LANCZOS)) / 255.0
    difference = np.abs(prepared.padded - pillow)
    assert difference.max() < 4 / 255 and difference.mean() < 0.5 / 255
    assert finish(prepared, prepared.padded).shape == photo.shape
    padded = prepare(photo, min_side=64)  # the default: reflect padding, the pixels kept
    assert padded.padded.shape == (104, 152, 3) and np.array_equal(padded.rgb, photo / np.float32(255))


def test_latent_tiling_runs_the_vae_whole_and_the_unet_alone_in_tiles(micro):
    """tiling='latent' (the authors'): one tile is the whole path; several tiles compile the
    UNet once and the encoder and decoder once each for the whole image, and stay closer to the
    whole image than pixel tiles, as only the UNet loses context."""
    _, model = micro
    image = demo_photos()["coffee"][:128, :256]
    whole = dod_restorer(model, RestoreSettings(min_side=64)).restore([image])[0]
    one_tile = dod_restorer(model, RestoreSettings(tiling="latent", tile=256, tile_overlap=64, tile_above=0, min_side=64))
    np.testing.assert_array_less(np.abs(one_tile.restore([image])[0].astype(int) - whole), 2)
    settings = dict(tile=128, tile_overlap=64, tile_above=0, min_side=64)
    latent = dod_restorer(model, RestoreSettings(tiling="latent", **settings))
    out = latent.restore([image])[0]
    assert latent.runner._latent._cache_size() == 1 and latent.runner._encode_with_skips._cache_size() == 1
    assert latent.runner._decode_whole._cache_size() == 1 and latent.runner._decode_tile._cache_size() == 0
    pixel = dod_restorer(model, RestoreSettings(tiling="pixel", **settings)).restore([image])[0]
    assert psnr(out, whole) > psnr(pixel, whole)


# ------------------------------------------------------------------------------ bundles

def test_bundle_round_trip_and_what_it_refuses(micro, tmp_path):
    config, model = micro
    bundle = save_bundle(model, config, "stage2", tmp_path / "bundle")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # staging folder renamed away
    loaded = load_model(bundle, dtype="float32")
    assert (loaded.stage == "stage2")
    expected, got = nnx.to_pure_dict(all_trained(model)), nnx.to_pure_dict(all_trained(loaded.model))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), expected, got)
    with pytest.raises(BundleError, match="exists"):
        save_bundle(model, config, "stage2", bundle)

    meta = json.loads((bundle / "bundle.json").read_text())
    meta["config"]["base"].update(random_seed=-1, sd=str(tmp_path / "sd21"), adm=str(tmp_path / "adm.safetensors"),
                                  prompts=str(tmp_path / "prompts.safetensors"))
    (bundle / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="SD 2.1-base pipeline folder.*sd21.*\n.*ADM.*\n.*prompt"):
        load_model(bundle)

    broken = save_bundle(model, config, "stage1", tmp_path / "broken")
    (broken / "params.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(BundleError, match="params.safetensors: not a readable"):
        load_model(broken)
    with pytest.raises(BundleError, match="no such bundle"):
        load_model(tmp_path / "absent")


def test_a_bundle_restores_in_bfloat16_close_to_float32(micro, tmp_path):
    """The accelerator default: compute in bfloat16 (parameters stay float32). bfloat16 rounds
    the weights and every activation; the bound comes from this model: the restoration costs at
    most 12 dB PSNR (4x the RMS error) more than the float32 restoration with the weights alone
    rounded to bfloat16. Measured on the fixture: 45.8 dB against 53.0 dB."""
    config, model = micro
    bundle = save_bundle(model, config, "stage2", tmp_path / "bundle")
    image = demo_photos()["coffee"][:64, :96]
    outputs = {}
    for dtype in ("float32", "bfloat16"):
        loaded = load_model(bundle, dtype=dtype)
        assert loaded.model.unet.dtype == getattr(jax.numpy, dtype)
        outputs[dtype] = loaded.restorer(RestoreSettings(min_side=64)).restore([image])[0]
    rounded = load_model(bundle).model
    nnx.update(rounded, jax.tree.map(lambda x: x.astype(jax.numpy.bfloat16).astype(x.dtype), nnx.state(rounded, nnx.Param)))
    outputs["rounded weights"] = dod_restorer(rounded, RestoreSettings(min_side=64)).restore([image])[0]
    assert psnr(outputs["bfloat16"], outputs["float32"]) > psnr(outputs["rounded weights"], outputs["float32"]) - 12.0


def test_bundle_of_another_config_names_the_mismatched_tensors(micro, tmp_path):
    config, model = micro
    bundle = save_bundle(model, config, "stage2", tmp_path / "bundle")
    meta = json.loads((bundle / "bundle.json").read_text())
    meta["config"]["dod"]["rank"] = 4
    (bundle / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match=r"mis-shaped \[.*lora_A/kernel: \(32, 8\) in the file, \(32, 4\) in the model"):
        load_model(bundle)


# ------------------------------------------------------------------------- the command

def test_restore_command_writes_every_readable_image_and_reports_the_rest(micro, tmp_path, capsys):
    config, model = micro
    bundle = save_bundle(model, config, "stage2", tmp_path / "bundle")
    inputs = tmp_path / "in"
    (inputs / "sub").mkdir(parents=True)
    photo = demo_photos()["chelsea"][:120, :150]
    Image.fromarray(photo).save(inputs / "rgb.png")
    Image.fromarray(np.dstack([photo, np.full(photo.shape[:2], 128, np.uint8)])).save(inputs / "sub" / "alpha.png")
    Image.fromarray(photo[..., 0]).save(inputs / "grey.jpg")
    (inputs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    out = tmp_path / "out"
    status = cli.main([str(inputs), "--output", str(out), "--ckpt", str(bundle), "--min-side", "64",
                       "--batch-size", "2", "--color-fix", "wavelet"])
    assert status == 1
    log = json.loads((out / cli.LOG_FILE).read_text())
    assert (log["restored"], log["failed"]) == (3, 1)
    assert "broken.png: not a readable image" in [r for r in log["files"] if r["status"] == "error"][0]["error"]
    assert log["settings"]["color_fix"] == "wavelet" and log["settings"]["stage"] == "stage2"
    with Image.open(out / "rgb.png") as im:
        assert (im.mode, im.size) == ("RGB", (150, 120))
    with Image.open(out / "sub" / "alpha.png") as im:
        assert im.mode == "RGBA" and np.all(np.asarray(im)[..., 3] == 128)
    with Image.open(out / "grey.jpg") as im:
        assert im.mode == "L"
    assert sorted(p.name for p in out.rglob("*") if p.is_file()) == ["alpha.png", "grey.jpg", "restore_log.json",
                                                                      "rgb.png"]
    assert "restored 3 of 4 images" in capsys.readouterr().out


def test_the_official_preset_sets_the_authors_inference_and_flags_still_win(micro, tmp_path):
    config, model = micro
    bundle = save_bundle(model, config, "stage2", tmp_path / "bundle")
    Image.fromarray(demo_photos()["chelsea"][:100, :150]).save(tmp_path / "photo.png")
    out = tmp_path / "out"
    assert cli.main([str(tmp_path / "photo.png"), "--output", str(out), "--ckpt", str(bundle), "--min-side", "64",
                     "--preset", "official", "--tiling", "pixel", "--seed", "5"]) == 0
    settings = json.loads((out / cli.LOG_FILE).read_text())["settings"]
    assert settings["preset"] == "official"
    assert (settings["fit"], settings["bucket"], settings["latent"], settings["mfm_resize"]) == (
        "resize", 8, "sample", "bicubic")
    assert (settings["tiling"], settings["min_side"], settings["seed"], settings["mfm_size"]) == ("pixel", 64, 5, 256)
    with Image.open(out / "photo.png") as im:
        assert im.size == (150, 100)


def test_a_second_restore_loads_its_compiled_functions_from_the_cache(micro, tmp_path):
    """`restore` keeps what it compiles in the default persistent cache (under XDG_CACHE_HOME, per
    CPU); run again on the same shapes it adds nothing there (every function loaded, none
    compiled), and `--compilation-cache off` leaves the cache alone."""
    config, model = micro
    bundle = save_bundle(model, config, "stage2", tmp_path / "bundle")
    Image.fromarray(demo_photos()["chelsea"][:64, :96]).save(tmp_path / "photo.png")
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}  # the suite's own
    env["XDG_CACHE_HOME"] = str(tmp_path / "home_cache")

    def restore(*flags):
        result = subprocess.run([sys.executable, "-m", "dod_jax.restore.cli", str(tmp_path / "photo.png"), "--output",
                                 str(tmp_path / "out"), "--ckpt", str(bundle), "--min-side", "64", *flags],
                                env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-2000:]
        return result.stderr, sorted(p.name for p in (tmp_path / "home_cache").rglob("*-cache"))

    first_log, first = restore()
    assert f"compilation cache: {tmp_path / 'home_cache' / 'dod_jax' / 'xla'}" in first_log
    assert any(name.startswith("jit_") for name in first), first
    assert restore()[1] == first
    shutil.rmtree(tmp_path / "home_cache")
    off_log, off = restore("--compilation-cache", "off")
    assert off == [] and "compilation cache:" not in off_log


def test_a_cache_folder_that_cannot_be_made_is_reported_and_left_out(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    before = jax.config.jax_compilation_cache_dir
    assert compilation_cache.enable(str(tmp_path / "file" / "cache")) is None
    assert jax.config.jax_compilation_cache_dir == before
    assert f"compilation cache {tmp_path / 'file' / 'cache'}: cannot be created" in capsys.readouterr().err


def test_a_config_saved_before_a_key_existed_reads_with_that_keys_earlier_behaviour():
    """A checkpoint's or bundle's config is filled once where it is read (configs.saved_config):
    each added key gets the value that reproduces what the code did before it existed, and a
    key the saved config has keeps its value."""
    current = load_config(ROOT / "configs" / "dod.py").to_dict()
    old = json.loads(json.dumps(current))
    def at(tree, dotted):
        *sections, key = dotted.split(".")
        for section in sections:
            tree = tree[section]
        return tree, key

    for dotted in ADDED_KEYS:
        node, key = at(old, dotted)
        assert key in node, f"{dotted} is not a key of configs/dod.py"
        del node[key]
    filled = saved_config(old)
    for dotted, value in ADDED_KEYS.items():
        node, key = at(filled, dotted)
        assert node[key] == value
    assert saved_config(current).to_dict() == current


def attention_choices(model) -> set:
    """How every attention layer of a model computes (SD's Attention and ADM's AttentionBlock)."""
    return {getattr(node, "implementation", getattr(node, "attention_impl", None)) for _, node in nnx.iter_graph(model)
            if type(node).__name__ in ("Attention", "AttentionBlock")}


def test_attention_is_chosen_by_the_config_and_by_the_restore_flag(micro, tmp_path):
    config, model = micro
    bundle = save_bundle(model, config, "stage2", tmp_path / "bundle")
    assert attention_choices(load_model(bundle).model) == {"auto"}
    flagged = ["--ckpt", str(bundle), "--output", str(tmp_path / "out"), str(tmp_path)]
    parser = argparse.ArgumentParser()
    parser.add_argument("--output")
    parser.add_argument("inputs", nargs="+")
    cli.add_settings_arguments(parser)
    _, settings, loaded = cli.restorer_from(parser.parse_args(flagged + ["--attention", "xla"]))
    assert settings["attention"] == "xla" and attention_choices(loaded.model) == {"xla"}
    with pytest.raises(SystemExit):
        parser.parse_args(flagged + ["--attention", "fast"])
    config.base.attention = "fast"
    with pytest.raises(ConfigError, match="base.attention must be one of"):
        base_models(config)
