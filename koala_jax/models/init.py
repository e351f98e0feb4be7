"""Parameters without weights files: dummy inputs, abstract (shape-only) params, random params, counts.

`abstract_params` is how every loader, exporter and trainer learns the expected tree (jax.eval_shape,
no memory); `random_params` is the one host-side random initialiser (random teachers, fresh student
blocks), in numpy because compiling the model's `init` costs far more on CPU than the init itself.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict

from koala_jax.models.common import ForwardOptions
from koala_jax.models.config import UNetConfig
from koala_jax.models.naming import flax_path_to_torch_module
from koala_jax.models.unet import UNet2DConditionModel


def dummy_inputs(config: UNetConfig, batch: int = 1, size: int = 8, seq_len: int = 1) -> tuple[jnp.ndarray, ...]:
    """Zero inputs of the right shapes (sample, timesteps, encoder_hidden_states, text_embeds, time_ids)."""
    sample = jnp.zeros((batch, config.in_channels, size, size), jnp.float32)
    context = jnp.zeros((batch, seq_len, config.cross_attention_dim[0]), jnp.float32)
    if config.addition_embed_type != "text_time":
        return sample, jnp.zeros((batch,)), context, None, None
    return sample, jnp.zeros((batch,)), context, jnp.zeros((batch, config.pooled_text_dim)), jnp.zeros((batch, 6))


def init_params(config: UNetConfig, rng: jax.Array, opts: ForwardOptions = ForwardOptions()) -> dict:
    """Randomly initialised params (Flax default initialisers), computed by the model's `init`."""
    return UNet2DConditionModel(config, opts).init(rng, *dummy_inputs(config))["params"]


@functools.lru_cache(maxsize=16)
def abstract_params(config: UNetConfig, opts: ForwardOptions = ForwardOptions()) -> dict:
    """The params tree as ShapeDtypeStructs, computed with jax.eval_shape (no memory). Cached: tracing
    takes seconds and every loader, exporter and train run asks for it (treat the result as read-only)."""
    return jax.eval_shape(lambda: init_params(config, jax.random.key(0), opts))


def param_count(config: UNetConfig) -> int:
    """Exact number of parameters, without allocating any."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_params(config)))


def random_leaf(name: str, shape: tuple[int, ...], dtype: np.dtype, rng: np.random.Generator) -> np.ndarray:
    """One parameter initialised like Flax's defaults: kernels ~ N(0, 1/fan_in) (LeCun normal, Dense
    and Conv alike), norm scales 1, biases 0. `name` is the leaf name ('kernel', 'scale', 'bias')."""
    if name == "kernel":
        return (rng.standard_normal(shape, np.float32) / np.sqrt(math.prod(shape[:-1]))).astype(dtype)
    return (np.ones if name == "scale" else np.zeros)(shape, dtype)


def random_params(config: UNetConfig, seed: int = 0) -> dict:
    """Host (numpy) params of `config`, every leaf from `random_leaf`, reproducible from `seed`."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda p, x: random_leaf(p[-1].key, x.shape, x.dtype, rng), abstract_params(config)
    )


def describe(config: UNetConfig) -> list[str]:
    """Architecture per stage and exact parameter counts, as printed by `convert_weights.py info`.
    Transformer depths are one number when every resnet/attention pair of a stage has the same, else one
    per pair ('4,4,10')."""
    counts: dict[str, int] = {}
    for path, leaf in flatten_dict(abstract_params(config)).items():
        group = flax_path_to_torch_module(path[:1])
        counts[group] = counts.get(group, 0) + int(np.prod(leaf.shape))
    n = len(config.block_out_channels)
    rows = [("stage", "block type", "channels", "resnets", "transformer depth", "heads", "parameters")]
    for i in range(n):
        rows.append(
            _stage_row(
                config,
                f"down_blocks.{i}",
                config.down_block_types[i],
                i,
                config.layers_per_block[i],
                config.down_depths(i),
                counts,
            )
        )
    if config.mid_block_type:
        depths = config.mid_depths()
        rows.append(_stage_row(config, "mid_block", config.mid_block_type, n - 1, len(depths) + 1, depths, counts))
    else:
        rows.append(("mid_block", "(none)", "-", "-", "-", "-", "0"))
    for i in range(n):
        rows.append(
            _stage_row(
                config,
                f"up_blocks.{i}",
                config.up_block_types[i],
                n - 1 - i,
                config.up_layers_per_block[i],
                config.up_depths(i),
                counts,
            )
        )
    blocks = sum(v for k, v in counts.items() if k.startswith(("down_blocks", "up_blocks", "mid_block")))
    rows.append(("other", "embeddings, conv_in/out", "-", "-", "-", "-", f"{sum(counts.values()) - blocks:,}"))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    conditioning = (
        f"cross_attention_dim {config.cross_attention_dim[0]}, pooled text {config.pooled_text_dim}, "
        f"time ids 6 x {config.addition_time_embed_dim}, in/out channels {config.in_channels}/"
        f"{config.out_channels}, linear projections {config.use_linear_projection}"
    )
    lines += [conditioning, f"parameters: {sum(counts.values()):,}"]
    return lines


def _stage_row(
    config: UNetConfig,
    name: str,
    kind: str,
    level: int,
    resnets: int,
    depths: tuple[int, ...],
    counts: Mapping[str, int],
) -> tuple[str, ...]:
    """One row of `describe`; `depths` is () for a stage without attention."""
    depth = (str(depths[0]) if len(set(depths)) == 1 else ",".join(map(str, depths))) if depths else "-"
    return (
        name,
        kind,
        str(config.block_out_channels[level]),
        str(resnets),
        depth,
        str(config.num_attention_heads[level]) if depths else "-",
        f"{counts[name]:,}",
    )
