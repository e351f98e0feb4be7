"""Writing params out: diffusers U-Net folders, complete SDXL pipeline folders, JAX params dirs, and single
original-format files (U-Net alone or the whole pipeline).

Writers consume the params tree one tensor at a time (`drain`), so an export holds about one copy of
the weights even when the source is a memory-mapped teacher. Every tensor is checked as it is cast
(`weights.checks.ValueChecker`: NaN/Inf values, or a down-cast that overflows) and the problems are
raised as one error before anything is written. Callers write into a temporary folder
(`weights.atomic.atomic_output_dir`) that is renamed when complete.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from koala_jax.errors import ConvertError, MissingPathError
from koala_jax.files import write_json
from koala_jax.models import UNetConfig, param_count
from koala_jax.weights.checks import ValueChecker
from koala_jax.weights.diffusers_dir import CONFIG_NAME, WEIGHTS_NAME
from koala_jax.weights.params_dir import write_params
from koala_jax.weights.progress import Progress
from koala_jax.weights.safetensors import load_file, read_header, save_file
from koala_jax.weights.single_file import component_to_original, unet_to_original
from koala_jax.weights.state_dict import flax_path_to_torch_key, flax_to_torch

MODEL_INDEX = "model_index.json"
# The parts of an SDXL pipeline that a single file holds besides the U-Net, and their weights files.
SINGLE_FILE_COMPONENTS = {
    "vae": WEIGHTS_NAME,
    "text_encoder": "model.safetensors",
    "text_encoder_2": "model.safetensors",
}


def _nbytes(leaf: Any) -> int:
    return math.prod(np.shape(leaf)) * np.dtype(leaf.dtype).itemsize


def drain(params: dict, label: str = "converting") -> Iterator[tuple[tuple[str, ...], Any]]:
    """Yield every (path, leaf) of `params` and forget it: `params` is emptied first, so each leaf (or its
    memory map) is released as soon as the caller drops it. This is what keeps conversions at one copy.
    Long conversions show their progress on stderr (`weights.progress`)."""
    flat = flatten_dict(params)
    params.clear()
    progress = Progress(label, sum(_nbytes(leaf) for leaf in flat.values()), len(flat))
    try:
        while flat:
            path, leaf = flat.popitem()
            size = _nbytes(leaf)
            yield path, leaf
            progress.update(size)
    finally:
        progress.close()


def materialize(params: dict, dtype: np.dtype, where: object = "weights") -> dict:
    """Contiguous numpy params in `dtype`, built one tensor at a time from (possibly lazy) `params`,
    which is consumed (see `drain`); bad values raise one BadValuesError naming the tensors and `where`."""
    checker = ValueChecker(where)
    out = {path: checker.cast(flax_path_to_torch_key(path), leaf, dtype) for path, leaf in drain(params)}
    checker.done()
    return unflatten_dict(out)


def to_state_dict(params: dict, dtype: np.dtype, where: object = "weights") -> dict[str, np.ndarray]:
    """diffusers state dict in `dtype`, converted and checked one tensor at a time; `params` is consumed."""
    checker = ValueChecker(where)
    out = {}
    for path, leaf in drain(params):
        cast = checker.cast(flax_path_to_torch_key(path), leaf, dtype)
        out.update(flax_to_torch(unflatten_dict({path: cast})))
    checker.done()
    return out


def write_unet_folder(
    folder: Path, config: UNetConfig, params: dict, dtype: np.dtype, where: object = "weights"
) -> None:
    """config.json and diffusion_pytorch_model.safetensors in the existing `folder`; `params` is consumed."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file(to_state_dict(params, dtype, where), folder / WEIGHTS_NAME, metadata={"format": "pt"})
    write_json(folder / CONFIG_NAME, config.to_diffusers())


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


def write_pipeline(
    folder: Path, pipeline: Path, config: UNetConfig, params: dict, dtype: np.dtype, where: object = "weights"
) -> None:
    """A complete SDXL pipeline in the existing `folder`: the teacher pipeline's components (VAE, text
    encoders, tokenizers, scheduler) copied, plus our U-Net in unet/. `params` is consumed."""
    index = check_pipeline(pipeline, config)
    for name in _components(index):
        shutil.copytree(pipeline / name, folder / name)
    index["unet"] = ["diffusers", "UNet2DConditionModel"]
    write_json(folder / MODEL_INDEX, index)
    write_unet_folder(folder / "unet", config, params, dtype, where)


def export_bytes(config: UNetConfig, dtype: np.dtype, pipeline: Path | None = None, single_file: bool = False) -> int:
    """The bytes an export of `config` in `dtype` writes, to the precision a free-space check needs (headers and
    configs aside): the U-Net's tensors, plus with a teacher `pipeline` the components a folder export copies or
    a single file holds cast to `dtype`."""
    itemsize = np.dtype(dtype).itemsize
    total = param_count(config) * itemsize
    if pipeline is None:
        return total
    if single_file:
        headers = (read_header(pipeline / name / weights)[0] for name, weights in SINGLE_FILE_COMPONENTS.items())
        return total + sum(math.prod(v["shape"]) * itemsize for header in headers for v in header.values())
    copied = (pipeline / name for name in _components(check_pipeline(pipeline, config)))
    return total + sum(f.stat().st_size for folder in copied for f in folder.rglob("*") if f.is_file())


def write_jax(folder: Path, config: UNetConfig, params: dict, dtype: np.dtype, where: object = "weights") -> None:
    """A JAX params dir in the existing `folder`; `params` is consumed."""
    write_params(folder, materialize(params, dtype, where), config)


def check_single_file_pipeline(pipeline: Path, config: UNetConfig) -> None:
    """A teacher pipeline whose VAE and text encoders can go into a single file with our U-Net."""
    check_pipeline(pipeline, config)
    for name, weights in SINGLE_FILE_COMPONENTS.items():
        if not (pipeline / name / weights).is_file():
            raise MissingPathError(f"{pipeline / name}: no {weights} (a single file needs the {name} weights)")


def write_single_file(
    path: Path,
    config: UNetConfig,
    params: dict,
    dtype: np.dtype,
    pipeline: Path | None = None,
    where: object = "weights",
) -> None:
    """One original-format (SGM) .safetensors file, what ComfyUI loads (A1111 / Forge: not checked): the U-Net under
    `model.diffusion_model.*` and, from a teacher `pipeline` folder, the VAE and both text encoders.
    `params` is consumed; every tensor is cast to `dtype` and checked before the file is written."""
    tensors = unet_to_original(to_state_dict(params, dtype, where), config)
    if pipeline is not None:
        check_single_file_pipeline(pipeline, config)
        for name, weights in SINGLE_FILE_COMPONENTS.items():
            source = pipeline / name / weights
            checker = ValueChecker(source)
            state = {key: checker.cast(key, value, dtype) for key, value in load_file(source).items()}
            checker.done()
            tensors.update(component_to_original(name, state))
    save_file(tensors, path, metadata={"format": "pt"})
