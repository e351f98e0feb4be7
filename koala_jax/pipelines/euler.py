"""Euler sampling in JAX, as diffusers' EulerDiscreteScheduler computes it (deterministic: no churn): the one
sampler of the JAX SDXL pipeline (`jax_sdxl`) and of the training previews (`koala_jax.train.preview`).

Timesteps and sigmas are computed on the host exactly as diffusers' `set_timesteps` does ("leading" with
steps_offset, "trailing", "linspace"; float32 like its torch tensors); the whole denoising loop, with
classifier-free guidance when asked for, is one jitted `fori_loop`, so a batch sharded over devices stays
there from the first step to the last.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from koala_jax.errors import ConfigError
from koala_jax.files import fault_point
from koala_jax.models import UNet2DConditionModel

SPACINGS = ("leading", "trailing", "linspace")
BETA_SCHEDULES = ("linear", "scaled_linear")
PREDICTION_TYPES = ("epsilon", "v_prediction")
# EulerDiscreteScheduler options accepted only at their default (variants the SDXL family does not use).
_FIXED_FIELDS: dict[str, Any] = {
    "trained_betas": None,
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "timestep_type": "discrete",
    "rescale_betas_zero_snr": False,
    "final_sigmas_type": "zero",
}


@dataclasses.dataclass(frozen=True)
class EulerSchedule:
    """EulerDiscreteScheduler's settings; field names and defaults as in its scheduler_config.json."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    prediction_type: str = "epsilon"
    timestep_spacing: str = "linspace"
    steps_offset: int = 0

    def __post_init__(self) -> None:
        for name, allowed in (
            ("beta_schedule", BETA_SCHEDULES),
            ("prediction_type", PREDICTION_TYPES),
            ("timestep_spacing", SPACINGS),
        ):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"scheduler {name} {getattr(self, name)!r} is not supported; choose from {allowed}")

    @classmethod
    def from_diffusers(cls, config: dict[str, Any], **overrides: Any) -> EulerSchedule:
        """The Euler schedule of a diffusers scheduler config, as `EulerDiscreteScheduler.from_config(config,
        **overrides)` builds it: fields Euler does not take (another scheduler's: DDIM's clip_sample, ...) are
        ignored as diffusers ignores them; Euler options we do not implement are refused by name."""
        given = {**config, **overrides}
        for key, default in _FIXED_FIELDS.items():
            if given.get(key, default) != default:
                raise ConfigError(f"scheduler field {key!r} = {given[key]!r} is not supported (only {default!r})")
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in given.items() if k in fields})

    @property
    def alphas_cumprod(self) -> np.ndarray:
        """Cumulative products of 1 - beta, in float64 (diffusers' float32 torch arithmetic rounds differently:
        the sigmas agree to a few 1e-6 relative, and to ~4e-7 absolute near t = 0 where float32 cancels)."""
        n = self.num_train_timesteps
        if self.beta_schedule == "scaled_linear":
            betas = np.linspace(self.beta_start**0.5, self.beta_end**0.5, n) ** 2
        else:
            betas = np.linspace(self.beta_start, self.beta_end, n)
        return np.cumprod(1.0 - betas)

    def timesteps(self, steps: int) -> np.ndarray:
        """The `steps` timesteps, noisiest first (float32, as the U-Net receives them)."""
        n = self.num_train_timesteps
        if self.timestep_spacing == "linspace":
            return np.linspace(0, n - 1, steps, dtype=np.float32)[::-1].copy()
        if self.timestep_spacing == "leading":
            ratio = n // steps
            return (np.arange(0, steps) * ratio).round()[::-1].astype(np.float32) + self.steps_offset
        return np.arange(n, 0, -n / steps).round().astype(np.float32) - 1

    def sigmas(self, timesteps: np.ndarray) -> np.ndarray:
        """sqrt((1 - abar) / abar) at `timesteps` (linear interpolation between integer steps), then 0."""
        abar = self.alphas_cumprod
        table = ((1 - abar) / abar) ** 0.5
        sigmas = np.interp(timesteps, np.arange(len(table)), table)
        return np.concatenate([sigmas, [0.0]]).astype(np.float32)

    def init_noise_sigma(self, sigmas: np.ndarray) -> float:
        """What unit-variance noise is scaled by to start: the largest sigma ("linspace", "trailing") or
        sqrt(sigma_max^2 + 1) ("leading"), as diffusers."""
        top = float(sigmas.max())
        return top if self.timestep_spacing in ("linspace", "trailing") else (top**2 + 1) ** 0.5


class Conditioning(NamedTuple):
    """What the SDXL U-Net is conditioned on, per sample: prompt_embeds (B, L, D), pooled text embeds
    (B, P) and micro-conditioning time_ids (B, 6)."""

    prompt_embeds: jnp.ndarray
    pooled: jnp.ndarray
    time_ids: jnp.ndarray


def euler_sample(
    unet: UNet2DConditionModel,
    params: Any,
    noise: jnp.ndarray,
    cond: Conditioning,
    schedule: EulerSchedule,
    steps: int,
    guidance_scale: float = 1.0,
    uncond: Conditioning | None = None,
) -> jnp.ndarray:
    """Latents (B, C, h, w) float32 from unit-variance `noise` after `steps` Euler steps.

    With `uncond`, classifier-free guidance as StableDiffusionXLPipeline: one U-Net call on the batch
    [uncond, cond], then uncond + guidance_scale * (cond - uncond).
    """
    timesteps = schedule.timesteps(steps)
    sigmas = schedule.sigmas(timesteps)
    x = jnp.asarray(noise, jnp.float32) * schedule.init_noise_sigma(sigmas)
    if uncond is not None:
        cond = Conditioning(*(jnp.concatenate([u, c]) for u, c in zip(uncond, cond)))
    fault_point("euler_sample")  # the tests' signals during the (first call's) XLA compile
    return _euler_loop(
        unet, schedule.prediction_type, uncond is not None, params, x, cond, guidance_scale, timesteps, sigmas
    )


def guided_prediction(
    unet: UNet2DConditionModel,
    params: Any,
    x: jnp.ndarray,
    t: jnp.ndarray,
    both: Conditioning,
    guidance_scale: float,
) -> jnp.ndarray:
    """Classifier-free guidance as StableDiffusionXLPipeline: one U-Net call on [x, x] conditioned on `both`
    ([uncond, cond] stacked on the batch), then uncond + guidance_scale * (cond - uncond), float32. `t`: () or
    one per sample of `x`. Progressive distillation (koala_jax.train.progressive) guides its teacher the same way."""
    t = jnp.concatenate([t, t]) if jnp.ndim(t) else t
    out = unet.apply({"params": params}, jnp.concatenate([x, x]), t, *both)
    uncond_out, cond_out = jnp.split(out.astype(jnp.float32), 2)
    return uncond_out + guidance_scale * (cond_out - uncond_out)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _euler_loop(
    unet: UNet2DConditionModel,
    prediction_type: str,
    guided: bool,
    params: Any,
    x: jnp.ndarray,
    cond: Conditioning,
    guidance_scale: float,
    timesteps: jnp.ndarray,
    sigmas: jnp.ndarray,
) -> jnp.ndarray:
    def step(i: int, x: jnp.ndarray) -> jnp.ndarray:
        sigma = sigmas[i]
        scaled = x / jnp.sqrt(sigma**2 + 1)
        if guided:
            out = guided_prediction(unet, params, scaled, timesteps[i], cond, guidance_scale)
        else:
            out = unet.apply({"params": params}, scaled, timesteps[i], *cond).astype(jnp.float32)
        if prediction_type == "epsilon":
            x0 = x - sigma * out
        else:  # v-prediction, in sigma form
            x0 = out * (-sigma / jnp.sqrt(sigma**2 + 1)) + x / (sigma**2 + 1)
        return x + (x - x0) / sigma * (sigmas[i + 1] - sigma)

    return jax.lax.fori_loop(0, timesteps.shape[0], step, x)
