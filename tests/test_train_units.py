"""Training pieces checked by hand or against diffusers: noise schedule, targets, losses, sharding."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from koala_jax import UNetConfig, derive_student_config
from koala_jax.train.losses import LossWeights, feature_pairs, kd_losses
from koala_jax.train.noise import NoiseSchedule
from koala_jax.train.sharding import fsdp_spec, make_mesh

from tests.conftest import TINY_TEACHER


def test_noise_schedule_matches_diffusers_sdxl_scheduler():
    ref = DDPMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        num_train_timesteps=1000,
        prediction_type="v_prediction",
    )
    ours = NoiseSchedule(prediction_type="v_prediction")
    np.testing.assert_allclose(ours.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=1e-6)
    g = np.random.default_rng(0)
    x0, noise = g.standard_normal((2, 3, 4, 4)).astype(np.float32), g.standard_normal((2, 3, 4, 4)).astype(np.float32)
    t = np.array([3, 977])
    want = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)).numpy()
    np.testing.assert_allclose(ours.add_noise(x0, noise, jnp.asarray(t)), want, rtol=1e-5, atol=1e-6)
    want_v = ref.get_velocity(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)).numpy()
    np.testing.assert_allclose(ours.target(x0, noise, jnp.asarray(t)), want_v, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(NoiseSchedule().target(x0, noise, jnp.asarray(t)), noise)


def test_restricted_timesteps_for_step_distilled_teachers():
    s = NoiseSchedule(timesteps=(999, 749, 499, 249))
    t = np.asarray(s.sample_timesteps(jax.random.key(0), 512))
    assert set(t.tolist()) == {999, 749, 499, 249}
    with pytest.raises(ValueError, match="must lie in"):
        NoiseSchedule(timesteps=(1000,))


def test_kd_losses_by_hand():
    s_out, t_out, target = jnp.full((1, 2), 1.0), jnp.array([[1.0, 3.0]]), jnp.zeros((1, 2))
    s_feats = {"a.attn1": jnp.array([[0.0, 0.0]]), "b.attn1": jnp.array([[2.0]])}
    t_feats = {"a.attn1": jnp.array([[1.0, 1.0]]), "B.attn1": jnp.array([[0.0]])}
    terms = kd_losses(
        s_out,
        t_out,
        target,
        s_feats,
        t_feats,
        {"a.attn1": "a.attn1", "b.attn1": "B.attn1"},
        LossWeights(task=0.5, out=2.0, feat=3.0),
    )
    assert float(terms["task"]) == 1.0  # mean((1-0)^2)
    assert float(terms["out_kd"]) == 2.0  # mean(0, 4)
    assert float(terms["feat_kd"]) == 5.0  # 1 (pair a) + 4 (pair b)
    assert float(terms["total"]) == 0.5 * 1 + 2.0 * 2 + 3.0 * 5
    grads = jax.grad(lambda o: kd_losses(o, t_out, target, {}, {}, {}, LossWeights())["total"])(s_out)
    np.testing.assert_allclose(grads, [[1.0, -1.0]])  # d/do [mean(o^2) + mean((o-t)^2)] = o + (o - t)


def test_feature_pairs_follow_student_init():
    teacher = UNetConfig.from_diffusers(TINY_TEACHER)
    student = derive_student_config(teacher, "koala-700m")
    t_shapes = {
        "up_blocks.0.attentions.2.transformer_blocks.1.attn1": (1, 4, 128),
        "up_blocks.0.attentions.0.transformer_blocks.1.attn1": (1, 4, 128),
    }
    s_shapes = {
        "up_blocks.0.attentions.1.transformer_blocks.1.attn1": (1, 4, 128),
        "up_blocks.0.attentions.0.transformer_blocks.1.attn1": (1, 4, 128),
    }
    pairs = feature_pairs(s_shapes, t_shapes, teacher, student)
    assert pairs == {
        "up_blocks.0.attentions.1.transformer_blocks.1.attn1": "up_blocks.0.attentions.2.transformer_blocks.1.attn1",
        "up_blocks.0.attentions.0.transformer_blocks.1.attn1": "up_blocks.0.attentions.0.transformer_blocks.1.attn1",
    }
    assert list(feature_pairs(s_shapes, t_shapes, teacher, student, pattern=r"attentions\.0")) == [
        "up_blocks.0.attentions.0.transformer_blocks.1.attn1"
    ]
    with pytest.raises(ValueError, match="no teacher partner"):
        feature_pairs({"mid_block.attentions.0.transformer_blocks.0.attn1": (1, 4, 128)}, t_shapes, teacher, student)


def test_fsdp_rule_and_mesh_errors():
    assert fsdp_spec((1280, 640, 3, 3), 4) == jax.sharding.PartitionSpec("fsdp", None, None, None)
    assert fsdp_spec((5, 4096), 2) == jax.sharding.PartitionSpec(None, "fsdp")
    assert fsdp_spec((320,), 8) == jax.sharding.PartitionSpec()  # small: replicated
    assert fsdp_spec((4099, 3), 2) == jax.sharding.PartitionSpec()  # indivisible: replicated
    with pytest.raises(ValueError, match="does not cover"):
        make_mesh(data=3, fsdp=1)


def test_preview_sampler_timesteps_and_sigmas_match_diffusers_euler_trailing():
    from diffusers import EulerDiscreteScheduler

    from koala_jax.train.preview import euler_schedule, grid, latent_preview

    ref = EulerDiscreteScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, timestep_spacing="trailing"
    )
    ref.set_timesteps(10)
    schedule = euler_schedule(NoiseSchedule())
    ts = schedule.timesteps(10)
    np.testing.assert_array_equal(ts, ref.timesteps.numpy())
    np.testing.assert_allclose(schedule.sigmas(ts), ref.sigmas.numpy(), rtol=1e-5)
    # The sampler's schedule is the training one.
    np.testing.assert_allclose(schedule.alphas_cumprod, NoiseSchedule().alphas_cumprod, rtol=1e-6)
    images = latent_preview(np.random.default_rng(0).standard_normal((3, 4, 5, 6)))
    assert images.shape == (3, 5, 6, 3) and images.min() == 0.0 and images.max() == 1.0
    assert grid(images, columns=2).shape == (10, 12, 3)


def test_ema_decay_warms_up_as_diffusers_ema_model():
    """diffusers' EMAModel.get_decay after its optimization_step += 1, for our update index (state.step)."""
    from diffusers.training_utils import EMAModel

    from koala_jax.train.step import ema_decay_at

    reference = EMAModel(torch.nn.Linear(1, 1).parameters(), decay=0.999)
    for step in (0, 1, 2, 50, 1000, 20000):
        want = reference.get_decay(step + 1)
        got = float(ema_decay_at(0.999, jnp.asarray(step)))
        assert abs(got - want) < 1e-6, (step, got, want)
