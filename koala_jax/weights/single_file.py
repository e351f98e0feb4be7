"""Single weights files: original (Stability LDM/SGM) or diffusers keys, a whole checkpoint or the U-Net
alone, `.safetensors` or (only when explicitly allowed) a torch pickle.

Original keys are renamed by diffusers' own `convert_ldm_unet_checkpoint` (values untouched: memory maps
stay lazy); when no config is given, the architecture is inferred from the names and shapes. Pickles
are loaded with `torch.load(weights_only=True)`, which refuses arbitrary code. torch and diffusers are
imported only by these paths.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from koala_jax.errors import ConvertError
from koala_jax.models import UNetConfig
from koala_jax.students.presets import SDXL_BASE
from koala_jax.weights.diffusers_dir import read_config, require_sdxl_family, to_flax
from koala_jax.weights.safetensors import load_file

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")
LDM_PREFIX = "model.diffusion_model."  # diffusers' LDM_UNET_KEY


def read_single_file(
    path: Path, config_path: str | os.PathLike | None = None, allow_pickle: bool = False
) -> tuple[UNetConfig, dict]:
    """A single weights file: original (LDM/SGM) keys or diffusers keys, whole checkpoint or U-Net only."""
    state = read_weights_file(path, allow_pickle)
    given = read_config(config_path) if config_path else None
    if given:
        require_sdxl_family(given, config_path)
    if is_original_format(state):
        state = original_to_diffusers(state, given, path)
    config = given or infer_config(state, path)
    return config, to_flax(state, config, path)


def read_weights_file(path: Path, allow_pickle: bool) -> dict[str, np.ndarray]:
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return load_file(path)
    if suffix not in PICKLE_SUFFIXES:
        raise ConvertError(
            f"{path}: unknown weights format {suffix!r} (expected .safetensors, or "
            f"{'/'.join(PICKLE_SUFFIXES)} with --allow-pickle)"
        )
    if not allow_pickle:
        raise ConvertError(
            f"{path}: {suffix} files are Python pickles, which can run code when loaded. Convert "
            f"it to .safetensors, or pass --allow-pickle to load it with torch.load(weights_only=True)"
        )
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


def is_original_format(state: Mapping[str, Any]) -> bool:
    """Original Stability keys: a whole checkpoint (`model.diffusion_model.*`) or a U-Net-only file."""
    return any(k.startswith(LDM_PREFIX) for k in state) or "input_blocks.0.0.weight" in state


def original_to_diffusers(state: Mapping[str, np.ndarray], config: UNetConfig | None, where: Path) -> dict:
    """diffusers keys for an original-format U-Net, renamed by diffusers' own converter (values untouched:
    memory maps stay lazy). VAE and text-encoder keys of a whole checkpoint are ignored."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    if not any(k.startswith(LDM_PREFIX) for k in state):
        state = {LDM_PREFIX + k: v for k, v in state.items()}
    unet = {k[len(LDM_PREFIX) :]: v for k, v in state.items() if k.startswith(LDM_PREFIX)}
    if config is None:
        layers = _original_layers_per_block(unet, where)
    elif len(set(config.layers_per_block)) == 1:
        layers = config.layers_per_block[0]
    else:
        raise ConvertError(
            f"{where}: original-format checkpoints have one layers_per_block for every stage; "
            f"the given config has {list(config.layers_per_block)}"
        )
    text_time = "label_emb.0.0.weight" in unet
    return convert_ldm_unet_checkpoint(
        dict(state), {"layers_per_block": layers, "addition_embed_type": "text_time" if text_time else None}
    )


def _original_layers_per_block(unet: Mapping[str, Any], where: Path) -> int:
    """Residual blocks per stage, from the number of `input_blocks` (conv_in, then per stage
    `layers_per_block` blocks and, except at the last stage, a downsampler)."""
    blocks = _indices(unet, "input_blocks.")
    downsamplers = {k.split(".")[1] for k in unet if re.match(r"input_blocks\.\d+\.0\.op\.", k)}
    stages = len(downsamplers) + 1
    layers, rest = divmod(len(blocks) - 1 - len(downsamplers), stages)
    if not blocks or rest or layers < 1:
        raise ConvertError(
            f"{where}: cannot infer the U-Net layout from its input_blocks ({len(blocks)} blocks, "
            f"{len(downsamplers)} downsamplers); pass --config"
        )
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
        raise ConvertError(
            f"{where}: no U-Net weights found (expected diffusers keys such as 'conv_in.weight' "
            f"or original keys such as '{LDM_PREFIX}input_blocks.0.0.weight')"
        )
    shape = {k: np.shape(v) for k, v in state.items()}
    stages = _indices(state, "down_blocks.")
    channels = [shape[f"down_blocks.{i}.resnets.0.conv1.weight"][0] for i in stages]
    head_channels = 64  # SDXL's (diffusers' SDXL config: attention_head_dim [5, 10, 20] for [320, 640, 1280]).
    for i, ch in zip(stages, channels):
        if _indices(state, f"down_blocks.{i}.attentions.") and ch % head_channels:
            raise ConvertError(
                f"{where}: stage {i} has {ch} channels, not a multiple of SDXL's {head_channels} "
                f"channels per head; pass --config with the model's config.json"
            )

    def depth(block: str) -> int:
        return len(_indices(state, f"{block}.attentions.0.transformer_blocks.")) or 1

    proj_in = next((s for k, s in shape.items() if k.endswith(".proj_in.weight")), None)
    to_k = next(
        (s for k, s in shape.items() if k.endswith(".attn2.to_k.weight")), (0, SDXL_BASE.cross_attention_dim[0])
    )
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
