"""The one resolver of U-Net weights sources, used by the converter, the trainer and the exporter.

A source is any of: `random:<preset>` or `random:<config.json>` (random weights: tests, benchmarks, the
random-teacher default), a train.py working directory (its student; `ema`, `step`), a JAX params dir,
a diffusers U-Net or pipeline folder (single or sharded safetensors; a `.bin` only when pickles are
allowed), a single weights file (original or diffusers keys), or a Hugging Face hub id (downloads
only the U-Net's config and safetensors).

Memory: file sources are memory-mapped and converted to Flax layout as lazy views (no data read);
every key and shape is validated before any tensor is materialised (see `weights.export.drain`).
Values: `read_source` streams the weights once and refuses NaN/Inf values by tensor name
(`weights.checks`); the exporters, which cast every tensor anyway, skip that pass and check as they cast.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from flax.traverse_util import flatten_dict

from koala_jax.errors import ConvertError, MissingPathError
from koala_jax.models import UNetConfig, random_params
from koala_jax.students.presets import PRESET_NAMES, preset
from koala_jax.weights.checks import check_finite
from koala_jax.weights.diffusers_dir import (
    CONFIG_NAME,
    PICKLE_WEIGHTS_NAME,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
    has_safetensors,
    read_config,
    read_state_dict,
    require_sdxl_family,
    to_flax,
    unet_folder,
)
from koala_jax.weights.params_dir import is_params_dir, load_params, read_params_config
from koala_jax.weights.single_file import read_single_file, read_weights_file
from koala_jax.weights.state_dict import flax_path_to_torch_key
from koala_jax.weights.training_run import STUDENT_CONFIG, is_training_dir, read_student_config, restore_params

RANDOM_PREFIX = "random:"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # 'org/name'
_HUB_UNET_FILES = (CONFIG_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME, "diffusion_pytorch_model-*-of-*.safetensors")


def is_hub_id(text: str) -> bool:
    """Whether `text` has the form of a Hugging Face hub id ('org/name'); a local path of that form wins."""
    return bool(HUB_ID.match(str(text)))


def source_kind(src: str | os.PathLike) -> str:
    """What kind of weights source `src` is (the one place this is decided): 'random', 'preset' (a name, configs
    only), 'training_run', 'params_dir', 'folder' (diffusers U-Net or pipeline), 'file', 'hub' or 'missing'."""
    text, path = str(src), Path(src)
    if text.startswith(RANDOM_PREFIX):
        return "random"
    if not path.exists():
        return "preset" if text in PRESET_NAMES else "hub" if is_hub_id(text) else "missing"
    if is_training_dir(path):
        return "training_run"
    if is_params_dir(path):
        return "params_dir"
    return "folder" if path.is_dir() else "file"


def read_source(
    src: str | os.PathLike,
    config_path: str | os.PathLike | None = None,
    allow_pickle: bool = False,
    *,
    ema: bool = False,
    step: int | None = None,
    seed: int = 0,
    check_values: bool = True,
) -> tuple[UNetConfig, dict]:
    """(config, params in Flax layout) of any source; params may be lazy memory-mapped views.

    `config_path`: a diffusers config.json (or its folder) for single files (inferred when not given);
    `ema`/`step`: which params of a training run; `seed`: of `random:` sources; `check_values`: stream the
    weights once for NaN/Inf values (off for callers that check while they cast, as the exporters do).
    """
    text, path = str(src), Path(src)
    if (ema or step is not None) and not is_training_dir(path):
        raise ConvertError(
            f"{src}: --ema and --step need a train.py working directory (checkpoints/ and "
            f"{STUDENT_CONFIG}), not a weights folder or file"
        )
    kind = source_kind(src)
    if kind == "random":
        config = random_config(text[len(RANDOM_PREFIX) :])
        params = random_params(config, seed)
    elif kind == "training_run":
        config, params = restore_params(path, ema=ema, step=step)
    elif kind == "params_dir":
        config, params = load_params(path)
    elif kind == "folder":
        config, params = read_diffusers_folder(path, allow_pickle)
    elif kind == "file":
        config, params = read_single_file(path, config_path, allow_pickle)
    elif kind == "hub":
        config, params = read_diffusers_folder(download_unet(text), allow_pickle)
    else:
        raise MissingPathError(
            f"{src}: no such file or folder (nor a Hugging Face hub id such as 'org/name', nor random:<preset>)"
        )
    require_sdxl_family(config, src)
    if check_values and not text.startswith(RANDOM_PREFIX):
        check_finite(((flax_path_to_torch_key(p), v) for p, v in flatten_dict(params).items()), src)
    return config, params


def random_config(name: str) -> UNetConfig:
    """The architecture of `random:<name>`: a preset name or a diffusers config.json."""
    return read_config(name) if name.endswith(".json") else preset(name)


def read_diffusers_folder(path: Path, allow_pickle: bool = False) -> tuple[UNetConfig, dict]:
    """A diffusers U-Net or pipeline folder; safetensors weights, or a single .bin when pickles are allowed."""
    config = read_config(path)
    require_sdxl_family(config, path)  # Before any weight is read.
    folder = unet_folder(path)
    if not has_safetensors(folder) and (folder / PICKLE_WEIGHTS_NAME).is_file():
        return config, to_flax(read_weights_file(folder / PICKLE_WEIGHTS_NAME, allow_pickle), config, folder)
    return config, to_flax(read_state_dict(folder), config, folder)


def download_unet(repo_id: str) -> Path:
    """The U-Net of a hub repo (pipeline or U-Net-only), downloaded (config + safetensors weights only)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    patterns = [prefix + name for prefix in ("", "unet/") for name in _HUB_UNET_FILES]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except (OSError, HFValidationError) as e:  # Offline, unknown repo, gated, network errors.
        raise ConvertError(
            f"{repo_id}: not a local file or folder, and downloading it as a Hugging Face hub id failed: {e}"
        ) from e


def source_config(src: str, config_path: str | None = None, allow_pickle: bool = False) -> tuple[UNetConfig, str]:
    """(config, what it is) of a preset name or any source, reading no weights where the config stands
    alone (presets, random sources, training runs, JAX params dirs); other sources have their keys and
    shapes validated (memory-mapped weights are not read)."""
    kind, path = source_kind(src), Path(src)
    if kind == "preset":
        return preset(src), f"preset {src}"
    if kind == "random":
        return random_config(src[len(RANDOM_PREFIX) :]), f"random weights, {src[len(RANDOM_PREFIX) :]}"
    if kind == "training_run":
        return read_student_config(path), f"training run {path}"
    if kind == "params_dir":
        return read_params_config(path), f"JAX params dir {path}"
    if kind == "missing":
        raise MissingPathError(f"{src}: no such file or folder, and not a preset ({', '.join(PRESET_NAMES)})")
    return read_source(src, config_path, allow_pickle, check_values=False)[0], f"weights {src}"
