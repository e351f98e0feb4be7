"""Sample grids during training: the student (and the teacher, for comparison) denoise the same
noise with the same captions using an Euler sampler in JAX; the latents are decoded with the
teacher's VAE when one is available (`koala_jax.pipelines.vae`, needs torch) or shown as a latent preview
otherwise."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from koala_jax.models import UNet2DConditionModel
from koala_jax.train.noise import NoiseSchedule


def euler_timesteps(schedule: NoiseSchedule, steps: int) -> np.ndarray:
    """Trailing spacing (what few-step students are sampled with): 999, ..., down to ~1000/steps - 1."""
    n = schedule.num_train_timesteps
    return np.round(np.arange(n, 0, -n / steps)).astype(np.int64) - 1


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
    """Euler sampling of an epsilon- or v-prediction U-Net (diffusers' EulerDiscreteScheduler, no
    guidance): x_T = noise * sigma_T, x <- x + (sigma_next - sigma) * d with d = (x - x0_hat) / sigma."""
    abar = schedule.alphas_cumprod
    ts = euler_timesteps(schedule, steps)
    sigmas = np.append(np.sqrt((1 - abar[ts]) / abar[ts]), 0.0).astype(np.float32)
    apply = jax.jit(unet.apply)
    x = noise * np.sqrt(sigmas[0] ** 2 + 1.0)
    for i, t in enumerate(ts):
        scale = 1.0 / np.sqrt(sigmas[i] ** 2 + 1.0)
        out = apply({"params": params}, x * scale, jnp.full((x.shape[0],), t), ehs, pooled, time_ids).astype(
            jnp.float32
        )
        if schedule.prediction_type == "epsilon":
            x0 = x - sigmas[i] * out
        else:  # v-prediction, in sigma form
            x0 = x * scale**2 - out * sigmas[i] * scale
        x = x + (sigmas[i + 1] - sigmas[i]) * (x - x0) / sigmas[i]
    return x


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
