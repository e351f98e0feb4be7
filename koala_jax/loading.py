"""Building U-Nets and reading diffusers U-Net folders into Flax params.

`load_unet` reads a diffusers model folder (the U-Net folder itself, or a pipeline folder with a
`unet/` subfolder; single or sharded safetensors) and validates every key and shape against the
architecture its config.json describes before returning params.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from koala_jax.models import ForwardOptions, UNet2DConditionModel, UNetConfig
from koala_jax.safetensors_io import load_file
from koala_jax.state_dict import torch_to_flax

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
CONFIG_NAME = "config.json"


def dummy_inputs(config: UNetConfig, batch: int = 1, size: int = 8, seq_len: int = 1) -> tuple[jnp.ndarray, ...]:
    """Zero inputs of the right shapes (sample, timesteps, encoder_hidden_states, text_embeds, time_ids)."""
    sample = jnp.zeros((batch, config.in_channels, size, size), jnp.float32)
    context = jnp.zeros((batch, seq_len, config.cross_attention_dim[0]), jnp.float32)
    if config.addition_embed_type != "text_time":
        return sample, jnp.zeros((batch,)), context, None, None
    # SDXL: 6 micro-conditioning ids, each embedded to addition_time_embed_dim, beside the pooled text.
    pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    return sample, jnp.zeros((batch,)), context, jnp.zeros((batch, pooled)), jnp.zeros((batch, 6))


def init_params(config: UNetConfig, rng: jax.Array, opts: ForwardOptions = ForwardOptions()) -> dict:
    """Randomly initialised params (Flax default initialisers)."""
    return UNet2DConditionModel(config, opts).init(rng, *dummy_inputs(config))["params"]


def random_params(config: UNetConfig, seed: int = 0) -> dict:
    """Host (numpy) params: kernels ~ N(0, 1/fan_in), norm scales 1, biases 0. For random teachers
    and fresh student blocks: no XLA compilation, which on CPU costs far more than the init itself."""
    rng = np.random.default_rng(seed)

    def init(path, leaf):
        name = path[-1].key
        if name == "kernel":
            return (rng.standard_normal(leaf.shape, np.float32) / np.sqrt(math.prod(leaf.shape[:-1]))).astype(leaf.dtype)
        return (np.ones if name == "scale" else np.zeros)(leaf.shape, leaf.dtype)

    return jax.tree_util.tree_map_with_path(init, abstract_params(config))


@functools.lru_cache(maxsize=16)
def abstract_params(config: UNetConfig, opts: ForwardOptions = ForwardOptions()) -> dict:
    """The params tree as ShapeDtypeStructs, computed with jax.eval_shape (no memory). Cached: tracing
    takes seconds and every loader, exporter and train run asks for it (treat the result as read-only)."""
    return jax.eval_shape(lambda: init_params(config, jax.random.key(0), opts))


def param_count(config: UNetConfig) -> int:
    """Exact number of parameters, without allocating any."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_params(config)))


def unet_folder(path: str | Path) -> Path:
    """The folder holding the U-Net's config.json: `path` itself or its `unet/` subfolder."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file or folder: {path}")
    for candidate in (path, path / "unet"):
        if (candidate / CONFIG_NAME).is_file():
            return candidate
    raise FileNotFoundError(f"{path}: no {CONFIG_NAME} here or in {path / 'unet'} (expected a diffusers U-Net "
                            f"or pipeline folder)")


def read_config(folder: str | Path) -> UNetConfig:
    """The UNetConfig of a diffusers U-Net folder (unsupported fields are refused by name)."""
    path = unet_folder(folder) / CONFIG_NAME
    with open(path) as f:
        raw = json.load(f)
    if raw.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
        raise ValueError(f"{path}: _class_name is {raw['_class_name']!r}, expected 'UNet2DConditionModel'")
    return UNetConfig.from_diffusers(raw)


def read_state_dict(folder: str | Path) -> dict[str, np.ndarray]:
    """The U-Net state dict of a diffusers folder (single file or sharded with an index), memory-mapped."""
    folder = unet_folder(folder)
    if (folder / WEIGHTS_NAME).is_file():
        return load_file(folder / WEIGHTS_NAME)
    if (folder / WEIGHTS_INDEX_NAME).is_file():
        with open(folder / WEIGHTS_INDEX_NAME) as f:
            weight_map = json.load(f)["weight_map"]
        state = {}
        for shard in sorted(set(weight_map.values())):
            state.update(load_file(folder / shard))
        return state
    raise FileNotFoundError(f"{folder}: neither {WEIGHTS_NAME} nor {WEIGHTS_INDEX_NAME} (only safetensors "
                            f"weights are read by default)")


def load_unet(path: str | Path, opts: ForwardOptions = ForwardOptions(),
              dtype: jnp.dtype | None = None) -> tuple[UNet2DConditionModel, dict]:
    """(module, params) from a diffusers U-Net or pipeline folder; `dtype` casts the params."""
    config = read_config(path)
    params = torch_to_flax(read_state_dict(path), expected=abstract_params(config, opts))
    params = jax.tree.map(lambda x: jnp.asarray(x, dtype=dtype or x.dtype), params)
    return UNet2DConditionModel(config, opts), params
