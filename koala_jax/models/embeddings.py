"""Timestep embeddings, as diffusers' `Timesteps` + `TimestepEmbedding` (embeddings.py)."""

from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp

from koala_jax.models.common import Dtype


def get_timestep_embedding(
    timesteps: jnp.ndarray,
    embedding_dim: int,
    flip_sin_to_cos: bool = False,
    downscale_freq_shift: float = 1.0,
    max_period: int = 10000,
) -> jnp.ndarray:
    """Sinusoidal embedding of a 1-D array of (possibly fractional) timesteps, in float32."""
    half_dim = embedding_dim // 2
    exponent = -math.log(max_period) * jnp.arange(half_dim, dtype=jnp.float32) / (half_dim - downscale_freq_shift)
    emb = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    emb = jnp.concatenate([jnp.sin(emb), jnp.cos(emb)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half_dim:], emb[:, :half_dim]], axis=-1)
    if embedding_dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nn.Module):
    """linear_1 -> SiLU -> linear_2, the MLP that turns a sinusoidal embedding into `temb`."""

    time_embed_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        x = nn.Dense(self.time_embed_dim, dtype=self.dtype, param_dtype=self.param_dtype, name="linear_1")(x)
        x = nn.silu(x)
        return nn.Dense(self.time_embed_dim, dtype=self.dtype, param_dtype=self.param_dtype, name="linear_2")(x)
