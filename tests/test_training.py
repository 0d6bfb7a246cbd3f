"""The training stages on the micro config: a step sharded over 8 virtual devices equals the
step on one, micro-batches equal the whole batch, non-finite updates are skipped, a stopped run
resumes exactly, and stage 2 starts from stage 1's checkpoint (the main job: test_main_job.py)."""

import dataclasses
import json
import math

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from conftest import micro_config
from dod_jax import parallel
from dod_jax.methods.dod.build import base_models
from dod_jax.methods.dod.model import trainable
from dod_jax import checkpoints as ckpt
from dod_jax.data.pipeline import TrainBatches
from dod_jax.errors import ConfigError
from dod_jax.methods.dod.method import training_model
from dod_jax.training.loop import compile_step, data_sources, fitted_units, place, run, task_ratio
from dod_jax.methods.dod.steps import LOSS_WEIGHTS, Stage, loss_weights
from dod_jax.optim import learning_rate
from dod_jax.losses.lpips import LPIPS
from dod_jax.models.layers import NumpyRngs


def setup(stage: str, weights: dict | None = None, **train):
    config = micro_config()
    config.train.stage = stage
    config.train.update(train)
    config.train.weights.update(weights or {})
    base = base_models(config)
    if stage == "stage1":
        model = training_model(config, base)
    else:
        from dod_jax.methods.dod.build import build_dod
        model = build_dod(config, base, config.train.seed)
    lpips = LPIPS(rngs=NumpyRngs(3)) if stage == "stage1" else None
    return Stage.create(model, config.train, lpips)


def batch_of(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    gt = rng.uniform(-1, 1, (n, 32, 32, 3)).astype(np.float32)
    return {"lq": np.clip(gt + rng.normal(0, 0.2, gt.shape), -1, 1).astype(np.float32), "gt": gt}


def steps_on(compiled, state, frozen, batches, mesh):
    """The compiled step over `batches` from `state` -> (final state, as placed by the step; each
    step's metrics and the last step's restored images, on the host)."""
    state = place(state, compiled.state_shardings)
    frozen = place(frozen, compiled.frozen_shardings)
    metrics = []
    for batch in batches:
        state, step_metrics, restored = compiled.step(state, frozen, parallel.global_batch(batch, mesh))
        metrics.append(step_metrics)
    return (state, *jax.device_get((metrics, restored)))


def param_diffs(a, b) -> np.ndarray:
    """|a - b| over every leaf of two parameter trees, flat."""
    return np.concatenate([np.abs(np.asarray(x) - np.asarray(y)).ravel()
                           for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))])


def assert_adam_steps_agree(a, b, lr, steps=1, share=0.999):
    """Parameters after `steps` Adam steps from the same start, computed in two ways. Adam's first
    step moves a parameter by lr * g / (|g| + eps): by lr * sign(g) where |g| >> eps, in proportion
    to g where |g| is near eps = 1e-8. So rounding shows only where gradients are that small (or
    flips a sign where they are at rounding level); everywhere else (`share` of the parameters,
    within 1e-5) the steps agree."""
    diffs = param_diffs(a, b)
    assert np.mean(diffs < 1e-5) > share and diffs.max() <= steps * 2.1 * lr, (np.mean(diffs < 1e-5), diffs.max())


# Weights unlike both presets, so a constant written into a step shows in its loss; no gradient
# clipping, so Adam's first moment is (1 - b1) times the gradient itself (global-norm clipping
# would rescale a gradient that is off by a constant factor back to the same norm).
CHECK_WEIGHTS = {"l2": 1.3, "lpips": 2.9, "dmd": 0.7, "ssim": 0.37}
UNCLIPPED = {"clip": 0.0, "fake_clip": 0.0, "weights": CHECK_WEIGHTS}
B1 = micro_config().train.betas[0]  # Adam's first-moment decay


def assert_loss_is_its_formula(metrics: dict, stage: str, weights=CHECK_WEIGHTS):
    """REFERENCE.md's totals from the step's own logged terms: stage 1 l_l2 MSE + l_lpips LPIPS +
    l_dmd L_dmd (a term weighted 0 is not computed), stage 2 MSE + l_ssim (1 - SSIM)."""
    m = {k: np.float64(v) for k, v in metrics.items()}
    if stage == "stage1":
        expected = weights["l2"] * m["mse"] + sum(weights[k] * m[k] for k in ("lpips", "dmd") if weights[k])
    else:
        expected = m["mse"] + weights["ssim"] * (1.0 - m["ssim"])
    np.testing.assert_allclose(m["loss"], expected, rtol=1e-6)


def adam_first_moments(opt_state):
    """The first-moment tree (mu) of the one Adam in an optax state."""
    adam = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
            if isinstance(s, optax.ScaleByAdamState)]
    assert len(adam) == 1
    return adam[0].mu


def first_moments(opt_state) -> list[np.ndarray]:
    """Adam's first moments (mu) in an optax state, leaf by leaf."""
    return [np.asarray(x, np.float64) for x in jax.tree.leaves(adam_first_moments(opt_state))]


def assert_trees_close(a, b, rtol: float, what: str):
    """Each leaf of `a` within rtol x (that leaf's largest |value| in `b`, but at least 1% of the
    whole tree's) of `b`: a gradient off by a constant factor misses by (factor - 1) x its
    largest entry, while leaves whose gradients are thousands of times smaller than the rest
    (LoRA's A while B is near zero) carry the rounding of the large ones."""
    a, b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert a and len(a) == len(b), what
    floor = 0.01 * max(np.abs(np.asarray(y)).max() for y in b)
    assert floor > 0, what
    worst = 0.0
    for i, (x, y) in enumerate(zip(a, b)):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        ratio = np.abs(x - y).max() / max(np.abs(y).max(), floor)
        assert ratio <= rtol, (what, i, ratio)
        worst = max(worst, ratio)
    print(f"{what}: worst leaf {worst:.1e} of its scale")


# Adam's first moments of two computations of the same steps: one step apart from the loss's own
# gradient within 1e-3 (measured without the 1% floor: 3.9e-3 of a leaf whose gradients are near
# 4e-8, 1e-4 and less elsewhere);
# after three steps on 8 devices and on one within 5e-2 (measured with the floor: 4.3e-4, and
# 4.8e-3 in the fake score's LoRA, as Adam's first steps move every parameter by about lr and the
# two runs drift apart by rounding). A factor on a gradient (2, or the micro-batch count) misses by 0.5 or more.
MU_RTOL_ONE_STEP = 1e-3
MU_RTOL_THREE_STEPS = 5e-2
# Parameters after three such steps: as assert_adam_steps_agree explains, with the drift of two
# more steps (measured: 99.46% within 1e-5 in stage 1)
THREE_STEPS_WITHIN_1E5 = 0.99


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_a_step_on_8_devices_equals_the_step_on_one(stage):
    assert jax.device_count() == 8, "conftest sets 8 virtual CPU devices"
    stage_obj, state, frozen = setup(stage, **UNCLIPPED)
    batches = [batch_of(8, seed) for seed in range(3)]  # one row per device; three steps
    one_mesh = parallel.make_mesh(devices=jax.devices()[:1])
    one, metrics1, restored1 = steps_on(compile_step(stage_obj, state, frozen, one_mesh), state, frozen, batches,
                                        one_mesh)
    mesh = parallel.make_mesh(data=4, fsdp=2)
    rules = parallel.rules_dict(micro_config().parallel.rules)
    compiled = compile_step(stage_obj, state, frozen, mesh, rules, shard_frozen=True)
    eight, metrics8, restored8 = steps_on(compiled, state, frozen, batches, mesh)

    # where things live: the frozen base FSDP-sharded by the rules, and the trained state too
    # (ZeRO: parameters and Adam moments) where a tensor is large enough to be worth it
    leaves = list(zip(jax.tree.leaves(state), jax.tree.leaves(compiled.state_shardings)))
    assert all(sh.spec == P() for x, sh in leaves if np.size(x) < parallel.MIN_SHARDED)
    large = [(x, sh) for x, sh in leaves if np.size(x) >= parallel.MIN_SHARDED]
    assert large and all("fsdp" in sh.spec for x, sh in large)
    assert not parallel.kept_whole(state, compiled.state_shardings)
    frozen_specs = {"/".join(map(str, p)): s.spec for p, s in nnx.to_flat_state(compiled.frozen_shardings.model)}
    conv = frozen_specs["unet/down_blocks/0/resnets/0/conv1/kernel"]
    assert conv == P(None, None, None, "fsdp")
    assert frozen_specs["unet/down_blocks/0/resnets/0/conv1/bias"] == P(None)
    assert any("fsdp" in s for s in frozen_specs.values() if len(s) == 2)  # linear kernels too
    assert parallel.batch_sharding(mesh).spec == P(("data", "fsdp"))
    assert all(len(x.sharding.device_set) == 8 for x in jax.tree.leaves(eight.params))

    # three steps: each step's losses and restorations, then Adam's first moments of the
    # trained and the fake parameters (the running gradients, factors included), then the
    # parameters; the fake score's parameters too (stage 1)
    for m8, m1 in zip(metrics8, metrics1):
        assert_loss_is_its_formula(m1, stage)
        for k in m1:
            np.testing.assert_allclose(m8[k], m1[k], rtol=2e-5, atol=1e-6, err_msg=k)
    np.testing.assert_allclose(restored8, restored1, atol=2e-5)
    assert_trees_close(first_moments(eight.opt_state), first_moments(one.opt_state), MU_RTOL_THREE_STEPS, "mu")
    assert_adam_steps_agree(eight.params, one.params, micro_config().train.lr, steps=3, share=THREE_STEPS_WITHIN_1E5)
    if stage == "stage1":
        assert_trees_close(first_moments(eight.fake_opt_state), first_moments(one.fake_opt_state), MU_RTOL_THREE_STEPS,
                           "fake mu")
        assert_adam_steps_agree(eight.fake_params, one.fake_params, micro_config().train.fake_lr, steps=3,
                                share=THREE_STEPS_WITHIN_1E5)
    assert int(eight.step) == int(one.step) == 3


# Stage 1 without LPIPS here (a per-sample mean like MSE, and the longest part of the compile):
# what micro-batching can break is its own, the per-sample DMD keys and the fake score's updates.
MICRO_BATCH_STAGES = {"stage1": {"lpips": 0.0}, "stage2": {}}


@pytest.mark.parametrize("stage", list(MICRO_BATCH_STAGES))
def test_micro_batches_equal_the_whole_batch_and_non_finite_updates_are_skipped(stage):
    weights = {**CHECK_WEIGHTS, **MICRO_BATCH_STAGES[stage]}
    stage_obj, state, frozen = setup(stage, **{**UNCLIPPED, "weights": weights})
    batch = batch_of(6)
    whole, whole_metrics, whole_restored = jax.jit(stage_obj.train_step)(state, frozen, batch)
    step = jax.jit(dataclasses.replace(stage_obj, micro_batches=3).train_step)
    parts, metrics, restored = step(state, frozen, batch)

    # the step's gradient is the loss's: Adam's first moment after one unclipped step is
    # (1 - b1) x the gradient of the whole batch's loss, taken here apart from the step
    keys = stage_obj.sample_keys(state, 0, 6)
    loss = lambda p: stage_obj.generator_loss(p, state.fake_params, frozen, batch, keys)[0]
    gradient = jax.jit(jax.grad(loss))(state.params)
    reference = [(1 - B1) * np.asarray(g, np.float64) for g in jax.tree.leaves(gradient)]
    assert_trees_close(first_moments(whole.opt_state), reference, MU_RTOL_ONE_STEP, "whole-batch mu")
    assert_trees_close(first_moments(parts.opt_state), reference, MU_RTOL_ONE_STEP, "micro-batch mu")
    for m in (whole_metrics, metrics):
        assert_loss_is_its_formula(m, stage, weights)
    for k in whole_metrics:
        np.testing.assert_allclose(metrics[k], whole_metrics[k], rtol=1e-5, atol=1e-7, err_msg=k)
    np.testing.assert_allclose(restored, whole_restored, atol=1e-5)
    assert_adam_steps_agree(parts.params, whole.params, micro_config().train.lr)
    if stage == "stage1":  # the fake score's update on the generator's latents, micro-batched too
        assert_trees_close(first_moments(parts.fake_opt_state), first_moments(whole.fake_opt_state), MU_RTOL_ONE_STEP,
                           "fake mu")
        assert_adam_steps_agree(parts.fake_params, whole.fake_params, micro_config().train.fake_lr)

    poisoned = batch_of(6)
    poisoned["lq"][2, 5, 5, 0] = np.nan
    after, metrics, _ = step(parts, frozen, poisoned)
    assert not np.isfinite(float(metrics["loss"])) and int(after.skipped) == 1
    for a, b in zip(jax.tree.leaves((after.params, after.opt_state)), jax.tree.leaves((parts.params, parts.opt_state))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(after.step) == 2  # the step counts; the update does not happen


@pytest.mark.parametrize("stage, remat", [("stage1", "blocks"), ("stage2", "dots")])
def test_a_rematerialised_step_equals_the_plain_one(stage, remat):
    """train.remat recomputes the UNet's and VAE's blocks in the backward pass of the jitted
    step (keeping nothing of them, or their matmul and convolution outputs): same losses,
    restorations and updates as without."""
    plain_stage, state, frozen = setup(stage, **UNCLIPPED)
    remat_stage, remat_state, remat_frozen = setup(stage, remat=remat, **UNCLIPPED)
    batch = batch_of(2)
    jaxpr = str(jax.make_jaxpr(remat_stage.train_step)(remat_state, remat_frozen, batch))
    assert "remat2[" in jaxpr and "remat2[" not in str(jax.make_jaxpr(plain_stage.train_step)(state, frozen, batch))
    plain, plain_metrics, plain_restored = jax.jit(plain_stage.train_step)(state, frozen, batch)
    rematted, metrics, restored = jax.jit(remat_stage.train_step)(remat_state, remat_frozen, batch)
    for k in plain_metrics:
        np.testing.assert_allclose(metrics[k], plain_metrics[k], rtol=1e-5, atol=1e-7, err_msg=k)
    np.testing.assert_allclose(restored, plain_restored, atol=1e-5)
    assert_trees_close(first_moments(rematted.opt_state), first_moments(plain.opt_state), MU_RTOL_ONE_STEP, "mu")
    assert_adam_steps_agree(rematted.params, plain.params, micro_config().train.lr)


def test_loss_weight_presets():
    config = micro_config()
    assert loss_weights(config.train) == LOSS_WEIGHTS["code"] == {"l2": 2.0, "lpips": 5.0, "dmd": 1.0, "ssim": 0.1}
    config.train.loss_weights = "paper"
    config.train.weights.ssim = 0.5
    assert loss_weights(config.train) == {"l2": 1.0, "lpips": 2.0, "dmd": 1.0, "ssim": 0.5}
    config.train.loss_weights = "papers"
    with pytest.raises(ValueError, match="code.*paper"):
        loss_weights(config.train)


def test_the_cosine_schedule_warms_up_then_decays_and_the_step_follows_it():
    lr, steps, warmup, final = 1e-3, 50, 10, 0.1
    schedule = learning_rate(lr, steps, "cosine", warmup, final)
    expected = [lr * t / warmup if t < warmup else
                lr * final + lr * (1 - final) * 0.5 * (1 + math.cos(math.pi * (t - warmup) / (steps - warmup)))
                for t in range(steps + 1)]
    np.testing.assert_allclose([float(schedule(t)) for t in range(steps + 1)], expected, rtol=1e-5, atol=1e-12)
    assert learning_rate(lr, steps) == lr  # 'constant', the authors'
    with pytest.raises(ValueError, match="lr_schedule.*constant.*cosine"):
        learning_rate(lr, steps, "linear")

    # in a stage's step: the first update of a warm-up from 0 moves nothing, the second does
    stage_obj, state, frozen = setup("stage2", steps=10, lr_schedule="cosine", warmup=2)
    step = jax.jit(stage_obj.train_step)
    first, _, _ = step(state, frozen, batch_of(3))
    second, _, _ = step(first, frozen, batch_of(3, seed=1))
    assert param_diffs(first.params, state.params).max() == 0.0
    assert param_diffs(second.params, first.params).max() > 1e-4


# Two steps resumed under (data 2, fsdp 4) from a (4, 2) checkpoint against the straight (4, 2)
# run: losses within 1e-4 relative, parameters as assert_adam_steps_agree explains.
RESHARDED_LOSS_RTOL = 1e-4
RESHARDED_PARAMS_WITHIN_1E5 = 0.99


def run_config(stage="stage1", **train):
    config = micro_config()
    config.train.update(dict(stage=stage, steps=5, log_every=1, sample_every=5, checkpoint_every=2, keep=2), **train)
    config.parallel.devices = 1
    return config


def test_a_stopped_run_resumes_exactly_and_stage_2_starts_from_its_parameters(tmp_path):
    config = run_config()
    straight = run(config, tmp_path / "straight")
    first = run(config, tmp_path / "resumed", stop_at=3)
    assert first["step"] == 3 and first["losses"] == straight["losses"][:3]
    second = run(config, tmp_path / "resumed")
    assert second["start"] == 3 and second["step"] == 5
    assert second["losses"] == straight["losses"][3:]  # bit for bit: same keys, data and compiled step
    final = lambda name: ckpt.Checkpoints(tmp_path / name / "checkpoints", read_only=True)
    a, b = final("straight"), final("resumed")
    assert a.latest_step() == b.latest_step() == 5
    pa, pb = (c.manager.restore(5, args=ocp.args.Composite(params=ocp.args.StandardRestore()))["params"]
              for c in (a, b))
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # keep 2 latest plus the best: never more than 3 steps on disk
    assert len(list((tmp_path / "straight" / "checkpoints").glob("[0-9]*"))) <= 3
    log = [json.loads(line) for line in (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5]
    assert (tmp_path / "straight" / "samples" / "step_0000005.png").is_file()
    assert list((tmp_path / "straight" / "tensorboard").glob("events.out.tfevents.*"))

    # stage 2 from the stage-1 run: its model holds stage 1's trained parameters (the main job's
    # test below trains it)
    stage2 = run_config("stage2", steps=2, init_from=str(tmp_path / "straight" / "checkpoints"))
    base = base_models(stage2)
    model = training_model(stage2, base)
    restored = nnx.to_flat_state(nnx.state(model, trainable("stage1")))
    for path, value in restored:
        saved = pa
        for key in path:
            saved = saved[str(key)]
        np.testing.assert_array_equal(np.asarray(value[...]), np.asarray(saved))

    with pytest.raises(ckpt.CheckpointError, match="stage1 run"):
        run(stage2, tmp_path / "straight")  # a stage-1 run directory cannot continue as stage 2


def test_a_sharded_run_resumes_under_another_mesh_shape(tmp_path):
    config = run_config(units=2)
    config.train.weights.lpips = 0.0  # LPIPS adds compile time, nothing a resume can break
    config.data.stage1_ratio = "dehaze:1,derain:1,denoise:2"  # 8 crops: one per device
    config.parallel.update({"devices": 8, "data": 4, "fsdp": 2, "shard_frozen": True})
    straight = run(config, tmp_path / "straight")
    run(config, tmp_path / "moved", stop_at=3)
    reshaped = config.copy_and_resolve_references()
    reshaped.parallel.update({"data": 2, "fsdp": 4})
    resumed = run(reshaped, tmp_path / "moved")
    assert resumed["start"] == 3 and resumed["step"] == 5
    # the same optimisation continued: only the order of the sums differs under the new mesh
    np.testing.assert_allclose(resumed["losses"], straight["losses"][3:], rtol=RESHARDED_LOSS_RTOL)
    final = {name: ckpt.Checkpoints(tmp_path / name / "checkpoints", read_only=True) for name in ("straight", "moved")}
    assert final["moved"].meta(5)["mesh"] == {"data": 2, "fsdp": 4}
    states = [c.manager.restore(5, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
              for c in final.values()]
    # two Adam steps after the resume; a state restored wrong (fresh moments, another step count)
    # would move nearly every parameter differently (measured: 99.75% within 1e-5, the largest
    # difference 4.5e-4 at lr 1e-3)
    assert_adam_steps_agree(states[0]["params"], states[1]["params"], config.train.lr, steps=2,
                            share=RESHARDED_PARAMS_WITHIN_1E5)


# a two-process run's losses against one process's (measured: equal, then 8e-8 apart)
TWO_PROCESSES_RTOL = 1e-5


def test_two_processes_on_loopback_train_together_and_agree_with_one(tmp_path):
    """Two processes, one CPU device each, joined by jax.distributed over 127.0.0.1: each reads
    its own shard of the data, the step runs on the global batch, and both report the losses of
    one process running the same steps on both shards' batches (process 0's rows first). (The
    MSE-only stage-1 step keeps the compile short; the losses' sharding is the 8-device test's.)"""
    import os
    import socket
    import subprocess
    import sys
    from conftest import ROOT
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    common = [sys.executable, "train.py", "--config=configs/micro.py", f"--workdir={tmp_path / 'run'}",
              "--config.train.steps=2", "--config.train.log_every=1", "--config.train.checkpoint_every=2",
              "--config.train.weights.lpips=0", "--config.train.weights.dmd=0", "--config.train.fake_updates=0",
              f"--config.parallel.coordinator=127.0.0.1:{port}", "--config.parallel.num_processes=2"]
    workers = [subprocess.Popen(common + [f"--config.parallel.process_id={i}"], cwd=ROOT, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(2)]
    outputs = [w.communicate(timeout=900) for w in workers]
    for w, (out, err) in zip(workers, outputs):
        assert w.returncode == 0, err[-3000:]
    summaries = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert summaries[0]["losses"] == summaries[1]["losses"] and len(summaries[0]["losses"]) == 2
    assert summaries[0]["step"] == summaries[1]["step"] == 2
    assert (tmp_path / "run" / "checkpoints" / "2" / "state").is_dir()

    # the same two steps in this process, on one device, from the batches each process's shard
    # gives (the data set the run wrote): both processes reading one shard moved the first loss
    # by 2.6%
    config = micro_config()
    config.train.update(steps=2, fake_updates=0)
    config.train.weights.update(lpips=0.0, dmd=0.0)
    stage, state, frozen = Stage.create(training_model(config, base_models(config)), config.train,
                                        LPIPS(rngs=NumpyRngs(3)))
    shards = [TrainBatches(data_sources(config, tmp_path / "run"), task_ratio(config), crop=config.train.crop,
                           units=config.train.units, seed=config.train.seed, process_index=i, process_count=2)
              for i in range(2)]
    batches = [{k: np.concatenate([s.batch(step)[k] for s in shards]) for k in ("lq", "gt")} for step in range(2)]
    half = len(batches[0]["gt"]) // 2
    assert not np.array_equal(batches[0]["gt"][:half], batches[0]["gt"][half:])
    mesh = parallel.make_mesh(data=1, fsdp=1, devices=jax.devices()[:1])
    _, metrics, _ = steps_on(compile_step(stage, state, frozen, mesh), state, frozen, batches, mesh)
    np.testing.assert_allclose(summaries[0]["losses"], [m["loss"] for m in metrics], rtol=TWO_PROCESSES_RTOL)


def test_a_batch_the_devices_do_not_divide_is_scaled_to_one_they_do_or_refused(tmp_path, capsys):
    three_two_two = {"dehaze": 3, "derain": 2, "denoise": 2}
    assert fitted_units(1, three_two_two, 1, 8) == 8        # 7 crops on 8 devices: 56
    assert fitted_units(2, three_two_two, 1, 4, micro_batches=2) == 8  # 56 crops: 2 slices of 28 over 4
    assert fitted_units(3, {"a": 1, "b": 1}, 2, 4) == 3     # 12 crops already split over 4
    assert fitted_units(1, {"a": 3}, 3, 6) == 2             # 3 processes x 3 crops: 18
    with pytest.raises(ConfigError, match=r"= 7 does not split into 1 micro-batch\(es\) over 8 devices: set "
                                          r"train.units to a multiple of 8"):
        fitted_units(1, three_two_two, 1, 8, scale=False)

    # the run says what it chose and trains on that batch (stopped before its first step)
    config = run_config(steps=1)
    config.data.stage1_ratio = "dehaze:3,derain:2,denoise:2"
    config.parallel.devices = 8
    summary = run(config, tmp_path / "run", stop_at=0)
    assert summary["batch"] == 56
    assert "train.units 1 -> 8: 56 crops a step" in capsys.readouterr().out
    config.train.scale_batch = False
    with pytest.raises(ConfigError, match="does not split"):
        run(config, tmp_path / "refused", stop_at=0)


def test_fsdp_cuts_every_large_tensor_on_a_dimension_it_divides_and_names_what_it_cannot():
    mesh = parallel.make_mesh(data=1, fsdp=8)
    rules = parallel.rules_dict(micro_config().parallel.rules)
    spec = lambda shape, leaf="kernel": parallel.spec_for(shape, leaf, mesh, rules)
    assert spec((3, 3, 320, 640)) == P(None, None, None, "fsdp")      # the rule: the output channels
    assert spec((3, 3, 1024, 3)) == P(None, None, "fsdp", None)       # RGB out: the input channels instead
    assert spec((1024, 77 * 8)) == P(None, "fsdp")                    # the rule: 'mlp'
    assert spec((77, 1024), "embedding") == P(None, "fsdp")           # no rule: the largest divisible dimension
    assert spec((320,), "bias") == P(None)                             # small: whole
    tree = {"odd": {"kernel": np.zeros((3, 3, 129, 45), np.float32)}, "bias": np.zeros((640,), np.float32)}
    shardings = parallel.tree_shardings(tree, mesh, rules)
    assert [shape for _, shape in parallel.kept_whole(tree, shardings)] == [(3, 3, 129, 45)]
