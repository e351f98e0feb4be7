"""The train state (student params, EMA, optimizer state, step, RNG) and the optimizer."""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax


@flax.struct.dataclass
class TrainState:
    step: jnp.ndarray
    params: Any
    ema_params: Any  # None when EMA is off
    opt_state: Any
    rng: jax.Array  # raw uint32 key data, so checkpoints store it as a plain array


def learning_rate_schedule(cfg: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warm-up to cfg.lr, then constant or cosine decay to 0 at cfg.total_steps."""
    warmup = optax.linear_schedule(0.0, cfg.lr, max(cfg.warmup_steps, 1))
    if cfg.schedule == "constant":
        rest = optax.constant_schedule(cfg.lr)
    elif cfg.schedule == "cosine":
        rest = optax.cosine_decay_schedule(cfg.lr, max(cfg.total_steps - cfg.warmup_steps, 1))
    else:
        raise ValueError(f"optim.schedule {cfg.schedule!r}: choose 'constant' or 'cosine'")
    return optax.join_schedules([warmup, rest], [cfg.warmup_steps])


def make_optimizer(cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Global-norm clipping then AdamW (decoupled weight decay), as BK-SDM/KOALA train with AdamW."""
    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip else optax.identity(),
        optax.adamw(learning_rate_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay),
    )


def init_state(params: Any, optimizer: optax.GradientTransformation, seed: int, use_ema: bool) -> TrainState:
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ema_params=jax.tree.map(jnp.copy, params) if use_ema else None,
        opt_state=optimizer.init(params),
        rng=jax.random.key_data(jax.random.key(seed)),
    )
