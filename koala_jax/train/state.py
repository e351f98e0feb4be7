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


def learning_rate_schedule(optim: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warm-up to optim.lr, then constant or cosine decay to 0 at `total_steps`."""
    warmup = optax.linear_schedule(0.0, optim.lr, max(optim.warmup_steps, 1))
    if optim.schedule == "constant":
        rest = optax.constant_schedule(optim.lr)
    elif optim.schedule == "cosine":
        rest = optax.cosine_decay_schedule(optim.lr, max(total_steps - optim.warmup_steps, 1))
    else:
        raise ValueError(f"optim.schedule {optim.schedule!r}: choose 'constant' or 'cosine'")
    return optax.join_schedules([warmup, rest], [optim.warmup_steps])


def make_optimizer(optim: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
    """Global-norm clipping then AdamW (decoupled weight decay), as BK-SDM/KOALA train with AdamW; `optim.*` and
    the run's length (which a cosine schedule needs)."""
    schedule = learning_rate_schedule(optim, total_steps)
    return optax.chain(
        optax.clip_by_global_norm(optim.grad_clip) if optim.grad_clip else optax.identity(),
        optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay),
    )


def init_state(params: Any, optimizer: optax.GradientTransformation, seed: int, use_ema: bool) -> TrainState:
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ema_params=jax.tree.map(jnp.copy, params) if use_ema else None,
        opt_state=optimizer.init(params),
        rng=jax.random.key_data(jax.random.key(seed)),
    )
