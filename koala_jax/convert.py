"""Reading SDXL-family U-Net weights from any source, deriving KOALA students, writing diffusers folders.

Sources: a diffusers U-Net or pipeline folder (single or sharded safetensors), a JAX params dir, a
single-file original checkpoint (`sd_xl_base_1.0.safetensors` style, converted with diffusers' own
`convert_ldm_unet_checkpoint`), a pickle (`.ckpt`/`.bin`, only when explicitly allowed, loaded with
`torch.load(weights_only=True)`), or a Hugging Face hub id (downloads only the U-Net).

Memory: sources are memory-mapped and converted to Flax layout as lazy views (no data read), every
key and shape is validated, and only then is each tensor materialised, one at a time, releasing its
memory map as it goes. Writers consume the params tree the same way, so a conversion holds about one
copy of the weights. torch and diffusers are imported only by the paths that need them.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from koala_jax.loading import (
    CONFIG_NAME,
    abstract_params,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
    read_config,
    read_state_dict,
    unet_folder,
)
from koala_jax.models import UNetConfig
from koala_jax.naming import flax_path_to_torch_module
from koala_jax.params_io import (
    is_params_dir,
    load_params,
    read_params_config,
    write_params,
)
from koala_jax.presets import PARAM_COUNTS, SDXL_BASE, preset
from koala_jax.safetensors_io import load_file, save_file
from koala_jax.state_dict import StateDictError, flax_to_torch, torch_to_flax
from koala_jax.student_init import init_student_from_teacher

DTYPES = {"fp32": np.dtype(np.float32), "fp16": np.dtype(np.float16), "bf16": np.dtype(ml_dtypes.bfloat16)}
PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")
PICKLE_WEIGHTS_NAME = "diffusion_pytorch_model.bin"
LDM_PREFIX = "model.diffusion_model."  # diffusers' LDM_UNET_KEY
MODEL_INDEX = "model_index.json"
TRAIN_CONFIG = "student_config.json"  # written by train.py beside checkpoints/
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HUB_UNET_FILES = (CONFIG_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME, "diffusion_pytorch_model-*-of-*.safetensors")


class ConvertError(ValueError):
    """A source or output that cannot be converted; the message names the file and the problem."""


# ----------------------------------------------------------------------------------------------- reading

def read_source(src: str | os.PathLike, config_path: str | os.PathLike | None = None,
                allow_pickle: bool = False) -> tuple[UNetConfig, dict]:
    """(config, params in Flax layout) of any supported source; params may be lazy memory-mapped views
    (materialise them with `materialize`). `config_path` is a diffusers U-Net config.json or folder
    for single-file checkpoints (inferred from the weights when not given)."""
    path = Path(src)
    if path.is_dir():
        return load_params(path) if is_params_dir(path) else read_diffusers_folder(path, allow_pickle)
    if path.is_file():
        return read_single_file(path, config_path, allow_pickle)
    if _HUB_ID.match(str(src)):
        return read_diffusers_folder(download_unet(str(src)), allow_pickle)
    raise FileNotFoundError(f"{src}: no such file or folder (nor a Hugging Face hub id such as 'org/name')")


def read_folder_config(path: str | os.PathLike) -> UNetConfig:
    """The config of a diffusers U-Net/pipeline folder or of a config.json file, SDXL family only."""
    path = Path(path)
    try:
        config = UNetConfig.from_diffusers(json.loads(path.read_text())) if path.is_file() else read_config(path)
    except ValueError as e:  # Unsupported fields, another model class, or unreadable JSON.
        raise ConvertError(f"{path}: {e}") from None
    require_sdxl_family(config, path)
    return config


def require_sdxl_family(config: UNetConfig, where: object) -> None:
    """Refuse U-Nets without SDXL's micro-conditioning (SD 1.x/2.x), which the SDXL pipeline cannot run."""
    if config.addition_embed_type != "text_time":
        raise ConvertError(f"{where}: not an SDXL-family U-Net: addition_embed_type is "
                           f"{config.addition_embed_type!r}, SDXL's is 'text_time' "
                           f"(SD 1.x/2.x U-Nets are not supported)")


def read_diffusers_folder(path: Path, allow_pickle: bool = False) -> tuple[UNetConfig, dict]:
    """A diffusers U-Net or pipeline folder; safetensors weights, or a single .bin when pickles are allowed."""
    config = read_folder_config(path)
    folder = unet_folder(path)
    has_safetensors = (folder / WEIGHTS_NAME).is_file() or (folder / WEIGHTS_INDEX_NAME).is_file()
    if not has_safetensors and (folder / PICKLE_WEIGHTS_NAME).is_file():
        return config, to_flax(read_weights_file(folder / PICKLE_WEIGHTS_NAME, allow_pickle), config, folder)
    return config, to_flax(read_state_dict(folder), config, folder)


def to_flax(state: Mapping[str, np.ndarray], config: UNetConfig, where: object) -> dict:
    """Flax-layout views of a diffusers state dict, every key and shape checked against `config`."""
    try:
        return torch_to_flax(state, expected=abstract_params(config))
    except (StateDictError, KeyError) as e:  # KeyError: a key that is not a diffusers U-Net name at all.
        raise ConvertError(f"{where}: {e.args[0]}") from None


def read_single_file(path: Path, config_path: str | os.PathLike | None = None,
                     allow_pickle: bool = False) -> tuple[UNetConfig, dict]:
    """A single weights file: original (LDM/SGM) keys or diffusers keys, whole checkpoint or U-Net only."""
    state = read_weights_file(path, allow_pickle)
    given = read_folder_config(config_path) if config_path else None
    if is_original_format(state):
        state = original_to_diffusers(state, given, path)
    config = given or infer_config(state, path)
    return config, to_flax(state, config, path)


def read_weights_file(path: Path, allow_pickle: bool) -> dict[str, np.ndarray]:
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return load_file(path)
    if suffix not in PICKLE_SUFFIXES:
        raise ConvertError(f"{path}: unknown weights format {suffix!r} (expected .safetensors, or "
                           f"{'/'.join(PICKLE_SUFFIXES)} with --allow-pickle)")
    if not allow_pickle:
        raise ConvertError(f"{path}: {suffix} files are Python pickles, which can run code when loaded. Convert "
                           f"it to .safetensors, or pass --allow-pickle to load it with torch.load(weights_only=True)")
    return read_pickle(path)


def read_pickle(path: Path) -> dict[str, np.ndarray]:
    """Tensors of a torch pickle, loaded with weights_only=True (no arbitrary code) and memory-mapped."""
    import torch

    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError) as e:
        raise ConvertError(f"{path}: torch.load(weights_only=True, mmap=True) refused it: {e}") from None
    while isinstance(checkpoint, dict) and "state_dict" in checkpoint:  # As diffusers unwraps .ckpt files.
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict):
        raise ConvertError(f"{path}: holds a {type(checkpoint).__name__}, not a state dict")
    return {k: _torch_to_numpy(v) for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}


def _torch_to_numpy(tensor: Any) -> np.ndarray:
    import torch

    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16; reinterpret the bits (no copy).
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def download_unet(repo_id: str) -> Path:
    """The U-Net of a hub repo (pipeline or U-Net-only), downloaded (config + safetensors weights only)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    patterns = [prefix + name for prefix in ("", "unet/") for name in _HUB_UNET_FILES]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except (OSError, HFValidationError) as e:  # Offline, unknown repo, gated, network errors.
        raise ConvertError(f"{repo_id}: not a local file or folder, and downloading it as a Hugging Face hub "
                           f"id failed: {e}") from None


# ------------------------------------------------------------------------------- original (LDM) checkpoints

def is_original_format(state: Mapping[str, Any]) -> bool:
    """Original Stability keys: a whole checkpoint (`model.diffusion_model.*`) or a U-Net-only file."""
    return any(k.startswith(LDM_PREFIX) for k in state) or "input_blocks.0.0.weight" in state


def original_to_diffusers(state: Mapping[str, np.ndarray], config: UNetConfig | None, where: Path) -> dict:
    """diffusers keys for an original-format U-Net, renamed by diffusers' own converter (values untouched:
    memory maps stay lazy). VAE and text-encoder keys of a whole checkpoint are ignored."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    if not any(k.startswith(LDM_PREFIX) for k in state):
        state = {LDM_PREFIX + k: v for k, v in state.items()}
    unet = {k[len(LDM_PREFIX):]: v for k, v in state.items() if k.startswith(LDM_PREFIX)}
    if config is None:
        layers = _original_layers_per_block(unet, where)
    elif len(set(config.layers_per_block)) == 1:
        layers = config.layers_per_block[0]
    else:
        raise ConvertError(f"{where}: original-format checkpoints have one layers_per_block for every stage; "
                           f"the given config has {list(config.layers_per_block)}")
    text_time = "label_emb.0.0.weight" in unet
    return convert_ldm_unet_checkpoint(dict(state), {"layers_per_block": layers,
                                                     "addition_embed_type": "text_time" if text_time else None})


def _original_layers_per_block(unet: Mapping[str, Any], where: Path) -> int:
    """Residual blocks per stage, from the number of `input_blocks` (conv_in, then per stage
    `layers_per_block` blocks and, except at the last stage, a downsampler)."""
    blocks = _indices(unet, "input_blocks.")
    downsamplers = {k.split(".")[1] for k in unet if re.match(r"input_blocks\.\d+\.0\.op\.", k)}
    stages = len(downsamplers) + 1
    layers, rest = divmod(len(blocks) - 1 - len(downsamplers), stages)
    if not blocks or rest or layers < 1:
        raise ConvertError(f"{where}: cannot infer the U-Net layout from its input_blocks ({len(blocks)} blocks, "
                           f"{len(downsamplers)} downsamplers); pass --config")
    return layers


def _indices(keys: Any, prefix: str) -> list[int]:
    """Sorted distinct integers that directly follow `prefix` in `keys`."""
    found = {int(m.group(1)) for k in keys if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return sorted(found)


def infer_config(state: Mapping[str, Any], where: Path) -> UNetConfig:
    """The architecture of diffusers-keyed U-Net weights, read from their names and shapes.

    What the weights do not determine is taken from SDXL-Base: 32 norm groups, 64 channels per attention
    head, 256-d time-id embeddings, sinusoid settings. Pass --config for a model that differs there.
    """
    if "conv_in.weight" not in state or not _indices(state, "down_blocks."):
        raise ConvertError(f"{where}: no U-Net weights found (expected diffusers keys such as 'conv_in.weight' "
                           f"or original keys such as '{LDM_PREFIX}input_blocks.0.0.weight')")
    shape = {k: np.shape(v) for k, v in state.items()}
    stages = _indices(state, "down_blocks.")
    channels = [shape[f"down_blocks.{i}.resnets.0.conv1.weight"][0] for i in stages]
    head_channels = 64  # SDXL's (diffusers' SDXL config: attention_head_dim [5, 10, 20] for [320, 640, 1280]).
    for i, ch in zip(stages, channels):
        if _indices(state, f"down_blocks.{i}.attentions.") and ch % head_channels:
            raise ConvertError(f"{where}: stage {i} has {ch} channels, not a multiple of SDXL's {head_channels} "
                               f"channels per head; pass --config with the model's config.json")

    def depth(block: str) -> int:
        return len(_indices(state, f"{block}.attentions.0.transformer_blocks.")) or 1

    proj_in = next((s for k, s in shape.items() if k.endswith(".proj_in.weight")), None)
    to_k = next((s for k, s in shape.items() if k.endswith(".attn2.to_k.weight")),
                (0, SDXL_BASE.cross_attention_dim[0]))
    raw = {
        "in_channels": shape["conv_in.weight"][1],
        "out_channels": shape["conv_out.weight"][0] if "conv_out.weight" in shape else SDXL_BASE.out_channels,
        "block_out_channels": channels,
        "layers_per_block": [len(_indices(state, f"down_blocks.{i}.resnets.")) for i in stages],
        "down_block_types": [_block_type(state, f"down_blocks.{i}", "Down") for i in stages],
        "up_block_types": [_block_type(state, f"up_blocks.{i}", "Up") for i in _indices(state, "up_blocks.")],
        "mid_block_type": "UNetMidBlock2DCrossAttn" if "mid_block.resnets.0.conv1.weight" in state else None,
        "transformer_layers_per_block": [depth(f"down_blocks.{i}") for i in stages],
        "reverse_transformer_layers_per_block": [depth(f"up_blocks.{i}") for i in _indices(state, "up_blocks.")],
        "attention_head_dim": [max(1, ch // head_channels) for ch in channels],
        "cross_attention_dim": to_k[1],
        "use_linear_projection": proj_in is not None and len(proj_in) == 2,
        "norm_num_groups": SDXL_BASE.norm_num_groups,
        "addition_embed_type": "text_time" if "add_embedding.linear_1.weight" in state else None,
        "addition_time_embed_dim": SDXL_BASE.addition_time_embed_dim,
        "projection_class_embeddings_input_dim": shape.get("add_embedding.linear_1.weight", (0, None))[1],
    }
    config = UNetConfig.from_diffusers(raw)
    require_sdxl_family(config, where)
    return config


def _block_type(state: Mapping[str, Any], block: str, kind: str) -> str:
    return f"CrossAttn{kind}Block2D" if _indices(state, f"{block}.attentions.") else f"{kind}Block2D"


# ---------------------------------------------------------------------------------------- training runs

def is_training_dir(path: str | os.PathLike) -> bool:
    """A train.py working directory: checkpoints/ beside student_config.json."""
    path = Path(path)
    return (path / "checkpoints").is_dir() and (path / TRAIN_CONFIG).is_file()


def read_checkpoint(src: str | os.PathLike, ema: bool = False, step: int | None = None,
                    config_path: str | os.PathLike | None = None,
                    allow_pickle: bool = False) -> tuple[UNetConfig, dict]:
    """Params of a training run (`ema` picks the EMA params, `step` a step; default the latest) or of
    any source `read_source` reads."""
    if is_training_dir(src):
        from koala_jax.train.checkpoint import restore_params

        try:
            return restore_params(str(src), ema=ema, step=step)
        except KeyError as e:  # A checkpoint without EMA params, or without the requested step.
            raise ConvertError(f"{src}: {e.args[0]}") from None
    if ema or step is not None:
        raise ConvertError(f"{src}: --ema and --step need a train.py working directory (checkpoints/ and "
                           f"{TRAIN_CONFIG}), not a weights folder or file")
    return read_source(src, config_path, allow_pickle)


# ---------------------------------------------------------------------------------- materialising, writing

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
    encoders = [json.loads((pipeline / name / CONFIG_NAME).read_text()) for name in ("text_encoder", "text_encoder_2")
                if (pipeline / name / CONFIG_NAME).is_file()]
    if encoders:
        hidden = sum(e["hidden_size"] for e in encoders)
        pooled = encoders[-1].get("projection_dim")
        want = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        if hidden != config.cross_attention_dim[0] or pooled != want:
            raise ConvertError(f"{pipeline}: its text encoders give {hidden}-d token embeddings and {pooled}-d pooled "
                               f"ones, the U-Net expects {config.cross_attention_dim[0]} and {want}")
    return index


def _components(index: Mapping[str, Any]) -> list[str]:
    """The sub-models of a model_index.json ('name': [library, class] entries), the U-Net excluded."""
    return [k for k, v in index.items() if not k.startswith("_") and k != "unet"
            and isinstance(v, list) and v[0] is not None]


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


# ----------------------------------------------------------------------------------------------- students

def make_student(teacher_config: UNetConfig, teacher_params: dict, student_config: UNetConfig,
                 seed: int = 0) -> tuple[dict, dict[str, str], list[str]]:
    """(student params, {student path: teacher path}, [fresh paths]) via `init_student_from_teacher`.

    Student leaves stay (lazy) views of the teacher's. Parameters without a teacher source (a KOALA
    student derived from its teacher has none) get Flax's default initialisation, leaf by leaf.
    """
    abstract = abstract_params(student_config)
    params, mapping, fresh = init_student_from_teacher(teacher_params, teacher_config, student_config, abstract)
    if fresh:
        key = jax.random.key(seed)
        flat = flatten_dict(params)
        for i, (path, leaf) in enumerate(flat.items()):
            if isinstance(leaf, jax.ShapeDtypeStruct):
                flat[path] = fresh_leaf(path, leaf, jax.random.fold_in(key, i))
        params = unflatten_dict(flat)
    return params, mapping, fresh


def fresh_leaf(path: tuple[str, ...], leaf: jax.ShapeDtypeStruct, key: jax.Array) -> np.ndarray:
    """A randomly initialised parameter, as Flax's defaults do it (every koala_jax module uses them):
    LeCun-normal kernels (Dense and Conv alike), zero biases, unit norm scales. Per leaf, because running
    the model's whole `init` costs a full forward trace and compile."""
    if path[-1] == "kernel":
        return np.asarray(jax.nn.initializers.lecun_normal()(key, leaf.shape, leaf.dtype))
    return np.ones(leaf.shape, leaf.dtype) if path[-1] == "scale" else np.zeros(leaf.shape, leaf.dtype)


def mapping_lines(mapping: Mapping[str, str]) -> list[str]:
    """'student <- teacher' per module (attention projections, resnets, single transformer blocks), in
    the student's parameter order; a printable summary of the parameter-level mapping."""
    units: dict[str, str] = {}
    for student, teacher in mapping.items():
        units.setdefault(_unit(student), _unit(teacher))
    return [f"{s} <- {t}" + ("" if s == t else "   (renamed)") for s, t in sorted(units.items(), key=_natural)]


def _unit(path: str) -> str:
    """Module path up to the block that the student keeps or drops as a whole."""
    parts = path.split(".")
    for i, part in enumerate(parts[:-1]):
        if part in ("transformer_blocks", "resnets", "downsamplers", "upsamplers") and parts[i + 1].isdigit():
            return ".".join(parts[: i + 2])
    return ".".join(parts[:-1]) if parts[0] in ("down_blocks", "up_blocks", "mid_block") else parts[0]


def _natural(item: tuple[str, str]) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", item[0])]


# ------------------------------------------------------------------------------------------------- info

def source_config(src: str, config_path: str | None = None, allow_pickle: bool = False) -> tuple[UNetConfig, str]:
    """(config, what it is) of a preset name, a training run, a JAX params dir, or any weights source
    (whose keys and shapes are validated; memory-mapped weights are not read)."""
    path = Path(src)
    if not path.exists() and src in PARAM_COUNTS:
        return preset(src), f"preset {src}"
    if is_training_dir(path):
        return UNetConfig.from_diffusers(json.loads((path / TRAIN_CONFIG).read_text())), f"training run {path}"
    if is_params_dir(path):
        return read_params_config(path), f"JAX params dir {path}"
    if not path.exists() and not _HUB_ID.match(src):
        raise FileNotFoundError(f"{src}: no such file or folder, and not a preset ({', '.join(PARAM_COUNTS)})")
    return read_source(src, config_path, allow_pickle)[0], f"weights {src}"


def describe(config: UNetConfig) -> list[str]:
    """Architecture per stage and exact parameter counts, as printed by `convert_weights.py info`."""
    counts: dict[str, int] = {}
    for path, leaf in flatten_dict(abstract_params(config)).items():
        group = flax_path_to_torch_module(path[:1])
        counts[group] = counts.get(group, 0) + int(np.prod(leaf.shape))
    n = len(config.block_out_channels)
    rows = [("stage", "block type", "channels", "resnets", "transformer depth", "heads", "parameters")]
    for i in range(n):
        rows.append(_stage_row(config, f"down_blocks.{i}", config.down_block_types[i], i, config.layers_per_block[i],
                               config.transformer_layers_per_block[i], counts))
    if config.mid_block_type:
        rows.append(("mid_block", config.mid_block_type, str(config.block_out_channels[-1]), "2",
                     str(config.transformer_layers_per_block[-1]), str(config.num_attention_heads[-1]),
                     f"{counts['mid_block']:,}"))
    else:
        rows.append(("mid_block", "(none)", "-", "-", "-", "-", "0"))
    for i in range(n):
        stage = n - 1 - i
        rows.append(_stage_row(config, f"up_blocks.{i}", config.up_block_types[i], stage,
                               config.layers_per_block[stage] + 1, config.reverse_transformer_layers_per_block[i],
                               counts))
    blocks = sum(v for k, v in counts.items() if k.startswith(("down_blocks", "up_blocks", "mid_block")))
    rows.append(("other", "embeddings, conv_in/out", "-", "-", "-", "-", f"{sum(counts.values()) - blocks:,}"))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    conditioning = (f"cross_attention_dim {config.cross_attention_dim[0]}, pooled text {pooled}, time ids 6 x "
                    f"{config.addition_time_embed_dim}, in/out channels {config.in_channels}/{config.out_channels}, "
                    f"linear projections {config.use_linear_projection}")
    lines += [conditioning, f"parameters: {sum(counts.values()):,}"]
    return lines


def _stage_row(config: UNetConfig, name: str, kind: str, stage: int, resnets: int, depth: int,
               counts: Mapping[str, int]) -> tuple[str, ...]:
    attention = kind.startswith("CrossAttn")
    return (name, kind, str(config.block_out_channels[stage]), str(resnets), str(depth) if attention else "-",
            str(config.num_attention_heads[stage]) if attention else "-", f"{counts[name]:,}")
