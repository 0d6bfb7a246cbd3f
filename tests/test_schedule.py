"""DDPM schedule maths against diffusers' DDPMScheduler and against the closed forms."""

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from conftest import sd21_config
from dod_jax.schedule import DDPMSchedule


@pytest.mark.parametrize("beta_schedule", ["scaled_linear", "linear"])
def test_schedule_matches_ddpm_scheduler(beta_schedule):
    cfg = dict(sd21_config().scheduler.to_dict(), beta_schedule=beta_schedule)
    ref = DDPMScheduler.from_config({k: v for k, v in cfg.items() if not k.startswith("_")})
    ours = DDPMSchedule.from_config(cfg)
    assert ours.num_train_timesteps == 1000
    np.testing.assert_allclose(np.asarray(ours.betas), ref.betas.numpy(), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(ours.alphas_cumprod), ref.alphas_cumprod.numpy(), rtol=2e-5)

    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((4, 8, 8, 4)).astype(np.float32)
    noise = rng.standard_normal((4, 8, 8, 4)).astype(np.float32)
    t = np.array([0, 20, 500, 999])
    expected = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)).numpy()
    np.testing.assert_allclose(np.asarray(ours.add_noise(x0, noise, t)), expected, atol=2e-6)
    expected_v = ref.get_velocity(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)).numpy()
    np.testing.assert_allclose(np.asarray(ours.velocity(x0, noise, t)), expected_v, atol=2e-6)


def test_sd21_t999_coefficients_closed_form():
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2
    abar = np.prod(1 - betas)
    s = DDPMSchedule.create()
    assert abs(float(s.alphas_cumprod[999]) - abar) < 1e-9
    x = np.ones((1, 1, 1, 1), np.float32)
    assert abs(float(s.sqrt_alpha(999, x)[0, 0, 0, 0]) - np.sqrt(abar)) < 1e-7


def test_eps_x0_round_trip_and_prediction_types():
    rng = np.random.default_rng(1)
    x0 = rng.standard_normal((3, 4, 4, 4)).astype(np.float32)
    eps = rng.standard_normal((3, 4, 4, 4)).astype(np.float32)
    t = np.array([999, 500, 20])
    s = DDPMSchedule.create()
    xt = s.add_noise(x0, eps, t)
    np.testing.assert_allclose(np.asarray(s.eps_to_x0(xt, eps, t)), x0, atol=2e-4)
    np.testing.assert_allclose(np.asarray(s.x0_to_eps(xt, x0, t)), eps, atol=2e-5)
    np.testing.assert_allclose(np.asarray(s.pred_to_x0(xt, eps, t)), x0, atol=2e-4)
    v = DDPMSchedule.create(prediction_type="v_prediction")
    np.testing.assert_allclose(np.asarray(v.pred_to_x0(xt, v.velocity(x0, eps, t), t)), x0, atol=1e-5)
    with pytest.raises(ValueError, match="prediction_type"):
        DDPMSchedule.create(prediction_type="flow")
    with pytest.raises(ValueError, match="beta_schedule"):
        DDPMSchedule.create(beta_schedule="cosine")
