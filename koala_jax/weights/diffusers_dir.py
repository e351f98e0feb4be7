"""diffusers U-Net folders: `config.json` beside `diffusion_pytorch_model.safetensors` (or shards with
an index), either the U-Net folder itself or a pipeline folder with a `unet/` subfolder.

Weights are memory-mapped and converted to Flax layout as lazy views; every key and shape is checked
against the architecture config.json describes before anything is read.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from koala_jax.errors import ConvertError, MissingPathError
from koala_jax.models import ForwardOptions, UNet2DConditionModel, UNetConfig, abstract_params
from koala_jax.weights.safetensors import load_file
from koala_jax.weights.state_dict import StateDictError, torch_to_flax

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
PICKLE_WEIGHTS_NAME = "diffusion_pytorch_model.bin"


def unet_folder(path: str | os.PathLike) -> Path:
    """The folder holding the U-Net's config.json: `path` itself or its `unet/` subfolder."""
    path = Path(path)
    if not path.exists():
        raise MissingPathError(f"no such file or folder: {path}")
    for candidate in (path, path / "unet"):
        if (candidate / CONFIG_NAME).is_file():
            return candidate
    raise MissingPathError(
        f"{path}: no {CONFIG_NAME} here or in {path / 'unet'} (expected a diffusers U-Net or pipeline folder)"
    )


def read_config(path: str | os.PathLike) -> UNetConfig:
    """The UNetConfig of a diffusers U-Net/pipeline folder or of a config.json file (unsupported fields
    are refused by name)."""
    path = Path(path)
    file = path if path.is_file() else unet_folder(path) / CONFIG_NAME
    raw = read_json(file)
    if raw.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
        raise ConvertError(f"{file}: _class_name is {raw['_class_name']!r}, expected 'UNet2DConditionModel'")
    try:
        return UNetConfig.from_diffusers(raw)
    except ValueError as e:  # Unsupported fields, inconsistent lengths.
        raise ConvertError(f"{file}: {e}") from e


def read_json(file: Path) -> dict:
    """A JSON object from `file` (a config.json, model_index.json, ...), or an error naming the file."""
    if not file.is_file():
        raise MissingPathError(f"no such file: {file}")
    try:
        raw = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConvertError(f"{file}: not a JSON config ({e})") from e
    if not isinstance(raw, dict):
        raise ConvertError(f"{file}: not a JSON object")
    return raw


def require_sdxl_family(config: UNetConfig, where: object) -> None:
    """Refuse U-Nets without SDXL's micro-conditioning (SD 1.x/2.x), which the SDXL pipeline cannot run."""
    if config.addition_embed_type != "text_time":
        raise ConvertError(
            f"{where}: not an SDXL-family U-Net: addition_embed_type is "
            f"{config.addition_embed_type!r}, SDXL's is 'text_time' "
            f"(SD 1.x/2.x U-Nets are not supported)"
        )


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The U-Net state dict of a diffusers folder (single file or sharded with an index), memory-mapped."""
    return read_safetensors_weights(unet_folder(path), WEIGHTS_NAME)


def read_safetensors_weights(folder: Path, name: str) -> dict[str, np.ndarray]:
    """`folder/name`, or every shard listed in `folder/name.index.json` (how diffusers and transformers both
    shard), memory-mapped."""
    index = folder / f"{name}.index.json"
    if (folder / name).is_file():
        return load_file(folder / name)
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        state = {}
        for shard in sorted(set(weight_map.values())):
            state.update(load_file(folder / shard))
        return state
    raise MissingPathError(f"{folder}: neither {name} nor {index.name} (only safetensors weights are read by default)")


def has_safetensors(path: str | os.PathLike) -> bool:
    folder = unet_folder(path)
    return (folder / WEIGHTS_NAME).is_file() or (folder / WEIGHTS_INDEX_NAME).is_file()


def to_flax(state: Mapping[str, np.ndarray], config: UNetConfig, where: object) -> dict:
    """Flax-layout views of a diffusers state dict, every key and shape checked against `config`."""
    try:
        return torch_to_flax(state, expected=abstract_params(config))
    except StateDictError as e:
        raise ConvertError(f"{where}: {e}") from e


def load_unet(
    path: str | os.PathLike, opts: ForwardOptions = ForwardOptions(), dtype: jnp.dtype | None = None
) -> tuple[UNet2DConditionModel, dict]:
    """(module, params) from a diffusers U-Net or pipeline folder; `dtype` casts the params."""
    config = read_config(path)
    params = to_flax(read_state_dict(path), config, unet_folder(path))
    params = jax.tree.map(lambda x: jnp.asarray(x, dtype=dtype or x.dtype), params)
    return UNet2DConditionModel(config, opts), params
