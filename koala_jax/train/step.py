"""One distillation step: noise the latents, run the frozen teacher and the student, take the KOALA
loss (or, with `StepConfig.progressive`, regress the two-step teacher: koala_jax/train/progressive.py), and
update the student (gradient accumulation over micro-batches, AdamW, EMA). Non-finite losses or gradients
leave the state unchanged and are reported in the metrics."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from koala_jax.models import UNet2DConditionModel
from koala_jax.pipelines.euler import Conditioning
from koala_jax.train.losses import LossWeights, kd_losses
from koala_jax.train.noise import NoiseSchedule
from koala_jax.train.progressive import ProgressiveDistillation, guided_teacher
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
    progressive: ProgressiveDistillation | None = None  # None: KOALA's objective

    @property
    def uses_teacher(self) -> bool:
        """Whether the step runs the teacher (plain diffusion training does not: it then takes no memory)."""
        return self.progressive is not None or self.weights.uses_teacher


def _conditioning(batch: Batch, null: Batch, p_drop: float, rng: jax.Array) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Text conditioning with classifier-free-guidance dropout: a dropped sample gets the empty
    caption's embeddings (as SDXL training does), not zeros."""
    drop = jax.random.uniform(rng, (batch["prompt_embeds"].shape[0],)) < p_drop
    ehs = jnp.where(drop[:, None, None], null["prompt_embeds"][None], batch["prompt_embeds"])
    pooled = jnp.where(drop[:, None], null["pooled_prompt_embeds"][None], batch["pooled_prompt_embeds"])
    return ehs, pooled


def progressive_inputs(
    cfg: StepConfig, teacher_params, x0: jnp.ndarray, noise: jnp.ndarray, cond: Conditioning, null: Batch, rng
) -> tuple[tuple, jnp.ndarray]:
    """(student inputs, epsilon target) of progressive distillation: x0 noised at one of the student's
    steps per sample, and the guided teacher's two Euler steps from there folded into one step's epsilon."""
    p = cfg.progressive
    index = jax.random.randint(rng, (x0.shape[0],), 0, p.steps)
    x, t, scaled = p.noised(x0, noise, index)
    uncond = Conditioning(
        jnp.broadcast_to(null["prompt_embeds"], cond.prompt_embeds.shape),
        jnp.broadcast_to(null["pooled_prompt_embeds"], cond.pooled.shape),
        cond.time_ids,
    )
    target = p.target(guided_teacher(cfg.teacher, teacher_params, cond, uncond, p.guidance), x, index)
    return (scaled, t, *cond), target


def micro_step_grads(cfg: StepConfig, params, teacher_params, batch: Batch, null: Batch, rng: jax.Array):
    """Loss terms and student gradients for one micro-batch."""
    k_drop, k_t, k_noise = jax.random.split(rng, 3)
    x0 = batch["latents"]
    cond = Conditioning(*_conditioning(batch, null, cfg.caption_dropout, k_drop), batch["time_ids"])
    noise = jax.random.normal(k_noise, x0.shape, x0.dtype)
    teacher_out, teacher_feats = None, {}
    if cfg.progressive is not None:
        inputs, target = progressive_inputs(cfg, teacher_params, x0, noise, cond, null, k_t)
    else:
        t = cfg.schedule.sample_timesteps(k_t, x0.shape[0])
        inputs, target = (cfg.schedule.add_noise(x0, noise, t), t, *cond), cfg.schedule.target(x0, noise, t)
        if cfg.weights.uses_teacher:
            teacher_out, teacher_feats = cfg.teacher.apply_with_features({"params": teacher_params}, *inputs)

    def loss_fn(p):
        out, feats = cfg.student.apply_with_features({"params": p}, *inputs)
        terms = kd_losses(out, teacher_out, target, feats, teacher_feats, cfg.pairs, cfg.weights)
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


def ema_decay_at(decay: float, step: jnp.ndarray) -> jnp.ndarray:
    """The EMA decay of update `step` (0 first) as diffusers' EMAModel: 0 on the first update (the EMA starts at
    the first trained params), then min(decay, (1 + step) / (10 + step)). Without this warmup the EMA of a run from
    random weights keeps decay**step of them (0.999: 37% after 1,000 steps, 2% after 4,000), and those draw noise."""
    step = step.astype(jnp.float32)
    return jnp.where(step > 0, jnp.minimum(decay, (1.0 + step) / (10.0 + step)), 0.0)


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
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = cfg.optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state.ema_params
    if ema is not None:
        decay = ema_decay_at(cfg.ema_decay, state.step)
        ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)
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
