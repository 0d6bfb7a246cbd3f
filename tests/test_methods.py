"""The method registry, and the method-free layers carrying a second method: the toy method
(tests/toy_method.py, registered on import) trains a step, checkpoints, resumes, restores a
folder and is its own row of evaluate.py's table beside DOD, through training.loop,
restore.bundle / cli and evaluation.run alone."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

import toy_method
from conftest import ROOT
from dod_jax import methods
from dod_jax.configs import load_config
from dod_jax.data.demo import demo_photos
from dod_jax.errors import ConfigError
from dod_jax.evaluation.run import main as evaluate_main
from dod_jax.methods.dod.build import base_models, build_dod
from dod_jax.restore.bundle import load_model, save_bundle
from dod_jax.restore.cli import main as restore_main
from dod_jax.training.loop import run
from test_evaluate import small_aio3_test_set


def toy_config(steps: int = 2):
    config = load_config(ROOT / "configs" / "micro.py")
    config.method = "toy"
    config.train.update(stage="stage1", steps=steps, units=1, lr=1e-2, log_every=1, sample_every=steps,
                        checkpoint_every=1)
    config.data.root = "demo"
    config.parallel.devices = 1
    return config


def trained(path) -> dict:
    return nnx.to_pure_dict(nnx.state(load_model(path, dtype="float32").model, toy_method.METHOD.trained))


@pytest.fixture(scope="module")
def toy_runs(tmp_path_factory):
    """The toy trained 2 steps in one run, and stopped after step 1 then continued."""
    root = tmp_path_factory.mktemp("toy")
    config = toy_config()
    whole = run(config, root / "whole")
    stopped = run(config, root / "resumed", stop_at=1)
    resumed = run(config, root / "resumed")
    return root, whole, stopped, resumed


def test_the_registry_finds_methods_by_config_and_refuses_unknown_names():
    assert methods.get("dod").name == "dod" and methods.get("toy") is toy_method.METHOD
    assert methods.of(toy_config()) is toy_method.METHOD
    assert "official" in methods.preset_names()
    with pytest.raises(ConfigError, match="'nope' is not known"):
        methods.get("nope")
    with pytest.raises(ConfigError, match="method toy has no such preset"):
        methods.preset(toy_method.METHOD, "official")


def test_a_second_method_trains_checkpoints_and_resumes_exactly(toy_runs):
    root, whole, stopped, resumed = toy_runs
    assert (whole["step"], stopped["step"], resumed["start"], resumed["step"]) == (2, 1, 1, 2)
    assert np.isfinite(whole["losses"]).all()
    first, continued = trained(root / "whole"), trained(root / "resumed")
    assert jax.tree.leaves(first)
    jax.tree.map(np.testing.assert_array_equal, first, continued)
    before = nnx.to_pure_dict(nnx.state(toy_method.METHOD.build(toy_config()).model, toy_method.METHOD.trained))
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(first)))
    assert (root / "whole" / "samples" / "step_0000002.png").is_file()
    meta = json.loads((root / "whole" / "config.json").read_text())
    assert meta["method"] == "toy"


def test_a_second_method_restores_a_folder(toy_runs, tmp_path):
    root, *_ = toy_runs
    (tmp_path / "in").mkdir()
    photo = demo_photos()["coffee"][:64, :64]  # a bucket multiple: restored unpadded
    Image.fromarray(photo).save(tmp_path / "in" / "x.png")
    assert restore_main([str(tmp_path / "in"), "--ckpt", str(root / "whole"), "--output", str(tmp_path / "out"),
                         "--min-side", "64"]) == 0
    restored = np.asarray(Image.open(tmp_path / "out" / "x.png"))
    model = load_model(root / "whole", dtype="float32").model
    expected = np.asarray(model(photo[None].astype(np.float32) / 127.5 - 1.0))[0]
    np.testing.assert_allclose(restored / 127.5 - 1.0, np.clip(expected, -1, 1), atol=1 / 127.5 + 1e-6)
    log = json.loads((tmp_path / "out" / "restore_log.json").read_text())
    assert log["settings"]["method"] == "toy" and log["restored"] == 1


def test_evaluate_puts_each_checkpoint_in_its_own_row_beside_dod(toy_runs, tmp_path):
    """DOD and the toy in one evaluate.py call: a row each beside the LQ input, each model's
    restorations in its own folder, sheets LQ | DOD | toy | GT; DOD's numbers are those it
    gets evaluated alone."""
    root, *_ = toy_runs
    config = load_config(ROOT / "configs" / "micro.py")
    bundle = save_bundle(build_dod(config, base_models(config), 0), config, "stage2", tmp_path / "dod_bundle")
    data = small_aio3_test_set(tmp_path / "data")
    common = ["--data", str(data), "--tasks", "derain", "--min-side", "64", "--pyiqa"]
    assert evaluate_main(["--ckpt", str(bundle), str(root / "whole"), "--out", str(tmp_path / "both")] + common) == 0
    assert evaluate_main(["--ckpt", str(bundle), "--out", str(tmp_path / "alone")] + common) == 0
    both, alone = (json.loads((tmp_path / name / "results.json").read_text()) for name in ("both", "alone"))
    assert both["rows"] == {"lq": "Input (LQ)", "dod": "DOD (ours)", "toy": "Toy (conv + LoRA)"}
    assert both["tasks"]["derain"]["dod"] == alone["tasks"]["derain"]["dod"]
    assert both["tasks"]["derain"]["toy"]["psnr"] != both["tasks"]["derain"]["lq"]["psnr"]
    table = (tmp_path / "both" / "results.md").read_text()
    assert all(f"| {label} |" in table for label in both["rows"].values())
    for key in ("dod", "toy"):
        assert sorted(p.name for p in (tmp_path / "both" / "restored" / key / "derain").iterdir()) == ["0.png", "1.png"]
    with Image.open(tmp_path / "both" / "sheets" / "derain" / "0.png") as sheet:
        assert sheet.size == (4 * 96, 64)
    two_toys = ["--ckpt", str(root / "whole"), str(root / "resumed"), "--out", str(tmp_path / "toys")]
    assert evaluate_main(two_toys + common) == 0
    rows = json.loads((tmp_path / "toys" / "results.json").read_text())["rows"]
    assert rows == {"lq": "Input (LQ)", "toy_whole": "Toy (conv + LoRA) (whole)",
                    "toy_resumed": "Toy (conv + LoRA) (resumed)"}
