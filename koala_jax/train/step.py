"""One distillation step: noise the latents, run the frozen teacher and the student, take the KOALA
loss, and update the student (gradient accumulation over micro-batches, AdamW, EMA). Non-finite
losses or gradients leave the state unchanged and are reported in the metrics."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from koala_jax.models import UNet2DConditionModel
from koala_jax.train.losses import LossWeights, kd_losses
from koala_jax.train.noise import NoiseSchedule
from koala_jax.train.state import TrainState

Batch = dict[str, jnp.ndarray]


@dataclasses.dataclass(frozen=True)
class StepConfig:
    student: UNet2DConditionModel
    teacher: UNet2DConditionModel
    schedule: NoiseSchedule
    weights: LossWeights
    pairs: dict[str, str]  # student feature path -> teacher feature path
    optimizer: optax.GradientTransformation
    ema_decay: float | None
    caption_dropout: float
    grad_accum: int = 1


def _conditioning(batch: Batch, null: Batch, p_drop: float, rng: jax.Array) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Text conditioning with classifier-free-guidance dropout: a dropped sample gets the empty
    caption's embeddings (as SDXL training does), not zeros."""
    drop = jax.random.uniform(rng, (batch["prompt_embeds"].shape[0],)) < p_drop
    ehs = jnp.where(drop[:, None, None], null["prompt_embeds"][None], batch["prompt_embeds"])
    pooled = jnp.where(drop[:, None], null["pooled_prompt_embeds"][None], batch["pooled_prompt_embeds"])
    return ehs, pooled


def micro_step_grads(cfg: StepConfig, params, teacher_params, batch: Batch, null: Batch, rng: jax.Array):
    """Loss terms and student gradients for one micro-batch."""
    k_drop, k_t, k_noise = jax.random.split(rng, 3)
    x0 = batch["latents"]
    ehs, pooled = _conditioning(batch, null, cfg.caption_dropout, k_drop)
    t = cfg.schedule.sample_timesteps(k_t, x0.shape[0])
    noise = jax.random.normal(k_noise, x0.shape, x0.dtype)
    x_t = cfg.schedule.add_noise(x0, noise, t)
    inputs = (x_t, t, ehs, pooled, batch["time_ids"])
    teacher_out, teacher_feats = None, {}
    if cfg.weights.uses_teacher:
        teacher_out, teacher_feats = cfg.teacher.apply_with_features({"params": teacher_params}, *inputs)

    def loss_fn(p):
        out, feats = cfg.student.apply_with_features({"params": p}, *inputs)
        terms = kd_losses(
            out, teacher_out, cfg.schedule.target(x0, noise, t), feats, teacher_feats, cfg.pairs, cfg.weights
        )
        return terms["total"], terms

    (_, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return terms, grads


def accumulate_grads(cfg: StepConfig, params, teacher_params, batch: Batch, null: Batch, keys: jax.Array):
    """Mean loss terms and gradients over `cfg.grad_accum` micro-batches of `batch` (a `lax.scan`: one
    micro-batch's activations in memory at a time)."""
    micro = jax.tree.map(lambda x: x.reshape(cfg.grad_accum, x.shape[0] // cfg.grad_accum, *x.shape[1:]), batch)

    def accumulate(carry, xs):
        mb, key = xs
        terms, grads = micro_step_grads(cfg, params, teacher_params, mb, null, key)
        return jax.tree.map(jnp.add, carry, (terms, grads)), None

    zeros = jax.eval_shape(
        lambda: micro_step_grads(cfg, params, teacher_params, jax.tree.map(lambda x: x[0], micro), null, keys[0])
    )
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zeros)
    (terms, grads), _ = jax.lax.scan(accumulate, zeros, (micro, keys))
    return jax.tree.map(lambda x: x / cfg.grad_accum, (terms, grads))


def train_step(
    cfg: StepConfig, state: TrainState, teacher_params, batch: Batch, null: Batch
) -> tuple[TrainState, dict[str, jnp.ndarray]]:
    """One optimizer update on `batch` (split into cfg.grad_accum micro-batches)."""
    rng, step_rng = jax.random.split(jax.random.wrap_key_data(state.rng))
    keys = jax.random.split(step_rng, cfg.grad_accum)
    if cfg.grad_accum == 1:  # No loop: a scan of one step still costs a while loop that blocks fusion (CPU: ~2x).
        terms, grads = micro_step_grads(cfg, state.params, teacher_params, batch, null, keys[0])
    else:
        terms, grads = accumulate_grads(cfg, state.params, teacher_params, batch, null, keys)
    grad_norm = optax.global_norm(grads)
    updates, opt_state = cfg.optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state.ema_params
    if ema is not None:
        ema = jax.tree.map(lambda e, p: cfg.ema_decay * e + (1.0 - cfg.ema_decay) * p, ema, params)
    finite = jnp.isfinite(terms["total"]) & jnp.isfinite(grad_norm)
    new = TrainState(
        step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state, rng=jax.random.key_data(rng)
    )
    new = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, state)  # a bad step changes nothing
    return new, {**terms, "grad_norm": grad_norm, "finite": finite}


def jit_train_step(cfg: StepConfig, state_shardings, teacher_shardings, batch_sharding, replicated) -> Callable:
    """train_step compiled with explicit input/output shardings (state donated)."""
    return jax.jit(
        lambda s, tp, b, n: train_step(cfg, s, tp, b, n),
        in_shardings=(state_shardings, teacher_shardings, batch_sharding, replicated),
        out_shardings=(state_shardings, replicated),
        donate_argnums=(0,),
    )
