"""Attention, FeedForward (GEGLU), BasicTransformerBlock and Transformer2DModel, as in diffusers'
attention_processor.py / attention.py / transformer_2d.py, for the SDXL configuration (layer norms,
no qkv bias, GEGLU feed-forward with 4x inner width, no dropout)."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from koala_jax.models.attention_kernels import dot_product_attention
from koala_jax.models.common import ForwardOptions, group_norm, layer_norm, sow_feature


class Attention(nn.Module):
    """Multi-head attention with `to_q`, `to_k`, `to_v` (no bias) and `to_out.0` (bias).

    Self-attention when `context` is None (diffusers' attn1), cross-attention otherwise (attn2). How
    softmax(q k^T) v is computed is `opts.attention_impl`; the captured feature is the layer's output
    after `to_out`, the same whichever implementation computed it.
    """

    heads: int
    head_dim: int
    opts: ForwardOptions
    capture: bool = False

    @nn.compact
    def __call__(self, x: jnp.ndarray, context: jnp.ndarray | None = None) -> jnp.ndarray:
        o = self.opts
        inner = self.heads * self.head_dim
        context = x if context is None else context
        dense = lambda name, bias: nn.Dense(
            inner if name != "to_out_0" else x.shape[-1],
            use_bias=bias,
            dtype=o.dtype,
            param_dtype=o.param_dtype,
            name=name,
        )
        split = lambda t: t.reshape(*t.shape[:-1], self.heads, self.head_dim)
        q, k, v = (split(dense(n, False)(t)) for n, t in (("to_q", x), ("to_k", context), ("to_v", context)))
        out = dot_product_attention(q, k, v, o.attention_impl, o.attention_block_q, o.attention_block_kv)
        out = dense("to_out_0", True)(out.reshape(*out.shape[:-2], inner))
        if self.capture:
            sow_feature(self, out)
        return out


class GEGLU(nn.Module):
    """proj -> split in (hidden, gate) -> hidden * gelu(gate) (exact erf GELU, as torch's default)."""

    inner_dim: int
    opts: ForwardOptions

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        h = nn.Dense(2 * self.inner_dim, dtype=self.opts.dtype, param_dtype=self.opts.param_dtype, name="proj")(x)
        hidden, gate = jnp.split(h, 2, axis=-1)
        return hidden * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    """`ff.net.0` (GEGLU) -> `ff.net.2` (Linear); net.1 is a dropout with p=0 in diffusers."""

    opts: ForwardOptions
    capture: bool = False

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        dim = x.shape[-1]
        h = GEGLU(4 * dim, self.opts, name="net_0")(x)
        out = nn.Dense(dim, dtype=self.opts.dtype, param_dtype=self.opts.param_dtype, name="net_2")(h)
        if self.capture:
            sow_feature(self, out)
        return out


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention and feed-forward, each with a residual connection."""

    heads: int
    head_dim: int
    opts: ForwardOptions

    @nn.compact
    def __call__(self, x: jnp.ndarray, context: jnp.ndarray) -> jnp.ndarray:
        o = self.opts
        attn = lambda name: Attention(self.heads, self.head_dim, o, capture=name in o.capture, name=name)
        x = attn("attn1")(layer_norm(o.dtype, o.param_dtype, "norm1")(x)) + x
        x = attn("attn2")(layer_norm(o.dtype, o.param_dtype, "norm2")(x), context) + x
        return FeedForward(o, capture="ff" in o.capture, name="ff")(layer_norm(o.dtype, o.param_dtype, "norm3")(x)) + x


class Transformer2DModel(nn.Module):
    """GroupNorm -> proj_in -> `depth` BasicTransformerBlocks over the H*W tokens -> proj_out, plus the
    input as residual. proj_in/proj_out are Linear (use_linear_projection, SDXL) or 1x1 convs."""

    heads: int
    head_dim: int
    depth: int
    groups: int
    use_linear_projection: bool
    opts: ForwardOptions

    @nn.compact
    def __call__(self, x: jnp.ndarray, context: jnp.ndarray) -> jnp.ndarray:
        o = self.opts
        b, h, w, c = x.shape
        inner = self.heads * self.head_dim
        proj = lambda features, name: (
            nn.Dense(features, dtype=o.dtype, param_dtype=o.param_dtype, name=name)
            if self.use_linear_projection
            else nn.Conv(features, (1, 1), dtype=o.dtype, param_dtype=o.param_dtype, name=name)
        )
        hidden = group_norm(self.groups, 1e-6, o.dtype, o.param_dtype, "norm")(x)
        hidden = proj(inner, "proj_in")(hidden).reshape(b, h * w, inner)
        block_cls = o.maybe_remat(BasicTransformerBlock, "transformer_block")
        for i in range(self.depth):
            hidden = block_cls(self.heads, self.head_dim, o, name=f"transformer_blocks_{i}")(hidden, context)
        hidden = proj(c, "proj_out")(hidden.reshape(b, h, w, inner))
        return hidden + x.astype(hidden.dtype)
