"""The KOALA objective: L = l_task * L_task + l_out * L_outKD + l_feat * L_featKD.

L_task: MSE between the student's prediction and the true target (noise or v); L_outKD: MSE between
student and teacher predictions on the same noisy input; L_featKD: the sum over paired features of
the MSE between student and teacher feature (BK-SDM's form, which KOALA builds on). All in float32.

`kd.feat_norm='teacher'` (our choice, LAPTOP-Diff's form, not KOALA's) divides each pair's MSE by the mean square
of its teacher feature: feature targets of very different magnitudes (last stage outputs, resnets, self-attention)
then pull with comparable strength at the same lambda_feat. docs/training.md gives the formula.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp

from koala_jax.errors import ConfigError
from koala_jax.models.config import UNetConfig
from koala_jax.students.mapping import teacher_path_for

FEAT_NORMS = ("none", "teacher")
# The smallest divisor of feat_norm='teacher': a teacher feature whose mean square is below it (RMS < 1e-4, e.g. an
# all-zero one) is divided by FEAT_NORM_EPS instead, so its loss stays finite; above it the division is exact.
FEAT_NORM_EPS = 1e-8


def check_feat_norm(value: str) -> None:
    """Refuse an unknown `kd.feat_norm` by name (a typo would otherwise silently train the wrong objective)."""
    if value not in FEAT_NORMS:
        choices = " or ".join(repr(v) for v in FEAT_NORMS)
        raise ConfigError(f"kd.feat_norm must be {choices}, got {value!r}: set --config.kd.feat_norm to one of them")


@dataclasses.dataclass(frozen=True)
class LossWeights:
    task: float = 1.0
    out: float = 1.0
    feat: float = 1.0
    feat_norm: str = "none"  # `kd.feat_norm`: 'none' or 'teacher'

    def __post_init__(self) -> None:
        check_feat_norm(self.feat_norm)

    @property
    def uses_teacher(self) -> bool:
        """False for plain diffusion training (task loss only): the teacher is then never run."""
        return bool(self.out or self.feat)


def mse(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
    return jnp.mean(jnp.square(a.astype(jnp.float32) - b.astype(jnp.float32)))


def teacher_normalised_mse(student: jnp.ndarray, teacher: jnp.ndarray) -> jnp.ndarray:
    """MSE(student, teacher) / max(mean(teacher**2), FEAT_NORM_EPS): the pair's squared error relative to the
    teacher feature's own magnitude (`teacher` must already be detached; the divisor is float32 too)."""
    scale = jnp.maximum(jnp.mean(jnp.square(teacher.astype(jnp.float32))), FEAT_NORM_EPS)
    return mse(student, teacher) / scale


def feature_pairs(
    student_shapes: dict[str, tuple],
    teacher_shapes: dict[str, tuple],
    teacher: UNetConfig,
    student: UNetConfig,
    pattern: str = "",
    selection: dict[str, tuple[int, ...]] | None = None,
) -> dict[str, str]:
    """{student feature path: teacher feature path} for every student feature (optionally only those
    matching the regex `pattern`) whose teacher source block (the one it was initialised from) exists
    with the same shape. A student feature without such a partner is an error: silently dropping a
    distillation term would change the objective. `selection`: the teacher blocks a student spec lists."""
    pairs = {}
    for name, shape in sorted(student_shapes.items()):
        if pattern and not re.search(pattern, name):
            continue
        source = teacher_path_for(name, teacher, student, selection)
        if teacher_shapes.get(source) != shape:
            raise ConfigError(
                f"student feature {name} {shape} has no teacher partner {source} "
                f"(teacher shape {teacher_shapes.get(source)})"
            )
        pairs[name] = source
    return pairs


def kd_losses(
    student_out: jnp.ndarray,
    teacher_out: jnp.ndarray | None,
    target: jnp.ndarray,
    student_feats: dict[str, jnp.ndarray],
    teacher_feats: dict[str, jnp.ndarray],
    pairs: dict[str, str],
    weights: LossWeights,
) -> dict[str, jnp.ndarray]:
    """The loss terms and their weighted total; teacher values carry no gradient. Without a teacher
    (`teacher_out` None: plain diffusion training) both KD terms are 0. `feat_kd` is on the scale the loss uses
    (relative to the teacher feature with feat_norm='teacher'), unweighted."""
    zero = jnp.zeros((), jnp.float32)
    pair_loss = teacher_normalised_mse if weights.feat_norm == "teacher" else mse
    feat = sum(
        (pair_loss(student_feats[s], jax.lax.stop_gradient(teacher_feats[t])) for s, t in pairs.items()),
        start=zero,
    )
    out_kd = zero if teacher_out is None else mse(student_out, jax.lax.stop_gradient(teacher_out))
    terms = {"task": mse(student_out, target), "out_kd": out_kd, "feat_kd": feat}
    terms["total"] = weights.task * terms["task"] + weights.out * terms["out_kd"] + weights.feat * terms["feat_kd"]
    return terms
