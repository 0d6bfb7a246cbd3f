"""DDPM forward-process maths (diffusers' DDPMScheduler betas, add_noise, eps <-> x0).

Only the training-time noise schedule lives here: SD's scheduler configs (DDPM, PNDM, DDIM
...) all share it, and DOD needs no multi-step sampler. Coefficients are computed in float64
and stored in float32.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def make_betas(num_train_timesteps: int, beta_start: float, beta_end: float, beta_schedule: str) -> np.ndarray:
    if beta_schedule == "linear":
        return np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float64)
    if beta_schedule == "scaled_linear":
        return np.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps, dtype=np.float64) ** 2
    raise ValueError(f"beta_schedule {beta_schedule!r} is not supported (linear, scaled_linear)")


@struct.dataclass
class DDPMSchedule:
    """A pytree: pass it into jitted functions. `t` arguments are integer arrays of shape (B,)
    (or scalars) and broadcast against the leading axis of the data."""
    betas: jax.Array
    alphas_cumprod: jax.Array
    prediction_type: str = struct.field(pytree_node=False, default="epsilon")

    @classmethod
    def create(cls, num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
               beta_schedule: str = "scaled_linear", prediction_type: str = "epsilon",
               trained_betas=None) -> "DDPMSchedule":
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type {prediction_type!r} is not one of {PREDICTION_TYPES}")
        betas = (np.asarray(trained_betas, np.float64) if trained_betas is not None
                 else make_betas(num_train_timesteps, beta_start, beta_end, beta_schedule))
        alphas_cumprod = np.cumprod(1.0 - betas)
        return cls(jnp.asarray(betas, jnp.float32), jnp.asarray(alphas_cumprod, jnp.float32), prediction_type)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "DDPMSchedule":
        """From a diffusers scheduler_config.json dict; sampler-only keys are not needed here."""
        keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type",
                "trained_betas")
        return cls.create(**{k: config[k] for k in keys if k in config})

    @property
    def num_train_timesteps(self) -> int:
        return self.betas.shape[0]

    def _coef(self, values, t, x):
        c = values[jnp.asarray(t)]
        return c.reshape(c.shape + (1,) * (x.ndim - c.ndim)).astype(x.dtype)

    def sqrt_alpha(self, t, x):
        return self._coef(jnp.sqrt(self.alphas_cumprod), t, x)

    def sqrt_one_minus_alpha(self, t, x):
        return self._coef(jnp.sqrt(1.0 - self.alphas_cumprod), t, x)

    def add_noise(self, x0, noise, t):
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise."""
        return self.sqrt_alpha(t, x0) * x0 + self.sqrt_one_minus_alpha(t, x0) * noise

    def eps_to_x0(self, x_t, eps, t):
        return (x_t - self.sqrt_one_minus_alpha(t, x_t) * eps) / self.sqrt_alpha(t, x_t)

    def x0_to_eps(self, x_t, x0, t):
        return (x_t - self.sqrt_alpha(t, x_t) * x0) / self.sqrt_one_minus_alpha(t, x_t)

    def pred_to_x0(self, x_t, model_output, t):
        """The x0 estimate from a model output of this schedule's prediction_type."""
        if self.prediction_type == "epsilon":
            return self.eps_to_x0(x_t, model_output, t)
        if self.prediction_type == "v_prediction":
            return self.sqrt_alpha(t, x_t) * x_t - self.sqrt_one_minus_alpha(t, x_t) * model_output
        return model_output

    def velocity(self, x0, noise, t):
        """The v-prediction target sqrt(abar) noise - sqrt(1 - abar) x0."""
        return self.sqrt_alpha(t, x0) * noise - self.sqrt_one_minus_alpha(t, x0) * x0
