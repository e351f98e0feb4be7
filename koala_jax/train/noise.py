"""The SDXL noise schedule (DDPM, scaled-linear betas, 1000 steps) and the regression targets.

Same numbers as diffusers' DDPMScheduler / EulerDiscreteScheduler with SDXL's scheduler_config:
beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclasses.dataclass(frozen=True)
class NoiseSchedule:
    """alphas_cumprod of a scaled-linear schedule, and how to noise and what to predict."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    prediction_type: str = "epsilon"
    # Train only on these timesteps (e.g. a step-distilled teacher's own steps); None: all of them.
    timesteps: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type {self.prediction_type!r} not in {PREDICTION_TYPES}")
        if self.timesteps is not None and not all(0 <= t < self.num_train_timesteps for t in self.timesteps):
            raise ValueError(f"timesteps {self.timesteps} must lie in [0, {self.num_train_timesteps})")

    @property
    def alphas_cumprod(self) -> np.ndarray:
        betas = np.linspace(self.beta_start**0.5, self.beta_end**0.5, self.num_train_timesteps, dtype=np.float64) ** 2
        return np.cumprod(1.0 - betas).astype(np.float32)

    def sample_timesteps(self, rng: jax.Array, batch: int) -> jnp.ndarray:
        """Integer timesteps, uniform over the schedule or over the configured set."""
        if self.timesteps is None:
            return jax.random.randint(rng, (batch,), 0, self.num_train_timesteps)
        return jax.random.choice(rng, jnp.asarray(self.timesteps, jnp.int32), (batch,))

    def add_noise(self, x0: jnp.ndarray, noise: jnp.ndarray, t: jnp.ndarray) -> jnp.ndarray:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise (NCHW, t per sample)."""
        abar = jnp.asarray(self.alphas_cumprod)[t][:, None, None, None]
        return jnp.sqrt(abar) * x0 + jnp.sqrt(1.0 - abar) * noise

    def target(self, x0: jnp.ndarray, noise: jnp.ndarray, t: jnp.ndarray) -> jnp.ndarray:
        """What the U-Net regresses: the noise (epsilon) or v = sqrt(abar) noise - sqrt(1 - abar) x0."""
        if self.prediction_type == "epsilon":
            return noise
        abar = jnp.asarray(self.alphas_cumprod)[t][:, None, None, None]
        return jnp.sqrt(abar) * noise - jnp.sqrt(1.0 - abar) * x0
