"""LoRA-IR as the second method (configs/lorair_tiny.py: a 2-layer CLIP, NAFNet width 16): its
three stages through the generic trainer, the router learning the degradations, the losses
falling, and the trained model restoring and evaluating through restore and evaluate.py."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, traverse_util
from PIL import Image

from conftest import ROOT
from dod_jax.configs import load_config
from dod_jax.data import degradations as deg
from dod_jax.data.demo import TEST_PHOTOS, demo_photos
from dod_jax.errors import ConfigError
from dod_jax.evaluation.run import main as evaluate_main
from dod_jax.methods.lorair.method import IR_EXPERTS, METHOD, stage_filter
from dod_jax.methods.lorair.router import router_views
from dod_jax.restore.bundle import load_model
from dod_jax.restore.cli import main as restore_main
from dod_jax.training.loop import run
from test_evaluate import small_aio3_test_set

ROUTER_STEPS = 300
_flat = traverse_util.flatten_dict  # {path tuple: array} of a pure dict


def tiny(stage: str, steps: int, init_from=None):
    config = load_config(ROOT / "configs" / "lorair_tiny.py")
    config.parallel.devices = 1
    config.train.update(stage=stage, steps=steps, log_every=1, sample_every=steps, checkpoint_every=steps,
                        init_from=str(init_from or ""))
    return config


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """router (ROUTER_STEPS steps of 12 crops, lr 3e-3) -> stage 1 (10 steps) -> stage 2 (10 steps)."""
    root = tmp_path_factory.mktemp("lorair")
    router = tiny("router", ROUTER_STEPS)
    router.train.units = 4
    router.lorair.optim.router.lr = 3e-3
    summaries = {"router": run(router, root / "router")}
    summaries["stage1"] = run(tiny("stage1", 10, root / "router" / "checkpoints"), root / "stage1")
    summaries["stage2"] = run(tiny("stage2", 10, root / "stage1" / "checkpoints"), root / "stage2")
    return root, summaries


def held_out_crops(per_class: int = 20, size: int = 64):
    """(degraded crops, their clean crops, labels) of the demo's test photos (never trained on),
    uint8: rain, haze and noise, in the tiny config's ratio order (derain, dehaze, denoise)."""
    rng = np.random.default_rng(0)
    photos = [demo_photos()[name].astype(np.float32) / 255 for name in TEST_PHOTOS]
    crops, cleans, labels = [], [], []
    for i in range(per_class):
        photo = photos[i % len(photos)]
        y, x = rng.integers(0, photo.shape[0] - size), rng.integers(0, photo.shape[1] - size)
        clean = photo[y:y + size, x:x + size]
        for label, degraded in enumerate((deg.rain(clean, seed=[i]), deg.haze(clean, 1.5, 0.8),
                                          deg.gaussian_noise(clean, 50, seed=[i]))):
            crops.append(np.uint8(np.clip(np.round(degraded * 255), 0, 255)))
            cleans.append(np.uint8(np.round(clean * 255)))
            labels.append(label)
    return crops, cleans, np.array(labels)


def training_batch(crops, cleans, labels) -> dict:
    """A batch as the loop hands it to a step: uint8 crops to [-1, 1] float32, task ids int32."""
    scaled = lambda images: (np.stack(images) / 127.5 - 1.0).astype(np.float32)
    return {"lq": scaled(crops), "gt": scaled(cleans), "task": np.asarray(labels, np.int32)}


def test_the_router_learns_the_degradations_of_held_out_photos(runs):
    """The router on a random 2-layer CLIP classifies 60 held-out crops (3 classes) well above
    the 1/3 of chance after ROUTER_STEPS steps: measured 0.667 (haze 1.0, noise 0.85, rain
    0.15); the training accuracy of its last logs is up too."""
    root, summaries = runs
    model = load_model(root / "router", dtype="float32").model
    crops, _, labels = held_out_crops()
    views = np.stack([router_views(c, model.router.clip_model.vision_tower.config.image_size) for c in crops])
    _, logits = jax.jit(lambda v: model.router(v))(jnp.asarray(views))
    accuracy = float(np.mean(np.argmax(np.asarray(logits), axis=-1) == labels))
    assert accuracy >= 0.6, accuracy
    log = [json.loads(line) for line in (root / "router" / "log.jsonl").read_text().splitlines()]
    assert np.mean([r["accuracy"] for r in log[-50:]]) > np.mean([r["accuracy"] for r in log[:50]])


@pytest.mark.parametrize("stage,previous", [("stage1", "router"), ("stage2", "stage1")])
def test_a_few_steps_of_each_ir_stage_lower_its_loss(runs, stage, previous):
    """Five updates on one batch of six held-out 32 x 32 crops (from the previous stage's run,
    as training starts): the PSNR loss falls every step after the first."""
    root, summaries = runs
    assert np.isfinite(summaries[stage]["losses"]).all()
    config = tiny(stage, 5, root / previous / "checkpoints")
    getattr(config.lorair.optim, stage).update(lr=1e-3, final_lr=1e-3)
    steps, state, frozen = METHOD.training(config)
    batch = training_batch(*held_out_crops(per_class=2, size=32))
    step = jax.jit(steps.train_step)
    losses = []
    for _ in range(5):
        state, metrics, _ = step(state, frozen, batch)
        losses.append(float(metrics["loss"]))
    assert all(b < a for a, b in zip(losses[1:], losses[2:])) and losses[-1] < losses[0], losses


def test_a_stage_2_step_on_8_devices_equals_the_step_on_one(runs):
    """Two stage-2 steps (experts routed per image) on 8 crops: on one device and on a
    (data 4, fsdp 2) mesh with the frozen router FSDP-sharded, as DOD's (test_training.py), one
    crop per device: the same losses and restorations, the same Adam steps."""
    from test_training import assert_adam_steps_agree, steps_on
    from dod_jax import parallel
    from dod_jax.training.loop import compile_step

    assert jax.device_count() == 8, "conftest sets 8 virtual CPU devices"
    root, _ = runs
    config = tiny("stage2", 2, root / "stage1" / "checkpoints")
    steps, state, frozen = METHOD.training(config)
    crops, cleans, labels = held_out_crops(per_class=3, size=32)
    batches = [training_batch(crops[i:i + 8], cleans[i:i + 8], labels[i:i + 8]) for i in (0, 1)]
    one_mesh = parallel.make_mesh(devices=jax.devices()[:1])
    one, metrics1, restored1 = steps_on(compile_step(steps, state, frozen, one_mesh), state, frozen, batches,
                                        one_mesh)
    mesh = parallel.make_mesh(data=4, fsdp=2)
    compiled = compile_step(steps, state, frozen, mesh, parallel.rules_dict(config.parallel.rules), shard_frozen=True)
    eight, metrics8, restored8 = steps_on(compiled, state, frozen, batches, mesh)
    assert any("fsdp" in s.spec for s in jax.tree.leaves(compiled.frozen_shardings))
    assert all(len(x.sharding.device_set) == 8 for x in jax.tree.leaves(eight.params))
    for m8, m1 in zip(metrics8, metrics1):
        np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=2e-5)
    np.testing.assert_allclose(restored8, restored1, atol=2e-5)
    assert_adam_steps_agree(eight.params, one.params, config.lorair.optim.stage2.lr, steps=2)
    assert int(eight.step) == int(one.step) == 2


def test_each_stage_trains_what_it_should(runs):
    root, _ = runs
    state = lambda name, which: nnx.to_pure_dict(nnx.state(load_model(root / name, dtype="float32").model, which))
    before, after = state("stage1", IR_EXPERTS), state("stage2", IR_EXPERTS)
    assert all(np.abs(b).max() == 0 for p, b in _flat(before).items() if p[-1] == "lora_B")
    assert any(np.abs(b).max() > 0 for p, b in _flat(after).items() if p[-1] == "lora_B")
    router_head = lambda name: _flat(state(name, stage_filter("router", "all")))
    for path, value in router_head("router").items():  # the later stages keep the router they started from
        np.testing.assert_array_equal(router_head("stage2")[path], value)
    with pytest.raises(ConfigError, match="lorair.finetune"):
        stage_filter("stage2", "most")


def test_the_trained_model_restores_a_folder_and_is_a_row_of_evaluate(runs, tmp_path):
    root, _ = runs
    (tmp_path / "in").mkdir()
    image = demo_photos()["coffee"][:50, :70]  # not a multiple of 16: padded and cropped back
    Image.fromarray(image).save(tmp_path / "in" / "x.png")
    assert restore_main([str(tmp_path / "in"), "--ckpt", str(root / "stage2"), "--output", str(tmp_path / "out")]) == 0
    restored = np.asarray(Image.open(tmp_path / "out" / "x.png"))
    assert restored.shape == image.shape and not np.array_equal(restored, image)
    log = json.loads((tmp_path / "out" / "restore_log.json").read_text())
    assert log["settings"]["method"] == "lorair" and log["settings"]["experts"] == 3
    data = small_aio3_test_set(tmp_path / "data")
    assert evaluate_main(["--ckpt", str(root / "stage2"), "--data", str(data), "--tasks", "derain",
                          "--out", str(tmp_path / "eval"), "--pyiqa"]) == 0
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["rows"] == {"lq": "Input (LQ)", "lorair": "LoRA-IR"}
    assert "| LoRA-IR |" in (tmp_path / "eval" / "results.md").read_text()


def test_the_authors_files_convert_to_a_bundle_that_restores_as_their_model(tmp_path):
    """The authors' two files, written from the PyTorch re-statements (transformers' CLIP tower in
    bfloat16 with a torch router head; the IR network of LORA_IR.md) at the tiny config's sizes,
    convert to a bundle whose restore equals the re-stated pipeline: the router's views, e_clip,
    the top-1 routing, the IR network with its experts, clamped (1e-4). A file that is not a
    LoRA-IR checkpoint is one clear line."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from lorair_reference import LoRAIRNet, randomise
    from test_lorair_router import EMBED, TOWER, reference_router
    from dod_jax.adapters import top_k_routing
    from dod_jax.methods.lorair.convert import main as convert_main
    from dod_jax.restore.engine import RestoreSettings

    config = load_config(ROOT / "configs" / "lorair_tiny.py")
    assert (config.clip.to_dict(), config.lorair.embed_dim) == (TOWER, EMBED)  # the router test's sizes
    tower, head, tensors = reference_router()
    with torch.no_grad():  # the authors' file holds CLIP in bfloat16: the reference computes with those values
        for p in tower.parameters():
            p.copy_(p.bfloat16().float())
    router_tensors = {k: torch.from_numpy(v) for k, v in tensors.items() if not k.startswith("clip_model.")}
    router_tensors.update({f"clip_model.vision_tower.{k}": v.bfloat16() for k, v in tower.state_dict().items()})
    cfg = config.lorair
    ir = randomise(LoRAIRNet(width=cfg.width, enc=tuple(cfg.enc_blocks), middle=cfg.middle_blocks,
                             dec=tuple(cfg.dec_blocks), embed=cfg.embed_dim, hidden=cfg.dam_hidden,
                             experts=cfg.experts, rank=cfg.rank)).eval()
    torch.save({"params": router_tensors}, tmp_path / "router.pth")
    torch.save({"params": ir.state_dict()}, tmp_path / "ir.pth")
    assert convert_main(["--router", str(tmp_path / "router.pth"), "--ir", str(tmp_path / "ir.pth"),
                         "--out", str(tmp_path / "bundle"), "--config", str(ROOT / "configs" / "lorair_tiny.py")]) == 0
    loaded = load_model(tmp_path / "bundle", dtype="float32")
    assert loaded.stage == "stage2" and (tmp_path / "bundle" / "clip" / "model.safetensors").is_file()

    image = demo_photos()["chelsea"][:48, :64]  # multiples of 16: no padding on either side
    views = router_views(image, config.clip.image_size)
    with torch.no_grad():
        embeds = tower(pixel_values=torch.from_numpy(views.transpose(0, 3, 1, 2))).image_embeds[None]
        e_clip = head["de_extractor"](torch.cat([embeds[:, 0], embeds[:, 1:].mean(1)], dim=-1))
        routing = torch.from_numpy(np.array(top_k_routing(jnp.asarray(head["cls_head"](e_clip).numpy()), 1)))
        lq = torch.from_numpy(image.transpose(2, 0, 1)[None].astype(np.float32) / 255)
        expected = ir(lq, e_clip, routing).clamp(0, 1)[0].numpy().transpose(1, 2, 0)
    got = loaded.restorer(RestoreSettings.from_config(loaded.config)).restore([image.astype(np.float32) / 255])[0]
    assert np.abs(expected - image / 255).max() > 0.05
    assert np.abs(got - expected).max() <= 1e-4, np.abs(got - expected).max()

    torch.save({"state_dict": {}}, tmp_path / "other.pth")
    with pytest.raises(SystemExit) as exit_:
        convert_main(["--router", str(tmp_path / "other.pth"), "--ir", str(tmp_path / "ir.pth"), "--out",
                      str(tmp_path / "b2"), "--config", str(ROOT / "configs" / "lorair_tiny.py")])
    assert exit_.value.code == 2 and not (tmp_path / "b2").exists()
