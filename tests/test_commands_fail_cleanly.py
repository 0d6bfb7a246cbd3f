"""What a newcomer meets at the command line: every expected failure (missing checkpoint,
missing base weights, wrong config, unreadable input) ends in one line on stderr and a
non-zero exit status with no traceback, and written files and folders get the modes the
user's umask gives."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx
from PIL import Image

from conftest import ROOT, micro_config
from dod_jax.data.demo import write_demo_set
from dod_jax.methods.dod.build import base_models, build_dod
from dod_jax.methods.dod.model import ALL_TRAINED, all_trained
from dod_jax.evaluation.run import main as evaluate_main
from dod_jax.errors import one_line
from dod_jax.files import atomic_write
from dod_jax.restore import cli
from dod_jax.restore.bundle import save_bundle
from dod_jax.checkpoints import CheckpointError, Checkpoints, load_trained_params
from dod_jax.training.plots import plot_losses


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    config = micro_config()
    model = build_dod(config, base_models(config), 0)
    return save_bundle(model, config, "stage2", tmp_path_factory.mktemp("bundle") / "bundle")


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(np.full((64, 64, 3), 120, np.uint8)).save(folder / "a.png")
    return folder


def edited_bundle(bundle, folder, edit):
    """A copy of `bundle` whose bundle.json config was changed by `edit(config)`."""
    import shutil
    copy = shutil.copytree(bundle, folder / "edited")
    meta = json.loads((copy / "bundle.json").read_text())
    edit(meta["config"])
    (copy / "bundle.json").write_text(json.dumps(meta))
    return copy


def fails_in_one_line(capsys, run, *needles) -> str:
    """`run()` exits non-zero and prints exactly one line on stderr that holds every needle."""
    with pytest.raises(SystemExit) as exit_info:
        run()
    assert exit_info.value.code not in (0, None)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def test_restore_and_evaluate_report_a_missing_or_wrong_checkpoint_in_one_line(bundle, images, tmp_path, capsys):
    out = str(tmp_path / "out")
    absent = tmp_path / "no_such_ckpt"
    fails_in_one_line(capsys, lambda: cli.main([str(images), "--output", out, "--ckpt", str(absent)]),
                      "restore: error:", str(absent), "no such bundle or checkpoint")
    fails_in_one_line(capsys, lambda: evaluate_main(["--ckpt", str(absent), "--input", str(images), "--output", out]),
                      "evaluate.py: error:", "no such bundle or checkpoint")
    not_a_checkpoint = tmp_path / "empty"
    not_a_checkpoint.mkdir()
    fails_in_one_line(capsys, lambda: evaluate_main(["--ckpt", str(not_a_checkpoint), "--time"]),
                      str(not_a_checkpoint), "no restore bundle")


def test_missing_base_weights_and_a_wrong_config_are_one_line(bundle, images, tmp_path, capsys):
    out = str(tmp_path / "out")
    no_base = edited_bundle(bundle, tmp_path / "a", lambda c: c["base"].update(
        random_seed=-1, sd=str(tmp_path / "sd21"), adm=str(tmp_path / "adm.safetensors"),
        prompts=str(tmp_path / "prompts.safetensors")))
    line = fails_in_one_line(capsys, lambda: cli.main([str(images), "--output", out, "--ckpt", str(no_base)]),
                             "SD 2.1-base pipeline folder", "sd21", "ADM", "prompt", "--sd")
    assert "Traceback" not in line
    wrong_config = edited_bundle(bundle, tmp_path / "b", lambda c: c["dod"].update(prompts="per-pixel"))
    fails_in_one_line(capsys, lambda: cli.main([str(images), "--output", out, "--ckpt", str(wrong_config)]),
                      "dod.prompts", "per-pixel")
    unknown_key = edited_bundle(bundle, tmp_path / "c", lambda c: c["unet"].update(class_embed_type="timestep"))
    fails_in_one_line(capsys, lambda: evaluate_main(["--ckpt", str(unknown_key), "--time"]),
                      "UNet", "class_embed_type")
    fails_in_one_line(capsys, lambda: cli.main([str(images), "--output", out, "--ckpt", str(bundle),
                                                "--tile", "100"]), "tile must be a multiple of 8")


def test_unreadable_inputs_are_one_line(bundle, tmp_path, capsys):
    out = str(tmp_path / "out")
    absent = tmp_path / "no_such_folder"
    fails_in_one_line(capsys, lambda: cli.main([str(absent), "--output", out, "--ckpt", str(bundle)]),
                      str(absent), "no such file or folder")
    empty = tmp_path / "empty"
    empty.mkdir()
    fails_in_one_line(capsys, lambda: cli.main([str(empty), "--output", out, "--ckpt", str(bundle)]),
                      str(empty), "no images")
    fails_in_one_line(capsys, lambda: evaluate_main(["--ckpt", str(bundle), "--data", str(absent), "--out", out]),
                      str(absent), "no test images")


def test_the_commands_themselves_print_no_traceback(bundle, images, tmp_path):
    """The installed `restore` script, evaluate.py, train.py and the main job, as a user runs them."""
    restore = os.path.join(os.path.dirname(sys.executable), "restore")
    commands = {
        "restore": [restore, str(images), "--output", str(tmp_path / "o"), "--ckpt", str(tmp_path / "absent")],
        "evaluate.py": [sys.executable, "evaluate.py", "--ckpt", str(bundle), "--input", str(tmp_path / "absent"),
                        "--output", str(tmp_path / "o")],
        "train.py": [sys.executable, "train.py", "--config", str(tmp_path / "absent.py"), "--workdir", str(tmp_path / "w")],
        "dod_jax.demo": [sys.executable, "-m", "dod_jax.demo", "--config", str(tmp_path / "absent.py"),
                         "--workdir", str(tmp_path / "w")],
    }
    for name, command in commands.items():
        result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300)
        lines = [line for line in result.stderr.splitlines() if line.strip() and "Warning" not in line
                 and not line.startswith("  warnings.warn")]
        assert result.returncode != 0, name
        assert "Traceback" not in result.stderr and len(lines) == 1, (name, result.stderr[-2000:])
        assert "absent" in lines[0], (name, lines[0])


def test_a_checkpoint_of_another_config_is_refused_with_the_shapes_that_differ(tmp_path):
    """Stage 2 (or evaluation) from a stage-1 checkpoint trained with another LoRA rank: one line
    with both shapes, not orbax's advice on options of its own API."""
    config = micro_config()
    with Checkpoints(tmp_path / "checkpoints") as checkpoints:
        checkpoints.save(1, {"step": np.zeros((), np.int32)},
                         nnx.to_pure_dict(all_trained(build_dod(config, base_models(config), 0))), {}, {}, {"loss": 1.0})
        checkpoints.wait()
    config.dod.rank = 4
    with pytest.raises(CheckpointError) as refused:
        load_trained_params(build_dod(config, base_models(config), 0), tmp_path, ALL_TRAINED, ALL_TRAINED)
    message = one_line(refused.value)
    assert message.startswith(f"{tmp_path / 'checkpoints'} step 1: its trained parameters do not fit this model")
    # the first tensor of another shape that orbax meets (a LoRA matrix, M_theta's fuse layer, ...)
    assert re.search(r": Requested shape: \([0-9, ]+\) is not compatible with the stored shape: \([0-9, ]+\)\.$",
                     message), message


def test_train_reports_a_missing_data_folder_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, "train.py", "--config", "configs/micro.py", "--workdir", str(tmp_path / "w"),
                             f"--config.data.root={tmp_path / 'no_data'}"], capture_output=True, text=True, cwd=ROOT,
                            timeout=300)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "no_data" in result.stderr.strip().splitlines()[-1]


def test_a_signal_stops_training_with_a_checkpoint_and_a_non_zero_exit(tmp_path):
    """A real SIGTERM to train.py once it has logged a step: the loop finishes that step, saves
    it, and the command exits 1 with one line saying where it stopped (a scheduler must not take
    a stopped run for a finished one). The MSE-only step keeps the compile short."""
    import signal
    import time
    workdir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    trainer = subprocess.Popen(
        [sys.executable, "train.py", "--config", "configs/micro.py", "--workdir", str(workdir),
         "--config.train.steps=100000", "--config.train.log_every=1", "--config.train.checkpoint_every=100000",
         "--config.train.sample_every=100000", "--config.train.weights.lpips=0", "--config.train.weights.dmd=0",
         "--config.train.fake_updates=0"], cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    log = workdir / "log.jsonl"
    deadline = time.monotonic() + 600
    while not (log.is_file() and log.read_text().strip()) and trainer.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    trainer.send_signal(signal.SIGTERM)
    out, err = trainer.communicate(timeout=300)
    assert trainer.returncode == 1 and "Traceback" not in err, err[-3000:]
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["interrupted"] and 1 <= summary["step"] < 100000
    assert err.strip().splitlines()[-1] == (f"train.py: stopped by a signal at step {summary['step']} of 100000 "
                                            "(checkpoint saved); the same command continues it")
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [summary["step"]]
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == list(range(1, summary["step"] + 1))


def test_a_launch_of_several_processes_without_jax_distributed_is_refused(tmp_path):
    """As torchrun would start two trainers: each would be its own process 0 and write the same
    workdir, so both refuse, say which variables to set, and write nothing."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DOD_", "SLURM_", "OMPI_"))}
    command = [sys.executable, "train.py", "--config", "configs/micro.py", "--workdir", str(tmp_path / "w")]
    launched = [subprocess.Popen(command, env=dict(env, WORLD_SIZE="2", RANK=str(rank)), cwd=ROOT, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE) for rank in range(2)]
    for process in launched:
        _, stderr = process.communicate(timeout=300)
        assert process.returncode != 0 and "Traceback" not in stderr, stderr[-2000:]
        last = stderr.strip().splitlines()[-1]
        assert "WORLD_SIZE=2" in last and all(v in last for v in ("DOD_COORDINATOR", "DOD_NUM_PROCESSES=2",
                                                                     "DOD_PROCESS_ID"))
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("mask", [0o022, 0o002])
def test_written_files_and_folders_get_the_umask_modes(bundle, images, tmp_path, mask):
    previous = os.umask(mask)
    try:
        out = tmp_path / "restored"
        assert cli.main([str(images), "--output", str(out), "--ckpt", str(bundle), "--min-side", "64"]) == 0
        written = [out / "a.png", out / cli.LOG_FILE,
                   atomic_write(tmp_path / "x.json", lambda p: open(p, "w").write("{}")),
                   plot_losses({"run": [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}]}, tmp_path / "losses.png")]
        folders = [save_bundle(*_micro_model(), "stage2", tmp_path / "bundle2"), write_demo_set(tmp_path / "demo")]
        written += [f for folder in folders for f in folder.rglob("*") if f.is_file()]
        folders += [d for folder in folders for d in folder.rglob("*") if d.is_dir()]
    finally:
        os.umask(previous)
    for f in written:
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~mask, f
    for d in folders:
        assert stat.S_IMODE(d.stat().st_mode) == 0o777 & ~mask, d


def _micro_model():
    config = micro_config()
    return build_dod(config, base_models(config), 0), config
