"""Writing params out: diffusers U-Net folders, complete SDXL pipeline folders, JAX params dirs.

Writers consume the params tree one tensor at a time (`drain`), so an export holds about one copy of
the weights even when the source is a memory-mapped teacher. Callers write into a temporary folder
(`weights.atomic.atomic_output_dir`) that is renamed when complete.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from koala_jax.errors import ConvertError
from koala_jax.models import UNetConfig
from koala_jax.weights.diffusers_dir import CONFIG_NAME, WEIGHTS_NAME
from koala_jax.weights.params_dir import write_params
from koala_jax.weights.safetensors import save_file
from koala_jax.weights.state_dict import flax_to_torch

MODEL_INDEX = "model_index.json"


def drain(params: dict) -> Iterator[tuple[tuple[str, ...], Any]]:
    """Yield every (path, leaf) of `params` and forget it: `params` is emptied first, so each leaf (or its
    memory map) is released as soon as the caller drops it. This is what keeps conversions at one copy."""
    flat = flatten_dict(params)
    params.clear()
    while flat:
        yield flat.popitem()


def materialize(params: dict, dtype: np.dtype) -> dict:
    """Contiguous numpy params in `dtype`, built one tensor at a time from (possibly lazy) `params`,
    which is consumed (see `drain`)."""
    return unflatten_dict({path: np.ascontiguousarray(leaf, dtype=dtype) for path, leaf in drain(params)})


def to_state_dict(params: dict, dtype: np.dtype) -> dict[str, np.ndarray]:
    """diffusers state dict in `dtype`, converted one tensor at a time; `params` is consumed."""
    out = {}
    for path, leaf in drain(params):
        out.update(flax_to_torch(unflatten_dict({path: np.asarray(leaf).astype(dtype, copy=False)})))
    return out


def write_unet_folder(folder: Path, config: UNetConfig, params: dict, dtype: np.dtype) -> None:
    """config.json and diffusion_pytorch_model.safetensors in the existing `folder`; `params` is consumed."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file(to_state_dict(params, dtype), folder / WEIGHTS_NAME, metadata={"format": "pt"})
    (folder / CONFIG_NAME).write_text(json.dumps(config.to_diffusers(), indent=2) + "\n")


def check_pipeline(pipeline: Path, config: UNetConfig) -> dict:
    """The model_index.json of a teacher pipeline folder whose text encoders fit `config` (checked before
    anything is written, so a mismatch fails fast instead of inside StableDiffusionXLPipeline)."""
    if not (pipeline / MODEL_INDEX).is_file():
        raise ConvertError(f"{pipeline}: not a diffusers pipeline folder (no {MODEL_INDEX})")
    index = json.loads((pipeline / MODEL_INDEX).read_text())
    missing = [name for name in _components(index) if not (pipeline / name).is_dir()]
    if missing:
        raise ConvertError(f"{pipeline}: {MODEL_INDEX} lists {missing} but those folders are missing")
    encoders = [
        json.loads((pipeline / name / CONFIG_NAME).read_text())
        for name in ("text_encoder", "text_encoder_2")
        if (pipeline / name / CONFIG_NAME).is_file()
    ]
    if encoders:
        hidden = sum(e["hidden_size"] for e in encoders)
        pooled = encoders[-1].get("projection_dim")
        want = config.pooled_text_dim
        if hidden != config.cross_attention_dim[0] or pooled != want:
            raise ConvertError(
                f"{pipeline}: its text encoders give {hidden}-d token embeddings and {pooled}-d pooled "
                f"ones, the U-Net expects {config.cross_attention_dim[0]} and {want}"
            )
    return index


def _components(index: Mapping[str, Any]) -> list[str]:
    """The sub-models of a model_index.json ('name': [library, class] entries), the U-Net excluded."""
    return [
        k
        for k, v in index.items()
        if not k.startswith("_") and k != "unet" and isinstance(v, list) and v[0] is not None
    ]


def write_pipeline(folder: Path, pipeline: Path, config: UNetConfig, params: dict, dtype: np.dtype) -> None:
    """A complete SDXL pipeline in the existing `folder`: the teacher pipeline's components (VAE, text
    encoders, tokenizers, scheduler) copied, plus our U-Net in unet/. `params` is consumed."""
    index = check_pipeline(pipeline, config)
    for name in _components(index):
        shutil.copytree(pipeline / name, folder / name)
    index["unet"] = ["diffusers", "UNet2DConditionModel"]
    (folder / MODEL_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    write_unet_folder(folder / "unet", config, params, dtype)


def write_jax(folder: Path, config: UNetConfig, params: dict, dtype: np.dtype) -> None:
    """A JAX params dir in the existing `folder`; `params` is consumed."""
    write_params(folder, materialize(params, dtype), config)
