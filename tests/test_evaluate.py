"""Evaluation: PSNR / SSIM against pyiqa's, the pyiqa bridge offline, and evaluate.py's
three modes (test set with tables and images, folder restore, timing) on a micro bundle."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT
from dod_jax.configs import load_config
from dod_jax.data import degradations as deg
from dod_jax.data.demo import demo_photos
from dod_jax.methods.dod.build import base_models, build_dod
from dod_jax.losses import metrics
from dod_jax.evaluation.iqa import PyiqaMetrics
from dod_jax.evaluation.run import main as evaluate_main
from dod_jax.restore.bundle import save_bundle


def test_psnr_and_ssim_equal_pyiqa_on_degraded_photos():
    torch = pytest.importorskip("torch")
    import pyiqa
    reference = {name: pyiqa.create_metric(name, device="cpu") for name in ("psnr", "psnry", "ssimc", "ssim")}
    ours = {"psnr": lambda a, b: metrics.psnr(a, b), "psnry": lambda a, b: metrics.psnr(a, b, color="y"),
            "ssimc": lambda a, b: metrics.ssim(a, b), "ssim": lambda a, b: metrics.ssim(a, b, color="y")}
    tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)[None], np.float64))
    photos = demo_photos()
    for name in ("astronaut", "chelsea", "coffee"):
        gt = photos[name].astype(np.float32) / 255
        for lq in (deg.gaussian_noise(gt, 25, seed=[1]), deg.haze(gt, 1.0, 0.8), deg.motion_blur(gt, 9, 30.0)):
            lq = np.round(lq * 255) / 255  # evaluation scores the 8-bit images it writes
            for metric, fn in ours.items():
                expected = float(reference[metric](tensor(lq), tensor(gt)))
                tolerance = 1e-3 if metric.startswith("psnr") else 1e-4
                assert abs(fn(lq, gt) - expected) < tolerance, (name, metric, fn(lq, gt), expected)
    cropped = metrics.psnr(lq, gt, crop_border=4)
    assert cropped == pytest.approx(metrics.psnr(lq[4:-4, 4:-4], gt[4:-4, 4:-4]))


def test_pyiqa_metrics_without_cached_weights_are_reported_unavailable():
    pytest.importorskip("pyiqa")
    bridge = PyiqaMetrics(["niqe", "psnr"])
    assert "psnr" in bridge.metrics
    assert "niqe" not in bridge.metrics
    assert bridge.unavailable["niqe"].endswith("niqe_modelparameters.mat")
    image = demo_photos()["coffee"][:64, :64].astype(np.float32) / 255
    assert bridge.image_scores(image, image) == {}  # psnr is neither a no-reference nor a paper metric


def small_aio3_test_set(root):
    """An AIO-3 test split of small crops: two rainy photos with GTs and one clean photo for
    denoising (tested at sigma 15, 25 and 50)."""
    photos = demo_photos()
    rain = root / "test" / "derain" / "Rain100L"
    for folder in ("input", "target"):
        (rain / folder).mkdir(parents=True)
    for i, name in enumerate(("chelsea", "coffee")):
        clean = photos[name][:64, :96]
        Image.fromarray(clean).save(rain / "target" / f"{i}.png")
        rainy = deg.rain(clean.astype(np.float32) / 255, seed=[i])
        Image.fromarray(np.uint8(np.round(rainy * 255))).save(rain / "input" / f"{i}.png")
    (root / "test" / "denoise" / "bsd68").mkdir(parents=True)
    Image.fromarray(photos["astronaut"][:64, :64]).save(root / "test" / "denoise" / "bsd68" / "a.png")
    return root


@pytest.fixture(scope="module")
def bundle_and_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    config = load_config(ROOT / "configs" / "micro.py")
    model = build_dod(config, base_models(config), 0)
    return save_bundle(model, config, "stage2", root / "bundle"), small_aio3_test_set(root / "data"), root


def test_evaluate_writes_tables_images_and_the_lq_baseline(bundle_and_data, capsys):
    bundle, data, root = bundle_and_data
    out = root / "eval"
    status = evaluate_main(["--ckpt", str(bundle), "--data", str(data), "--tasks", "derain", "denoise",
                            "--out", str(out), "--min-side", "64", "--batch-size", "2", "--color", "y",
                            "--crop-border", "2", "--pyiqa", "niqe"])
    assert status == 0
    results = json.loads((out / "results.json").read_text())
    assert (results["color"], results["crop_border"], results["settings"]["layout"]) == ("y", 2, "aio3")
    assert len(results["images"]) == 5
    assert list(results["tasks"]) == ["derain", "denoise_15", "denoise_25", "denoise_50", "average"]
    derain = results["tasks"]["derain"]
    assert results["tasks"]["average"]["dod"]["psnr"] == pytest.approx(
        np.mean([results["tasks"][t]["dod"]["psnr"] for t in ("derain", "denoise_15", "denoise_25", "denoise_50")]))
    noisy = [r["lq"]["psnr"] for r in results["images"] if r["sigma"]]
    assert noisy[0] > noisy[1] > noisy[2]  # sigma 15, 25, 50
    for method in ("lq", "dod"):
        assert {"psnr", "ssim", "psnr_rgb", "psnr_y", "ssim_rgb", "ssim_y", "lpips_vgg"} <= set(derain[method])
        assert derain[method]["psnr"] == derain[method]["psnr_y"]
    # The LQ baseline is the LQ file against its GT, as the metric module computes it.
    first = results["images"][0]
    lq, gt = (np.asarray(Image.open(first[f"{k}_file"]).convert("RGB"), np.float32) / 255 for k in ("lq", "gt"))
    assert first["lq"]["psnr"] == pytest.approx(metrics.psnr(lq, gt, color="y", crop_border=2), abs=1e-9)
    assert first["lq"]["ssim"] == pytest.approx(metrics.ssim(lq, gt, color="y", crop_border=2), abs=1e-7)
    assert derain["lq"]["psnr"] == pytest.approx(np.mean([r["lq"]["psnr"] for r in results["images"] if r["task"] == "derain"]))
    assert "niqe" in results["unavailable"]
    table = (out / "results.md").read_text()
    assert "Y, crop border 2" in table and "| Input (LQ) |" in table and "| DOD (ours) |" in table
    assert "niqe" in table and "looked for at" in table
    stems = sorted(p.stem for p in (out / "restored" / "derain").iterdir())
    assert stems == sorted(r["image"] for r in results["images"] if r["task"] == "derain")
    for stem in stems:
        with Image.open(out / "restored" / "derain" / f"{stem}.png") as restored, \
                Image.open(out / "sheets" / "derain" / f"{stem}.png") as sheet:
            assert sheet.size == (3 * restored.size[0], restored.size[1])
    assert "| Input (LQ) |" in capsys.readouterr().out


def test_evaluate_reports_unreadable_files_and_restores_the_rest(bundle_and_data, tmp_path):
    """A folder of LQ images with GTs by stem: a corrupt LQ is skipped and reported, the
    command ends with status 1, and the others are scored against their GTs."""
    bundle, data, _ = bundle_and_data
    lq_dir, gt_dir = tmp_path / "lq", tmp_path / "gt"
    lq_dir.mkdir(), gt_dir.mkdir()
    photo = demo_photos()["chelsea"][:64, :96]
    for name in ("a", "b"):
        Image.fromarray(photo).save(gt_dir / f"{name}.png")
        Image.fromarray(np.uint8(np.clip(photo * 0.6 + 40, 0, 255))).save(lq_dir / f"{name}.png")
    Image.fromarray(photo).save(gt_dir / "c.png")
    (lq_dir / "c.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    out = tmp_path / "eval"
    status = evaluate_main(["--ckpt", str(bundle), "--data", str(lq_dir), "--gt", str(gt_dir), "--out", str(out),
                            "--min-side", "64", "--pyiqa"])
    assert status == 1
    results = json.loads((out / "results.json").read_text())
    assert [r["image"] for r in results["images"]] == ["a", "b"]
    assert any("c.png: not a readable image" in p for p in results["problems"])
    assert sorted(p.name for p in (out / "restored" / "lq").iterdir()) == ["a.png", "b.png"]
    assert not list(out.rglob(".*"))  # no temporary files left behind


def test_evaluate_restores_a_folder_and_times_restores(bundle_and_data, tmp_path, capsys):
    bundle, _, _ = bundle_and_data
    (tmp_path / "in").mkdir()
    Image.fromarray(demo_photos()["coffee"][:64, :80]).save(tmp_path / "in" / "x.jpg")
    assert evaluate_main(["--ckpt", str(bundle), "--input", str(tmp_path / "in"), "--output",
                          str(tmp_path / "out"), "--min-side", "64"]) == 0
    with Image.open(tmp_path / "out" / "x.jpg") as im:
        assert im.size == (80, 64)
    assert evaluate_main(["--ckpt", str(bundle), "--time", "--time-size", "64", "--time-runs", "2",
                          "--time-warmup", "1"]) == 0
    printed = capsys.readouterr().out
    report = json.loads(printed[printed.index("["):])
    assert [r["merged_clora"] for r in report] == [False, True]
    assert all(r["size"] == 64 and r["seconds_per_image"] > 0 and r["backend"] == "cpu" for r in report)
    assert "ms per image" in printed


def test_evaluation_without_pyiqa_reports_the_perceptual_columns_unavailable(bundle_and_data, monkeypatch):
    """The core install has no pyiqa: evaluation still runs, and the table names why LPIPS-Alex,
    DISTS, FID, CLIPIQA, NIQE, MUSIQ and MANIQA are missing."""
    import sys
    from dod_jax.evaluation.iqa import PER_IMAGE, PER_SET
    monkeypatch.setitem(sys.modules, "pyiqa", None)  # `import pyiqa` now fails as where it is not installed
    bridge = PyiqaMetrics()
    assert not bridge.metrics and set(bridge.unavailable) == set(PER_IMAGE + PER_SET)
    assert all("pyiqa is not installed" in why for why in bridge.unavailable.values())
    image = demo_photos()["coffee"][:32, :32].astype(np.float32) / 255
    assert bridge.image_scores(image, image) == {} and bridge.set_score("fid", ".", ".") is None
    bundle, data, root = bundle_and_data
    out = root / "eval_without_pyiqa"
    assert evaluate_main(["--ckpt", str(bundle), "--data", str(data), "--tasks", "derain", "--out", str(out),
                          "--min-side", "64"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["unavailable"]) == set(PER_IMAGE + PER_SET)
    assert {"psnr", "ssim", "lpips_vgg"} <= set(results["tasks"]["derain"]["dod"])
    table = (out / "results.md").read_text()
    assert "- dists: pyiqa is not installed" in table and "| — |" in table
