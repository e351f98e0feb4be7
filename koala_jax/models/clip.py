"""SDXL's two text encoders, as transformers' modeling_clip.py: `CLIPTextModel` (CLIP ViT-L/14, quick_gelu)
and `CLIPTextModelWithProjection` (OpenCLIP ViT-bigG/14, gelu, with `text_projection`), and the way
StableDiffusionXLPipeline.encode_prompt combines them.

Parameter paths follow transformers 5's keys (`encoder/layers_3/self_attn/q_proj/kernel`); checkpoints
written by transformers 4 prefix CLIPTextModel's keys with `text_model.`, which the weights reader
strips, as transformers does.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from koala_jax.models.common import ForwardOptions, layer_norm
from koala_jax.models.config import UnsupportedConfigError
from koala_jax.models.naming import Naming

NAMING = Naming(list_names=frozenset({"layers"}), embeddings=frozenset({"token_embedding", "position_embedding"}))
ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}
# Fields of a transformers CLIPTextConfig that change nothing in an inference forward pass: metadata,
# initialisation, training-only dropout, and token ids other than end-of-text.
_IGNORED_FIELDS = frozenset(
    {
        "architectures",
        "model_type",
        "dtype",
        "torch_dtype",
        "transformers_version",
        "initializer_range",
        "initializer_factor",
        "attention_dropout",
        "dropout",
        "bos_token_id",
        "pad_token_id",
    }
)
# The end-of-text id of CLIP checkpoints converted before transformers PR #24773; transformers keeps pooling
# them at the largest token id, which is where CLIP's tokenizer puts end-of-text.
LEGACY_EOS_TOKEN_ID = 2


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """transformers `CLIPTextConfig`; field names and defaults as in its config.json."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407

    def __post_init__(self) -> None:
        if self.hidden_act not in ACTIVATIONS:
            raise UnsupportedConfigError(
                f"config field 'hidden_act' = {self.hidden_act!r} is not supported (only {sorted(ACTIVATIONS)})"
            )
        if self.hidden_size % self.num_attention_heads:
            raise UnsupportedConfigError(
                f"config field 'num_attention_heads': {self.num_attention_heads} does not divide {self.hidden_size}"
            )
        if self.num_hidden_layers < 2:
            raise UnsupportedConfigError(
                "config field 'num_hidden_layers': SDXL reads the penultimate layer, need >= 2"
            )

    @classmethod
    def from_transformers(cls, config: dict[str, Any]) -> CLIPTextConfig:
        """Parse a transformers CLIP text config dict; refuse fields we do not implement, by name."""
        fields = {f.name for f in dataclasses.fields(cls)}
        given = {k: v for k, v in config.items() if not k.startswith("_") and k not in _IGNORED_FIELDS}
        unknown = sorted(given.keys() - fields)
        if unknown:
            raise UnsupportedConfigError(f"unknown config field {unknown[0]!r} = {given[unknown[0]]!r}")
        return cls(**given)


class CLIPTextOutput(NamedTuple):
    """What SDXL reads: the last layer after the final LayerNorm, the penultimate layer's output (transformers'
    hidden_states[-2], SDXL's prompt embedding), the end-of-text token's final state, and its projection
    (CLIPTextModelWithProjection only; None otherwise)."""

    last_hidden_state: jnp.ndarray
    penultimate_hidden_state: jnp.ndarray
    pooler_output: jnp.ndarray
    text_embeds: jnp.ndarray | None = None


class CLIPAttention(nn.Module):
    """Causal multi-head self-attention with biased q/k/v/out projections."""

    heads: int
    opts: ForwardOptions

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        o = self.opts
        dim = x.shape[-1]
        dense = lambda name: nn.Dense(dim, dtype=o.dtype, param_dtype=o.param_dtype, name=name)
        split = lambda t: t.reshape(*t.shape[:-1], self.heads, dim // self.heads)
        q, k, v = (split(dense(name)(x)) for name in ("q_proj", "k_proj", "v_proj"))
        # 77 tokens: the blocked kernels of attention_kernels.py buy nothing, XLA's (or cuDNN's) causal one serves.
        impl = o.attention_impl if o.attention_impl in ("xla", "cudnn") else None
        out = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl)
        return dense("out_proj")(out.reshape(x.shape))


class CLIPMLP(nn.Module):
    """fc1 -> activation -> fc2."""

    config: CLIPTextConfig
    opts: ForwardOptions

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        cfg, o = self.config, self.opts
        x = nn.Dense(cfg.intermediate_size, dtype=o.dtype, param_dtype=o.param_dtype, name="fc1")(x)
        x = ACTIVATIONS[cfg.hidden_act](x)
        return nn.Dense(cfg.hidden_size, dtype=o.dtype, param_dtype=o.param_dtype, name="fc2")(x)


class CLIPEncoderLayer(nn.Module):
    """Pre-norm self-attention and MLP, each with a residual connection."""

    config: CLIPTextConfig
    opts: ForwardOptions

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        cfg, o = self.config, self.opts
        norm = lambda name: layer_norm(o.dtype, o.param_dtype, name, cfg.layer_norm_eps)
        x = x + CLIPAttention(cfg.num_attention_heads, o, name="self_attn")(norm("layer_norm1")(x))
        return x + CLIPMLP(cfg, o, name="mlp")(norm("layer_norm2")(x))


class CLIPEncoder(nn.Module):
    """The stack of `layers`; returns the last and the penultimate layer's outputs."""

    config: CLIPTextConfig
    opts: ForwardOptions

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        penultimate = x
        for i in range(self.config.num_hidden_layers):
            penultimate, x = x, CLIPEncoderLayer(self.config, self.opts, name=f"layers_{i}")(x)
        return x, penultimate


class CLIPTextEmbeddings(nn.Module):
    """Token embedding plus learned absolute position embedding."""

    config: CLIPTextConfig
    opts: ForwardOptions

    @nn.compact
    def __call__(self, input_ids: jnp.ndarray) -> jnp.ndarray:
        cfg, o = self.config, self.opts
        embed = lambda n, name: nn.Embed(n, cfg.hidden_size, dtype=o.dtype, param_dtype=o.param_dtype, name=name)
        positions = jnp.arange(input_ids.shape[-1])
        return embed(cfg.vocab_size, "token_embedding")(input_ids) + embed(
            cfg.max_position_embeddings, "position_embedding"
        )(positions)


def eos_positions(input_ids: jnp.ndarray, eos_token_id: int) -> jnp.ndarray:
    """Where each sequence is pooled, exactly as transformers 5 picks it: the largest token id for legacy
    configs (eos_token_id 2), else the first end-of-text token."""
    if eos_token_id == LEGACY_EOS_TOKEN_ID:
        return jnp.argmax(input_ids, axis=-1)
    return jnp.argmax(input_ids == eos_token_id, axis=-1)


class CLIPTextModel(nn.Module):
    """transformers' CLIPTextModel: embeddings, causal encoder, final LayerNorm, end-of-text pooling."""

    config: CLIPTextConfig
    opts: ForwardOptions = ForwardOptions()

    @nn.compact
    def __call__(self, input_ids: jnp.ndarray) -> CLIPTextOutput:
        """input_ids (B, L) int -> CLIPTextOutput (hidden states (B, L, D), pooled (B, D))."""
        cfg, o = self.config, self.opts
        x = CLIPTextEmbeddings(cfg, o, name="embeddings")(input_ids)
        x, penultimate = CLIPEncoder(cfg, o, name="encoder")(x)
        last = layer_norm(o.dtype, o.param_dtype, "final_layer_norm", cfg.layer_norm_eps)(x)
        pooled = jnp.take_along_axis(last, eos_positions(input_ids, cfg.eos_token_id)[:, None, None], axis=1)[:, 0]
        return CLIPTextOutput(last, penultimate, pooled)


class CLIPTextModelWithProjection(nn.Module):
    """CLIPTextModel under `text_model`, plus `text_projection` (no bias) of the pooled state: text_embeds."""

    config: CLIPTextConfig
    opts: ForwardOptions = ForwardOptions()

    @nn.compact
    def __call__(self, input_ids: jnp.ndarray) -> CLIPTextOutput:
        o = self.opts
        out = CLIPTextModel(self.config, o, name="text_model")(input_ids)
        projection = nn.Dense(
            self.config.projection_dim, use_bias=False, dtype=o.dtype, param_dtype=o.param_dtype, name="text_projection"
        )
        return out._replace(text_embeds=projection(out.pooler_output))


class SDXLTextEncoders(nn.Module):
    """Both encoders as StableDiffusionXLPipeline.encode_prompt uses them (no clip_skip): the penultimate
    hidden states of `text_encoder` and `text_encoder_2` concatenated on features (prompt_embeds, 768 + 1280
    = 2048 wide in SDXL), and the projected pooled state of `text_encoder_2` (pooled_prompt_embeds, 1280)."""

    config: CLIPTextConfig
    config_2: CLIPTextConfig
    opts: ForwardOptions = ForwardOptions()

    @nn.compact
    def __call__(self, input_ids: jnp.ndarray, input_ids_2: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        """Token ids of each encoder's tokenizer, (B, L) each -> (prompt_embeds (B, L, D1 + D2), pooled (B, P))."""
        first = CLIPTextModel(self.config, self.opts, name="text_encoder")(input_ids)
        second = CLIPTextModelWithProjection(self.config_2, self.opts, name="text_encoder_2")(input_ids_2)
        prompt_embeds = jnp.concatenate([first.penultimate_hidden_state, second.penultimate_hidden_state], axis=-1)
        return prompt_embeds, second.text_embeds

    @property
    def text_dim(self) -> int:
        return self.config.hidden_size + self.config_2.hidden_size

    @property
    def pooled_dim(self) -> int:
        return self.config_2.projection_dim


@functools.lru_cache(maxsize=8)
def abstract_text_params(config: CLIPTextConfig, projection: bool) -> dict:
    """One encoder's params tree as ShapeDtypeStructs (jax.eval_shape: no memory); treat as read-only."""
    model = (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)
    ids = jnp.zeros((1, config.max_position_embeddings), jnp.int32)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), ids)["params"])
