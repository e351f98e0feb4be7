"""kd.feat_norm (koala_jax/train/losses.py) on hand-computed values: 'none' is the plain sum of per-pair MSEs,
'teacher' divides each pair's MSE by the mean square of its (detached) teacher feature."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from koala_jax.errors import ConfigError
from koala_jax.train.losses import FEAT_NORM_EPS, LossWeights, check_feat_norm, kd_losses, mse

# Pair a: teacher mean square (4 + 0 + 0 + 4) / 4 = 2, squared errors 1, 1, 0, 4 -> MSE 1.5, normalised 0.75.
# Pair b: teacher mean square 9, squared errors 9, 0 -> MSE 4.5, normalised 0.5.
STUDENT = {"a": jnp.array([1.0, 1.0, 0.0, 4.0]), "b": jnp.array([0.0, -3.0])}
TEACHER = {"ta": jnp.array([2.0, 0.0, 0.0, 2.0]), "tb": jnp.array([3.0, -3.0])}
PAIRS = {"a": "ta", "b": "tb"}
# Outputs: task MSE([1, 2], [1, 0]) = 2, output KD MSE([1, 2], [0, 2]) = 0.5.
OUT, TEACHER_OUT, TARGET = jnp.array([1.0, 2.0]), jnp.array([0.0, 2.0]), jnp.array([1.0, 0.0])


def losses(feat_norm: str, student=STUDENT) -> dict[str, jnp.ndarray]:
    weights = LossWeights(task=1.0, out=1.0, feat=2.0, feat_norm=feat_norm)
    return kd_losses(OUT, TEACHER_OUT, TARGET, student, TEACHER, PAIRS, weights)


def test_none_sums_plain_mses():
    terms = losses("none")
    assert float(terms["feat_kd"]) == 1.5 + 4.5
    assert float(terms["total"]) == 2.0 + 0.5 + 2.0 * 6.0
    # Bit for bit the BK-SDM / KOALA form on arbitrary values.
    g = jax.random.split(jax.random.key(0), 2)
    s, t = jax.random.normal(g[0], (3, 5)), jax.random.normal(g[1], (3, 5))
    got = kd_losses(OUT, TEACHER_OUT, TARGET, {"x": s}, {"y": t}, {"x": "y"}, LossWeights())["feat_kd"]
    assert got.tobytes() == (jnp.zeros((), jnp.float32) + mse(s, t)).tobytes()


def test_teacher_divides_each_pair_by_the_teacher_mean_square():
    terms = losses("teacher")
    assert float(terms["feat_kd"]) == 0.75 + 0.5
    assert float(terms["task"]) == 2.0 and float(terms["out_kd"]) == 0.5
    assert float(terms["total"]) == 2.0 + 0.5 + 2.0 * 1.25


def test_teacher_norm_gradient_treats_the_divisor_as_a_constant():
    """d/ds MSE(s, t) / ms(t) = 2 (s - t) / (N ms(t)): pair a (s - t) / 4, pair b (s - t) / 9; the teacher gets
    no gradient."""

    def feat(student, teacher):
        weights = LossWeights(feat_norm="teacher")
        return kd_losses(OUT, TEACHER_OUT, TARGET, student, teacher, PAIRS, weights)["feat_kd"]

    by_student, by_teacher = jax.grad(feat, argnums=(0, 1))(STUDENT, TEACHER)
    assert by_student["a"].tolist() == [-0.25, 0.25, 0.0, 0.5]
    assert by_student["b"].tolist() == pytest.approx([-1 / 3, 0.0], rel=1e-6)
    assert all(not jnp.any(g) for g in by_teacher.values())


def test_zero_teacher_feature_is_divided_by_the_epsilon():
    """An all-zero teacher feature: MSE([0.5, 0], [0, 0]) = 0.125 over FEAT_NORM_EPS, finite, not NaN."""
    teacher = {"t": jnp.zeros(2)}
    weights = LossWeights(feat_norm="teacher")
    got = kd_losses(OUT, TEACHER_OUT, TARGET, {"s": jnp.array([0.5, 0.0])}, teacher, {"s": "t"}, weights)
    assert float(got["feat_kd"]) == pytest.approx(0.125 / FEAT_NORM_EPS, rel=1e-6)
    same = kd_losses(OUT, TEACHER_OUT, TARGET, {"s": jnp.zeros(2)}, teacher, {"s": "t"}, weights)
    assert float(same["feat_kd"]) == 0.0


@pytest.mark.parametrize("value", ["Teacher", "l2", ""])
def test_unknown_feat_norm_is_refused_by_name(value):
    with pytest.raises(ConfigError, match=r"kd\.feat_norm must be 'none' or 'teacher', got"):
        check_feat_norm(value)
    with pytest.raises(ConfigError, match="kd.feat_norm"):
        LossWeights(feat_norm=value)
    check_feat_norm("none")
    check_feat_norm("teacher")
