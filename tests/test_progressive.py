"""Progressive distillation: the target against a hand computation and against the pipelines' own Euler sampler,
the timestep table, settings refused before anything loads, and a few training steps that bring the one-step
student closer to the two-step teacher."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from koala_jax.errors import ConfigError
from koala_jax.models import ForwardOptions, UNet2DConditionModel, UNetConfig, random_params
from koala_jax.pipelines.euler import Conditioning, EulerSchedule, euler_sample
from koala_jax.train.config import base_config
from koala_jax.train.losses import LossWeights
from koala_jax.train.noise import NoiseSchedule
from koala_jax.train.preflight import Problems, check_objective, check_settings
from koala_jax.train.preview import euler_schedule
from koala_jax.train.progressive import ProgressiveDistillation, guided_teacher
from koala_jax.train.state import init_state
from koala_jax.train.step import StepConfig, micro_step_grads, train_step

from tests.conftest import MICRO, rel_err

TRAILING = euler_schedule(NoiseSchedule())


def test_timestep_table_nests_the_teachers_steps():
    table = ProgressiveDistillation(TRAILING, 4, 1.0).table()
    np.testing.assert_array_equal(table["t"], [999, 749, 499, 249])
    np.testing.assert_array_equal(table["t_mid"], [874, 624, 374, 124])
    sigmas = TRAILING.sigmas(TRAILING.timesteps(8))
    np.testing.assert_array_equal(table["sigma_mid"], sigmas[1::2])
    np.testing.assert_array_equal(table["sigma_next"], [*sigmas[2:-1:2], 0.0])
    with pytest.raises(ConfigError, match="do not contain the student's"):  # leading spacing does not nest
        ProgressiveDistillation(EulerSchedule(beta_schedule="scaled_linear", timestep_spacing="leading"), 4, 1.0)


def test_target_by_hand():
    """Two guided Euler steps of a linear 'teacher', written out in numpy, against `target`."""
    p = ProgressiveDistillation(TRAILING, 2, 3.0)
    g = np.random.default_rng(0)
    x0, noise = g.standard_normal((2, 1, 2, 2)), g.standard_normal((2, 1, 2, 2))
    index = np.array([0, 1])

    def eps_cond(x_in, t):  # what the conditional and unconditional "U-Nets" predict
        return 0.5 * x_in + 1e-3 * t.reshape(-1, 1, 1, 1)

    def eps_uncond(x_in, t):
        return -0.2 * x_in

    def guided(x_in, t):
        return eps_uncond(x_in, t) + 3.0 * (eps_cond(x_in, t) - eps_uncond(x_in, t))

    table = {k: v.astype(np.float64) for k, v in p.table().items()}
    want = []
    for b, i in enumerate(index):
        s, s_mid, s_next = table["sigma"][i], table["sigma_mid"][i], table["sigma_next"][i]
        x = x0[b : b + 1] + s * noise[b : b + 1]
        x_mid = x + guided(x / np.sqrt(s**2 + 1), table["t"][i : i + 1]) * (s_mid - s)
        x_next = x_mid + guided(x_mid / np.sqrt(s_mid**2 + 1), table["t_mid"][i : i + 1]) * (s_next - s_mid)
        want.append((x_next - x) / (s_next - s))
    x, t, scaled = p.noised(jnp.asarray(x0, jnp.float32), jnp.asarray(noise, jnp.float32), jnp.asarray(index))
    got = p.target(guided, x, jnp.asarray(index))
    print(f"target vs hand: rel err {rel_err(got, np.concatenate(want)):.2e}")
    np.testing.assert_allclose(got, np.concatenate(want), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(t, [999, 499])
    np.testing.assert_allclose(scaled, np.asarray(x) / np.sqrt(table["sigma"][index] ** 2 + 1)[:, None, None, None])


def micro_unet() -> tuple[UNet2DConditionModel, dict]:
    config = UNetConfig.from_diffusers(MICRO)
    unet = UNet2DConditionModel(config, ForwardOptions(dtype=jnp.float32, attention_impl="xla"))
    return unet, jax.tree.map(jnp.asarray, random_params(config, seed=3))


def conditioning(batch: int, seed: int) -> tuple[Conditioning, Conditioning]:
    g = np.random.default_rng(seed)
    time_ids = np.tile(np.asarray([[64, 64, 0, 0, 64, 64]], np.float32), (batch, 1))
    cond = Conditioning(
        g.standard_normal((batch, 4, 16)).astype(np.float32), g.standard_normal((batch, 8)).astype(np.float32), time_ids
    )
    uncond = Conditioning(np.zeros_like(cond.prompt_embeds), np.zeros_like(cond.pooled), time_ids)
    return cond, uncond


def test_one_step_target_is_the_samplers_two_guided_steps():
    """The one-step student's step with the target lands where the pipelines' Euler sampler takes the guided
    teacher in two steps (from pure noise: x0 = 0 at the first step)."""
    unet, params = micro_unet()
    cond, uncond = conditioning(2, seed=1)
    noise = np.random.default_rng(2).standard_normal((2, 4, 8, 8)).astype(np.float32)
    want = euler_sample(unet, params, noise, cond, TRAILING, 2, guidance_scale=4.0, uncond=uncond)
    p = ProgressiveDistillation(TRAILING, 1, 4.0)
    index = jnp.zeros((2,), jnp.int32)
    x, _, _ = p.noised(jnp.zeros_like(noise), noise, index)
    sigma = p.table()["sigma"][0]
    got = x + p.target(guided_teacher(unet, params, cond, uncond, 4.0), x, index) * (0.0 - sigma)
    err = rel_err(got, want)
    print(f"one student step vs two sampler steps: rel err {err:.2e}")
    assert err < 1e-5


def test_progressive_settings_are_checked_before_loading():
    cfg = base_config()
    cfg.objective.kind = "progressive"
    cfg.objective.steps = 3
    cfg.noise.timesteps = (999,)
    cfg.noise.prediction_type = "v_prediction"
    problems = Problems()
    check_settings(cfg, problems)  # the objective's own checks, and its round built as the step builds it
    found = " | ".join(problems.found)
    print(found)
    assert "set kd.out=0 and kd.feat=0" in found and "unset noise.timesteps" in found
    assert "epsilon-prediction" in found and len(problems.found) == 3
    cfg.objective.kind = "distill"
    problems = Problems()
    check_objective(cfg, problems)
    assert problems.found == ["objective 'distill': choose from koala, progressive"]


def test_a_gradient_step_moves_the_one_step_student_toward_the_two_step_teacher():
    """The step's loss is the student's distance to the folded two-step teacher (its target is checked above), and
    its gradient points downhill: a small step along it lowers that loss for the same noise and timesteps, and
    the teacher's params are never updated. (Whole Adam runs on a random micro U-Net are too erratic to assert.)"""
    unet, params = micro_unet()
    cfg = StepConfig(
        student=unet,
        teacher=unet,
        schedule=NoiseSchedule(),
        weights=LossWeights(1.0, 0.0, 0.0),
        pairs={},
        optimizer=optax.sgd(1e-3),
        ema_decay=None,
        caption_dropout=0.0,
        progressive=ProgressiveDistillation(TRAILING, 2, 2.0),
    )
    cond, uncond = conditioning(8, seed=4)
    batch = {
        "latents": np.random.default_rng(5).standard_normal((8, 4, 8, 8)).astype(np.float32),
        "prompt_embeds": cond.prompt_embeds,
        "pooled_prompt_embeds": cond.pooled,
        "time_ids": cond.time_ids,
    }
    null = {"prompt_embeds": uncond.prompt_embeds[0], "pooled_prompt_embeds": uncond.pooled[0]}
    key = jax.random.key(3)
    loss = jax.jit(lambda p: micro_step_grads(cfg, p, params, batch, null, key))
    terms, grads = loss(params)
    norm = optax.tree.norm(grads)
    losses = [float(terms["task"])]
    for size in (1e-3, 1e-2):
        moved = jax.tree.map(lambda p, g, size=size: p - size * g / norm, params, grads)
        losses.append(float(loss(moved)[0]["task"]))
    print(f"progressive loss {losses[0]:.5f}, after steps of 1e-3 / 1e-2 along the gradient: {losses[1:]}")
    assert terms["out_kd"] == 0.0 and terms["feat_kd"] == 0.0 and float(norm) > 0
    assert losses[0] > losses[1] > losses[2]
    state = init_state(params, cfg.optimizer, seed=0, use_ema=False)
    new, metrics = jax.jit(lambda s: train_step(cfg, s, params, batch, null))(state)
    assert bool(metrics["finite"]) and int(new.step) == 1
    assert rel_err(new.params["conv_in"]["kernel"], params["conv_in"]["kernel"]) > 0
