"""Degradations, folder layouts and their checks, the demo set and the input pipeline."""

import shutil

import numpy as np
import pytest
from PIL import Image

from dod_jax.data import degradations as deg
from dod_jax.data import layouts
from dod_jax.data.demo import write_demo_set
from dod_jax.data.layouts import DataError, checked_pairs, scan
from dod_jax.image_ops import read_rgb
from dod_jax.data.pipeline import STAGE1_RATIO, TrainBatches, crop_flip, parse_ratio, ratio_text, sources_from_pairs
from dod_jax.errors import ConfigError


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    return write_demo_set(tmp_path_factory.mktemp("data") / "demo")


@pytest.fixture
def demo_copy(demo_root, tmp_path):
    return shutil.copytree(demo_root, tmp_path / "copy")


# ---------------------------------------------------------------------------------- degradations

def test_noise_has_the_requested_sigma_and_is_reproducible():
    grey = np.full((256, 256, 3), 0.5, np.float32)  # far from 0 and 1, so clipping cannot bias it
    for sigma in (15, 25, 50):
        noisy = deg.gaussian_noise(grey, sigma, seed=sigma)
        measured = float(np.std(noisy - grey) * 255)
        assert abs(measured - sigma) < 0.02 * sigma, (sigma, measured)
    np.testing.assert_array_equal(deg.gaussian_noise(grey, 25, seed=[1, 2]), deg.gaussian_noise(grey, 25, seed=[1, 2]))
    assert np.abs(deg.gaussian_noise(grey, 25, seed=1) - deg.gaussian_noise(grey, 25, seed=2)).max() > 0.1


def test_haze_follows_the_scattering_formula():
    rng = np.random.default_rng(0)
    clean = rng.uniform(0.1, 0.6, (20, 30, 3)).astype(np.float32)
    depth = rng.uniform(0.2, 1.0, (20, 30)).astype(np.float32)
    hazy = deg.haze(clean, beta=1.3, airlight=0.9, depth=depth)
    t = np.exp(-1.3 * depth.astype(np.float64))[..., None]
    np.testing.assert_allclose(hazy, clean * t + 0.9 * (1 - t), atol=1e-6)
    default = deg.haze(clean, beta=1.3, airlight=0.9)  # default depth: far at the top
    top_t, bottom_t = np.exp(-1.3 * 1.0), np.exp(-1.3 * 0.2)
    np.testing.assert_allclose(default[0], clean[0] * top_t + 0.9 * (1 - top_t), atol=1e-6)
    np.testing.assert_allclose(default[-1], clean[-1] * bottom_t + 0.9 * (1 - bottom_t), atol=1e-6)


def test_blur_rain_low_light_and_jpeg_do_what_they_say():
    kernel = deg.motion_blur_kernel(11, 30.0)
    assert kernel.shape == (11, 11) and abs(kernel.sum() - 1) < 1e-6
    flat = np.full((32, 32, 3), 0.3, np.float32)
    np.testing.assert_allclose(deg.motion_blur(flat, 11, 30.0), flat, atol=1e-6)
    edge = np.zeros((32, 32, 3), np.float32)
    edge[:, 16:] = 1.0
    blurred = deg.motion_blur(edge, 9, 0.0)  # horizontal blur smears a vertical edge over 9 px
    assert np.count_nonzero((blurred[16, :, 0] > 0.01) & (blurred[16, :, 0] < 0.99)) == 8
    clean = np.random.default_rng(0).uniform(0.2, 0.6, (64, 64, 3)).astype(np.float32)
    rained = deg.rain(clean, seed=3)
    assert np.all(rained >= clean - 1e-7) and (rained > clean + 0.05).mean() > 0.01
    np.testing.assert_array_equal(rained, deg.rain(clean, seed=3))
    dark = deg.low_light(clean, gamma=2.5, scale=0.4, sigma=5, seed=0)
    assert dark.mean() < 0.4 * clean.mean()
    compressed = deg.jpeg(clean, quality=30)
    assert compressed.shape == clean.shape and 0 < np.abs(compressed - clean).mean() < 0.1


# --------------------------------------------------------------------------------- layouts, demo

def test_demo_set_is_in_the_aio5_layout(demo_root):
    train, test = scan(demo_root, "aio5", "train"), scan(demo_root, "aio5", "test")
    assert train.problems == [] and test.problems == []
    count = lambda pairs, task: sum(p.task == task for p in pairs)
    assert {t: count(train.pairs, t) for t in layouts.AIO5_TASKS} == {t: 7 for t in layouts.AIO5_TASKS}
    assert count(test.pairs, "denoise") == 2 * 3 and {p.sigma for p in test.pairs if p.task == "denoise"} == {15, 25, 50}
    for pair in train.pairs + test.pairs:
        if pair.lq is not None:
            assert read_rgb(pair.lq).shape == read_rgb(pair.gt).shape
            assert min(read_rgb(pair.gt).shape[:2]) == 256
    assert len(checked_pairs(demo_root, "aio3", "train")) == 21


def test_writing_the_demo_set_leaves_nothing_half_written(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("disk full")
    monkeypatch.setattr(deg, "low_light", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        write_demo_set(tmp_path / "demo")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("damage,message", [
    (lambda r: (r / "Train/Derain/gt/norain-astronaut.png").unlink(),
     "rain-astronaut.png: no ground truth"),
    (lambda r: shutil.copy(r / "Train/Derain/gt/norain-rocket.png", r / "Train/Derain/gt/norain-extra.png"),
     "norain-extra.png: ground truth without a degraded image"),
    (lambda r: (r / "Train/Dehaze/original/0000.png").write_bytes(b"\x89PNG broken"),
     "0000.png: not a readable image"),
    (lambda r: Image.new("RGB", (100, 80)).save(r / "Train/Lowlight/low/flower.png"),
     "flower.png: size 100x80 differs from its ground truth"),
    (lambda r: shutil.rmtree(r / "Train/Dehaze/synthetic"), "Dehaze/synthetic: missing folder"),
])
def test_bad_folders_are_reported_by_file(demo_copy, damage, message):
    damage(demo_copy)
    report = scan(demo_copy, "aio5", "train")
    assert any(message in p for p in report.problems), report.problems
    with pytest.raises(DataError, match="problem"):
        checked_pairs(demo_copy, "aio5", "train")
    assert layouts.main([str(demo_copy), "--layout", "aio5", "--split", "train"]) == 1


def test_grey_rgba_and_16_bit_images_are_read_as_rgb_and_noted(demo_copy, capsys):
    gt = demo_copy / "Train/Lowlight/high/china.png"
    rgb = np.asarray(Image.open(gt))
    Image.fromarray(rgb[..., 0]).save(demo_copy / "Train/Lowlight/low/china.png")                     # grey
    Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 7, np.uint8)])).save(gt)                    # RGBA
    deep = (rgb[..., 1].astype(np.uint16) * 257)
    Image.fromarray(deep).save(demo_copy / "Train/Denoise/china.png")                                  # 16-bit
    report = scan(demo_copy, "aio5", "train")
    assert report.problems == []
    assert any("low/china.png: grey" in n for n in report.notes)
    assert any("high/china.png: RGBA" in n for n in report.notes)
    assert any("Denoise/china.png: 16-bit grey" in n for n in report.notes)
    grey = read_rgb(demo_copy / "Train/Lowlight/low/china.png")
    np.testing.assert_allclose(grey[..., 2], rgb[..., 0] / 255.0, atol=1e-6)
    np.testing.assert_allclose(read_rgb(gt), rgb / 255.0, atol=1e-6)
    np.testing.assert_allclose(read_rgb(demo_copy / "Train/Denoise/china.png")[..., 0], rgb[..., 1] / 255.0, atol=1e-6)
    assert layouts.main([str(demo_copy), "--layout", "aio5"]) == 0
    assert "note:" in capsys.readouterr().out


# -------------------------------------------------------------------------------------- pipeline

def test_batches_have_the_task_ratio_shapes_and_ranges(demo_root):
    batches = TrainBatches(sources_from_pairs(checked_pairs(demo_root, "aio3", "train")), STAGE1_RATIO, crop=64, units=2, seed=0)
    batch = batches.batch(0)
    assert batch["lq"].shape == batch["gt"].shape == (14, 64, 64, 3)
    assert batch["lq"].dtype == np.float32 and -1 <= batch["lq"].min() and batch["gt"].max() <= 1
    names = [batches.tasks[i] for i in batch["task"]]
    assert {t: names.count(t) for t in STAGE1_RATIO} == {"dehaze": 6, "derain": 4, "denoise": 4}
    denoise = batch["task"] == batches.tasks.index("denoise")
    noise = (batch["lq"][denoise] - batch["gt"][denoise]) * 127.5
    assert 10 < noise.std() < 60  # sigma drawn from 15 / 25 / 50


def test_batches_are_deterministic_and_the_iterator_resumes_exactly(demo_root):
    pairs = sources_from_pairs(checked_pairs(demo_root, "aio3", "train"))
    a, b = TrainBatches(pairs, STAGE1_RATIO, crop=64, seed=5), TrainBatches(pairs, STAGE1_RATIO, crop=64, seed=5)
    np.testing.assert_array_equal(a.batch(3)["lq"], b.batch(3)["lq"])
    assert np.abs(a.batch(3)["lq"] - TrainBatches(pairs, STAGE1_RATIO, crop=64, seed=6).batch(3)["lq"]).max() > 0.1

    it = a.iterator(num_steps=6, threads=2)
    seen = [next(it) for _ in range(2)]
    state = it.get_state()
    rest = [next(it)["lq"] for _ in range(4)]
    resumed = b.iterator(num_steps=6, threads=2)
    resumed.set_state(state)
    for want in rest:
        np.testing.assert_array_equal(next(resumed)["lq"], want)
    np.testing.assert_array_equal(seen[1]["lq"], a.batch(1)["lq"])


def test_two_processes_read_disjoint_shards_covering_the_set(demo_root):
    sources = sources_from_pairs(checked_pairs(demo_root, "aio3", "train"))
    shards = [TrainBatches(sources, STAGE1_RATIO, crop=64, process_index=i, process_count=2).shards for i in range(2)]
    for task in STAGE1_RATIO:
        first, second = set(shards[0][task]), set(shards[1][task])
        assert not first & second
        assert first | second == set(range(len(sources[task])))
    # Over one epoch of its shard, a process sees each of its pairs once.
    batches = TrainBatches(sources, {"derain": 1}, crop=64, process_index=1, process_count=2)
    picked = [batches._pick(0, position) for position in range(len(batches.shards["derain"]))]
    assert sorted(picked) == sorted(batches.shards["derain"])
    with pytest.raises(DataError, match="gets no"):
        TrainBatches(sources, STAGE1_RATIO, process_index=7, process_count=8)
    with pytest.raises(DataError, match="no pairs for"):
        TrainBatches(sources, {"deblur": 1})


def test_cdd11_layout_pairs_every_type_with_clear(tmp_path):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for name in ("a.png", "b.png"):
            Image.fromarray(rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)).save(tmp_path / "x.png")
            for kind in ("clear",) + layouts.CDD11_TYPES:
                (tmp_path / split / kind).mkdir(parents=True, exist_ok=True)
                shutil.copy(tmp_path / "x.png", tmp_path / split / kind / name)
    pairs = checked_pairs(tmp_path, "cdd11", "train")
    assert len(pairs) == 2 * 11 and {p.task for p in pairs} == set(layouts.CDD11_TYPES)
    assert all(p.gt.parent.name == "clear" and p.gt.name == p.lq.name for p in pairs)
    (tmp_path / "test/snow/b.png").unlink()
    (tmp_path / "test/clear/c.png").write_bytes((tmp_path / "x.png").read_bytes())
    problems = scan(tmp_path, "cdd11", "test").problems
    assert any("clear/c.png: ground truth without a degraded image" in p for p in problems), problems
    assert len(checked_pairs(tmp_path, "cdd11", "train")) == 22


def test_tfds_array_record_preparation_round_trips_and_feeds_the_pipeline(demo_root, tmp_path):
    from dod_jax.data import tfds_builder

    builder = tfds_builder.prepare(demo_root, "aio5", tmp_path / "tfds")
    assert {n: s.num_examples for n, s in builder.info.splits.items()} == {
        **{f"train_{t}": 7 for t in layouts.AIO5_TASKS}, "test_denoise": 6,
        **{f"test_{t}": 2 for t in layouts.AIO5_TASKS if t != "denoise"}}
    sources = tfds_builder.task_sources("aio5", tmp_path / "tfds", "train")
    pairs = checked_pairs(demo_root, "aio5", "train")
    for task, source in sources.items():
        records = {r["name"].decode(): r for r in (source[i] for i in range(len(source)))}
        for pair in (p for p in pairs if p.task == task):
            record = records[str((pair.lq or pair.gt).relative_to(demo_root))]
            assert record["gt"] == pair.gt.read_bytes()
            assert record["lq"] == (pair.lq.read_bytes() if pair.lq else b"")
    batches = TrainBatches(sources, STAGE1_RATIO, crop=64, seed=0)
    batch = batches.batch(0)
    assert batch["lq"].shape == (7, 64, 64, 3) and list(batch["task"]) == [0, 0, 0, 1, 1, 2, 2]
    np.testing.assert_array_equal(batch["gt"], TrainBatches(sources, STAGE1_RATIO, crop=64, seed=0).batch(0)["gt"])


def test_tfds_preparation_refuses_a_bad_folder_before_writing(demo_copy, tmp_path):
    from dod_jax.data import tfds_builder

    (demo_copy / "Train/Derain/gt/norain-astronaut.png").unlink()
    with pytest.raises(DataError, match="rain-astronaut.png: no ground truth"):
        tfds_builder.prepare(demo_copy, "aio5", tmp_path / "tfds")
    assert not (tmp_path / "tfds").exists() or not any((tmp_path / "tfds").rglob("*.array_record*"))
    with pytest.raises(DataError, match="no prepared"):
        tfds_builder.task_sources("aio5", tmp_path / "tfds", "train")


def test_small_images_are_resized_up_before_cropping():
    ramp = np.linspace(0, 1, 100 * 150 * 3, dtype=np.float32).reshape(100, 150, 3)
    lq, gt = crop_flip([ramp, ramp * 0.5], 128, np.random.default_rng(0))
    assert lq.shape == gt.shape == (128, 128, 3) and 0 <= lq.min() and lq.max() <= 1
    np.testing.assert_allclose(gt, lq * 0.5, atol=1e-5)  # the same crop and flips for both


def test_a_task_ratio_is_read_as_written_and_a_malformed_one_names_its_setting():
    assert parse_ratio("dehaze:3, derain:2,denoise:2", "data.stage1_ratio") == STAGE1_RATIO
    assert parse_ratio(ratio_text(STAGE1_RATIO), "pretrain.ratio") == STAGE1_RATIO
    for text in ("dehaze", "dehaze:three", "dehaze:3,"):
        with pytest.raises(ConfigError, match=f"pretrain.ratio '{text}': expected 'task:n,task:n'"):
            parse_ratio(text, "pretrain.ratio")
