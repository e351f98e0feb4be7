"""The rest of a diffusers SDXL pipeline folder, for the JAX side: `vae/` and `text_encoder/`,
`text_encoder_2/` (weights in Flax layout, every key and shape checked against their config.json before
anything is read), the `tokenizer/`, `tokenizer_2/` folders, the scheduler config and model_index.json's
settings. The U-Net is read like any other source (`sources.read_source`).

Weights are memory-mapped and converted as lazy views, as for the U-Net. Checkpoint quirks that diffusers
and transformers fix on load are fixed the same way here: VAE attention keys of old checkpoints
(`query`, `key`, `value`, `proj_attn`), CLIPTextModel keys written by transformers 4 (`text_model.` prefix)
and the `position_ids` buffer that transformers 4 saved.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from koala_jax.errors import ConvertError, MissingPathError
from koala_jax.models.clip import NAMING as CLIP_NAMING
from koala_jax.models.clip import CLIPTextConfig, abstract_text_params
from koala_jax.models.vae import VAEConfig, abstract_vae_params
from koala_jax.weights.checks import check_finite
from koala_jax.weights.diffusers_dir import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    read_config,
    read_json,
    read_safetensors_weights,
)
from koala_jax.weights.state_dict import StateDictError, torch_to_flax

MODEL_INDEX_NAME = "model_index.json"
VAE_FOLDER = "vae"
TEXT_ENCODER_FOLDERS = ("text_encoder", "text_encoder_2")  # CLIPTextModel, CLIPTextModelWithProjection
TOKENIZER_FOLDERS = ("tokenizer", "tokenizer_2")
SCHEDULER_CONFIG = Path("scheduler") / "scheduler_config.json"
TRANSFORMERS_WEIGHTS_NAME = "model.safetensors"
_DEPRECATED_VAE_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_LEGACY_TEXT_PREFIX = "text_model."


@dataclasses.dataclass(frozen=True)
class TextEncoders:
    """Configs of both text encoders and their params, `{"text_encoder": ..., "text_encoder_2": ...}`: the
    tree `models.clip.SDXLTextEncoders` applies."""

    config: CLIPTextConfig
    config_2: CLIPTextConfig
    params: dict


@dataclasses.dataclass(frozen=True)
class SDXLPipelineFolder:
    """Everything but the U-Net of an SDXL pipeline folder, validated."""

    folder: Path
    vae_config: VAEConfig
    vae_params: dict
    text: TextEncoders
    tokenizers: tuple[Path, Path]
    scheduler_config: dict[str, Any]
    # diffusers' StableDiffusionXLPipeline setting (True unless model_index.json says otherwise): classifier-free
    # guidance without a negative prompt uses zero embeddings rather than the encoded empty prompt.
    force_zeros_for_empty_prompt: bool


def _existing_folder(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise MissingPathError(f"no such folder: {path}")
    return path


def _to_flax(state: Mapping[str, np.ndarray], expected: Mapping, where: Path, **kwargs) -> dict:
    """Flax params of a checked state dict: keys and shapes first, then one streaming pass for NaN/Inf values
    (refused by tensor name: a corrupt VAE or text encoder would otherwise encode every record as NaN)."""
    try:
        params = torch_to_flax(state, expected=expected, **kwargs)
    except StateDictError as e:
        raise ConvertError(f"{where}: {e}") from e
    check_finite(state, where)
    return params


def vae_folder(path: str | os.PathLike) -> Path:
    """The VAE's folder: `path` itself when it holds an AutoencoderKL config.json, else its `vae/`."""
    path = _existing_folder(path)
    for candidate in (path, path / VAE_FOLDER):
        if (candidate / CONFIG_NAME).is_file():
            return candidate
    raise MissingPathError(f"{path}: no {CONFIG_NAME} here or in {path / VAE_FOLDER} (expected a diffusers VAE folder)")


def read_vae(path: str | os.PathLike) -> tuple[VAEConfig, dict]:
    """(config, Flax params) of a diffusers VAE folder or of a pipeline folder's `vae/`."""
    folder = vae_folder(path)
    raw = read_json(folder / CONFIG_NAME)
    if raw.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise ConvertError(f"{folder / CONFIG_NAME}: _class_name is {raw['_class_name']!r}, expected 'AutoencoderKL'")
    try:
        config = VAEConfig.from_diffusers(raw)
    except ValueError as e:
        raise ConvertError(f"{folder / CONFIG_NAME}: {e}") from e
    state = {_renamed_vae_key(k): v for k, v in read_safetensors_weights(folder, WEIGHTS_NAME).items()}
    return config, _to_flax(state, abstract_vae_params(config), folder)


def _renamed_vae_key(key: str) -> str:
    """'encoder.mid_block.attentions.0.query.weight' -> '...attentions.0.to_q.weight' (old checkpoints)."""
    head, _, rest = key.partition(".mid_block.attentions.0.")
    name, _, leaf = rest.partition(".")
    return (
        f"{head}.mid_block.attentions.0.{_DEPRECATED_VAE_ATTENTION[name]}.{leaf}"
        if name in _DEPRECATED_VAE_ATTENTION
        else key
    )


def read_text_encoder(path: str | os.PathLike, projection: bool) -> tuple[CLIPTextConfig, dict]:
    """(config, Flax params) of a transformers CLIPTextModel folder (CLIPTextModelWithProjection if
    `projection`)."""
    folder = _existing_folder(path)
    try:
        config = CLIPTextConfig.from_transformers(read_json(folder / CONFIG_NAME))
    except ValueError as e:
        raise ConvertError(f"{folder / CONFIG_NAME}: {e}") from e
    state = {}
    for key, value in read_safetensors_weights(folder, TRANSFORMERS_WEIGHTS_NAME).items():
        if key.endswith("position_ids"):  # A buffer (arange) transformers 4 saved; not a parameter.
            continue
        if not projection and key.startswith(_LEGACY_TEXT_PREFIX):
            key = key[len(_LEGACY_TEXT_PREFIX) :]
        state[key] = value
    return config, _to_flax(state, abstract_text_params(config, projection), folder, naming=CLIP_NAMING)


def read_text_encoders(path: str | os.PathLike) -> TextEncoders:
    """Both text encoders of an SDXL pipeline folder."""
    folder = _existing_folder(path)
    (config, params), (config_2, params_2) = (
        read_text_encoder(folder / name, projection=i == 1) for i, name in enumerate(TEXT_ENCODER_FOLDERS)
    )
    return TextEncoders(config, config_2, {TEXT_ENCODER_FOLDERS[0]: params, TEXT_ENCODER_FOLDERS[1]: params_2})


def tokenizer_folders(path: str | os.PathLike) -> tuple[Path, Path]:
    """The folders of both CLIP tokenizers (read by transformers' CLIPTokenizer on the pipelines' side)."""
    folder = _existing_folder(path)
    found = tuple(folder / name for name in TOKENIZER_FOLDERS)
    for tokenizer in found:
        if not tokenizer.is_dir():
            raise MissingPathError(f"{folder}: no {tokenizer.name}/ folder (expected a diffusers SDXL pipeline folder)")
    return found


def read_pipeline(path: str | os.PathLike) -> SDXLPipelineFolder:
    """An SDXL pipeline folder (model_index.json, vae/, text_encoder(_2)/, tokenizer(_2)/, scheduler/),
    every component checked before it is returned."""
    folder = _existing_folder(path)
    index = read_json(folder / MODEL_INDEX_NAME)
    missing = [name for name in (VAE_FOLDER, *TEXT_ENCODER_FOLDERS) if not (folder / name).is_dir()]
    if missing:
        raise MissingPathError(
            f"{folder}: no {', '.join(m + '/' for m in missing)} (an SDXL pipeline folder has both text encoders)"
        )
    vae_config, vae_params = read_vae(folder / VAE_FOLDER)
    return SDXLPipelineFolder(
        folder=folder,
        vae_config=vae_config,
        vae_params=vae_params,
        text=read_text_encoders(folder),
        tokenizers=tokenizer_folders(folder),
        scheduler_config=read_json(folder / SCHEDULER_CONFIG),
        force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", True)),
    )


def is_pipeline_dir(path: str | os.PathLike) -> bool:
    """A diffusers pipeline folder (model_index.json), as opposed to a U-Net or params folder."""
    return (Path(path) / MODEL_INDEX_NAME).is_file()


def default_image_size(path: str | os.PathLike) -> int:
    """The image side diffusers' pipelines default to: the U-Net's `sample_size` times the VAE's downscale
    factor, from the configs of pipeline folder `path` (no weights read)."""
    folder = _existing_folder(path)
    sample_size = read_config(folder).sample_size
    if not isinstance(sample_size, int):
        raise ConvertError(f"{folder}: its unet/config.json has no sample_size (got {sample_size!r}); give the size")
    return sample_size * vae_factor(folder)


def vae_factor(path: str | os.PathLike) -> int:
    """Pixels per latent along each side (diffusers' `vae_scale_factor`: 8 for SDXL, 4 for the tiny world) of the
    VAE of pipeline folder `path`, from its config (the one place this is read)."""
    return VAEConfig.from_diffusers(read_json(vae_folder(_existing_folder(path)) / CONFIG_NAME)).downscale_factor
