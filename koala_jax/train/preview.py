"""Sample grids during training: the student (and the teacher, for comparison) denoise the same
noise with the same captions using the pipelines' Euler sampler (`koala_jax.pipelines.euler`, trailing
spacing, no guidance) on the training noise schedule; the latents are decoded by the teacher's VAE in JAX
when one is given (`koala_jax.pipelines.vae`) or shown as a latent preview otherwise."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from koala_jax.models import UNet2DConditionModel
from koala_jax.pipelines.euler import Conditioning, EulerSchedule
from koala_jax.pipelines.euler import euler_sample as pipeline_euler_sample
from koala_jax.train.noise import NoiseSchedule


def euler_schedule(schedule: NoiseSchedule) -> EulerSchedule:
    """The sampler's view of the training schedule: trailing spacing (what few-step students are sampled with)."""
    return EulerSchedule(
        num_train_timesteps=schedule.num_train_timesteps,
        beta_start=schedule.beta_start,
        beta_end=schedule.beta_end,
        beta_schedule="scaled_linear",
        prediction_type=schedule.prediction_type,
        timestep_spacing="trailing",
    )


def euler_sample(
    unet: UNet2DConditionModel,
    params,
    noise: jnp.ndarray,
    ehs: jnp.ndarray,
    pooled: jnp.ndarray,
    time_ids: jnp.ndarray,
    schedule: NoiseSchedule,
    steps: int,
) -> jnp.ndarray:
    """Latents sampled by `unet` from `noise` for the batch's conditioning, no guidance."""
    return pipeline_euler_sample(
        unet, params, noise, Conditioning(ehs, pooled, time_ids), euler_schedule(schedule), steps
    )


def latent_preview(latents: np.ndarray) -> np.ndarray:
    """(B, C, h, w) latents -> (B, h, w, 3) images in [0, 1] from the first three channels."""
    x = np.asarray(latents, np.float32)[:, :3].transpose(0, 2, 3, 1)
    lo, hi = x.min(axis=(1, 2, 3), keepdims=True), x.max(axis=(1, 2, 3), keepdims=True)
    return (x - lo) / np.maximum(hi - lo, 1e-6)


def grid(images: np.ndarray, columns: int) -> np.ndarray:
    """(B, H, W, 3) -> one (rows*H, columns*W, 3) image."""
    b, h, w, c = images.shape
    rows = -(-b // columns)
    padded = np.zeros((rows * columns, h, w, c), images.dtype)
    padded[:b] = images
    return padded.reshape(rows, columns, h, w, c).transpose(0, 2, 1, 3, 4).reshape(rows * h, columns * w, c)
