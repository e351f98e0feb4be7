"""Progressive distillation (Salimans & Ho, ICLR 2022) for this project's epsilon-prediction SDXL schedule and
Euler sampler: a student initialised from the teacher learns to take in ONE Euler step what the teacher takes
in TWO, so each round halves the number of sampling steps (16 -> 8 -> 4 -> 2). The teacher is run with
classifier-free guidance at a fixed scale: the guided result is baked into the student, which then samples
without guidance (the next rounds use scale 1: their teacher already is guided).

The target, derived. Euler works on x = x_t / sqrt(abar_t) = x0 + sigma eps, sigma = sqrt((1 - abar) / abar)
(koala_jax.pipelines.euler); the U-Net sees x / sqrt(sigma^2 + 1) = x_t. With an epsilon prediction e,
x0_hat = x - sigma e and one step from sigma to sigma_next is x_next = x + (x - x0_hat) / sigma
(sigma_next - sigma) = x + e (sigma_next - sigma). (This is DDIM: the DDIM update is exactly Euler in x.)
On the student's trailing timesteps t > t'' (sigma > sigma''), with t' the teacher's step between them:

    teacher:  x'  = x  + e1 (sigma'  - sigma),   e1 = eps_T(x, t)       (guided)
              x'' = x' + e2 (sigma'' - sigma'),  e2 = eps_T(x', t')     (guided)
    student:  x_S = x  + e_S (sigma'' - sigma)

x_S = x'' exactly when e_S = (x'' - x) / (sigma'' - sigma)
                            = [e1 (sigma - sigma') + e2 (sigma' - sigma'')] / (sigma - sigma''),
a convex combination of the teacher's two predictions (computed in that form: no cancellation in x'' - x). The
student regresses its epsilon onto it with the task loss's MSE, which is the x-space loss |x_S - x''|^2 weighted
by 1 / (sigma - sigma'')^2. x is the noised data x0 + sigma noise at one of the student's timesteps, drawn
uniformly; the last student step (sigma'' = 0) ends at the teacher's x0 estimate, as the sampler does.

The teacher's 2N trailing timesteps must contain the student's N (every other one): trailing spacing gives that
for 1000 training steps and N a power of two (checked, `ProgressiveDistillation.__post_init__`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from koala_jax.errors import ConfigError
from koala_jax.models import UNet2DConditionModel
from koala_jax.pipelines.euler import Conditioning, EulerSchedule, guided_prediction

OBJECTIVES = ("koala", "progressive")  # train.py's `objective`: KOALA's KD loss, or progressive distillation
PROGRESSIVE = "progressive"

# (model input x / sqrt(sigma^2 + 1), timesteps (B,)) -> the teacher's (guided) epsilon, float32.
EpsFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]


@dataclasses.dataclass(frozen=True)
class ProgressiveDistillation:
    """One round: a student of `steps` Euler steps learns from a teacher of 2 x `steps` on `schedule` (trailing
    spacing), the teacher guided at `guidance` (1: no guidance, one U-Net call per teacher step)."""

    schedule: EulerSchedule
    steps: int
    guidance: float

    def __post_init__(self) -> None:
        if self.steps < 1 or self.guidance < 1.0:
            raise ConfigError(
                f"objective.steps {self.steps} must be at least 1 and objective.guidance {self.guidance} at "
                "least 1 (1: no guidance)"
            )
        if self.schedule.prediction_type != "epsilon":
            raise ConfigError(
                f"progressive distillation needs an epsilon-prediction teacher, not {self.schedule.prediction_type!r}"
            )
        student, teacher = self.schedule.timesteps(self.steps), self.schedule.timesteps(2 * self.steps)
        if not np.array_equal(teacher[::2], student):
            raise ConfigError(
                f"objective.steps {self.steps}: the teacher's {2 * self.steps} {self.schedule.timestep_spacing} "
                f"timesteps do not contain the student's (every other one); use a power of two"
            )

    def table(self) -> dict[str, np.ndarray]:
        """Per student step i: its timestep t and sigma, the teacher's midpoint t_mid / sigma_mid, and the next
        student sigma (0 after the last), float32 (N,)."""
        t = self.schedule.timesteps(2 * self.steps)
        sigma = self.schedule.sigmas(t)  # 2N + 1 values, the last 0
        return {
            "t": t[0::2],
            "t_mid": t[1::2],
            "sigma": sigma[0:-1:2],
            "sigma_mid": sigma[1::2],
            "sigma_next": sigma[2::2],
        }

    def noised(self, x0: jnp.ndarray, noise: jnp.ndarray, index: jnp.ndarray) -> tuple[jnp.ndarray, ...]:
        """(x = x0 + sigma noise in the sampler's scaling, timesteps (B,), the U-Net's input at x) at the
        student's steps `index` (B,)."""
        table = self.table()
        sigma = _per_sample(table["sigma"], index)
        x = x0 + sigma * noise
        return x, jnp.asarray(table["t"])[index], model_input(x, sigma)

    def target(self, teacher_eps: EpsFn, x: jnp.ndarray, index: jnp.ndarray) -> jnp.ndarray:
        """The student's epsilon target at x (sampler scaling, student step `index` (B,)): two teacher Euler
        steps folded into one (module docstring)."""
        table = self.table()
        s, s_mid, s_next = (_per_sample(table[k], index) for k in ("sigma", "sigma_mid", "sigma_next"))
        t_mid = jnp.asarray(table["t_mid"])[index]
        e1 = teacher_eps(model_input(x, s), jnp.asarray(table["t"])[index])
        x_mid = x + e1 * (s_mid - s)
        e2 = teacher_eps(model_input(x_mid, s_mid), t_mid)
        return (e1 * (s - s_mid) + e2 * (s_mid - s_next)) / (s - s_next)


def _per_sample(values: np.ndarray, index: jnp.ndarray) -> jnp.ndarray:
    """values[index] shaped (B, 1, 1, 1) to scale NCHW latents."""
    return jnp.asarray(values)[index][:, None, None, None]


def model_input(x: jnp.ndarray, sigma: jnp.ndarray) -> jnp.ndarray:
    """What the U-Net sees at the sampler's x: x / sqrt(sigma^2 + 1) (= x_t of the DDPM scaling)."""
    return x / jnp.sqrt(sigma**2 + 1)


def guided_teacher(
    teacher: UNet2DConditionModel, params: Any, cond: Conditioning, uncond: Conditioning, guidance: float
) -> EpsFn:
    """The teacher's epsilon for conditioning `cond`, guided at `guidance` against `uncond` as the pipeline
    samples (`guided_prediction`); no teacher gradient."""

    def eps(x: jnp.ndarray, t: jnp.ndarray) -> jnp.ndarray:
        if guidance == 1.0:
            out = teacher.apply({"params": params}, x, t, *cond).astype(jnp.float32)
        else:
            both = Conditioning(*(jnp.concatenate([u, c]) for u, c in zip(uncond, cond)))
            out = guided_prediction(teacher, params, x, t, both, guidance)
        return jax.lax.stop_gradient(out)

    return eps
