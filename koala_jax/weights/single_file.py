"""Single weights files: original (Stability SGM/LDM) or diffusers keys, a whole checkpoint or the U-Net
alone, `.safetensors` or (only when explicitly allowed) a torch pickle, and the key mapping between the
diffusers layout and the original one for every part of an SDXL checkpoint, both ways:

- U-Net, `model.diffusion_model.`: `input_blocks.K.S`, `middle_block.M`, `output_blocks.K.S` (K counts
  resnet/attention pairs and samplers in order, S is the slot: resnet, attention, upsampler);
- VAE, `first_stage_model.`: `encoder.down.I.block.J`, `mid.block_1`, `mid.attn_1.{q,k,v,proj_out}`
  (1x1 convs where diffusers has Linear layers);
- CLIP-L, `conditioner.embedders.0.transformer.`: Hugging Face's own layout (`text_model.*`);
- OpenCLIP bigG, `conditioner.embedders.1.model.`: `transformer.resblocks.N.attn.in_proj_weight` (q, k and
  v stacked), `text_projection` (transposed).

The rules are those diffusers' single_file_utils reads (`convert_ldm_unet_checkpoint`,
`convert_ldm_vae_checkpoint`, `convert_open_clip_checkpoint`), written here for any number of resnet /
attention pairs per stage and per-pair transformer depths (SSD-1B, Vega, KOALA students), which
diffusers' own U-Net converter cannot number (it assumes one `layers_per_block` for every stage). Values
are never changed, only renamed (VAE attention weights reshaped, OpenCLIP's q/k/v split or stacked,
its projection transposed), so memory maps stay lazy on the way in and a round trip is bit-identical.
Pickles are loaded with `torch.load(weights_only=True)`, which refuses arbitrary code; torch is imported
only by that path.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from koala_jax.errors import ConvertError
from koala_jax.models import UNetConfig
from koala_jax.students.presets import SDXL_BASE
from koala_jax.weights.diffusers_dir import (
    CONFIG_NAME,
    PICKLE_WEIGHTS_NAME,
    has_safetensors,
    read_config,
    require_sdxl_family,
    to_flax,
)
from koala_jax.weights.safetensors import load_file

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")
LDM_PREFIX = "model.diffusion_model."  # diffusers' LDM_UNET_KEY
PREFIXES = {
    "unet": LDM_PREFIX,
    "vae": "first_stage_model.",
    "text_encoder": "conditioner.embedders.0.transformer.",
    "text_encoder_2": "conditioner.embedders.1.model.",
}

# ----------------------------------------------------------------------------------------------- U-Net

_UNET_TOP = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}


def _swap(name: str, table: Mapping[str, str]) -> str:
    """`name` with its leading module renamed by `table` ('norm1.weight' -> 'in_layers.0.weight')."""
    for old, new in table.items():
        if name == old or name.startswith(old + "."):
            return new + name[len(old) :]
    return name


def _invert(table: Mapping[str, str]) -> dict[str, str]:
    return {v: k for k, v in table.items()}


def _input_slots(layers: tuple[int, ...]) -> list[tuple[int, int | None]]:
    """(stage, pair) of each original `input_blocks` entry after conv_in; pair None: the downsampler."""
    slots: list[tuple[int, int | None]] = []
    for stage, pairs in enumerate(layers):
        slots += [(stage, j) for j in range(pairs)] + ([(stage, None)] if stage < len(layers) - 1 else [])
    return slots


def _output_slots(layers: tuple[int, ...]) -> list[tuple[int, int]]:
    """(up block, pair) of each original `output_blocks` entry (deepest block first, pairs + 1 each)."""
    return [(i, j) for i, pairs in enumerate(layers[::-1]) for j in range(pairs + 1)]


def unet_key_to_original(key: str, layers: tuple[int, ...], up_attention: tuple[bool, ...]) -> str:
    """The original key of a diffusers U-Net key ('down_blocks.1.attentions.0.proj_in.weight' ->
    'input_blocks.4.1.proj_in.weight'); `up_attention[i]`: whether up_blocks.i has attentions (its
    upsampler then sits in slot 2 of the original block, else in slot 1)."""
    top = _swap(key, _UNET_TOP)
    if top != key:
        return top
    parts = key.split(".")
    if parts[0] == "mid_block" and parts[1] in ("resnets", "attentions"):
        index, rest = int(parts[2]), ".".join(parts[3:])
        if parts[1] == "resnets":
            return f"middle_block.{2 * index}.{_swap(rest, _RESNET)}"
        return f"middle_block.{2 * index + 1}.{rest}"
    if parts[0] in ("down_blocks", "up_blocks") and len(parts) > 4:
        block, kind, pair, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
        if parts[0] == "down_blocks":
            slots = _input_slots(layers)
            if kind == "downsamplers":
                return f"input_blocks.{1 + slots.index((block, None))}.0.op.{rest.removeprefix('conv.')}"
            index = 1 + slots.index((block, pair))
        else:
            slots = _output_slots(layers)
            if kind == "upsamplers":
                last = max(j for i, j in slots if i == block)
                return f"output_blocks.{slots.index((block, last))}.{2 if up_attention[block] else 1}.{rest}"
            index = slots.index((block, pair))
        block_name = parts[0].replace("down_blocks", "input_blocks").replace("up_blocks", "output_blocks")
        if kind == "resnets":
            return f"{block_name}.{index}.0.{_swap(rest, _RESNET)}"
        if kind == "attentions":
            return f"{block_name}.{index}.1.{rest}"
    raise ConvertError(f"no original name for U-Net key {key!r}")


_ORIGINAL_BLOCK = re.compile(r"^(input_blocks|output_blocks)\.(\d+)\.(\d+)\.(.+)$|^middle_block\.(\d+)\.(.+)$")


def unet_key_from_original(key: str, layers: tuple[int, ...]) -> str:
    """The diffusers key of an original U-Net key (the inverse of `unet_key_to_original`)."""
    top = _swap(key, _invert(_UNET_TOP))
    if top != key:
        return top
    m = _ORIGINAL_BLOCK.match(key)
    if m is None:
        raise ConvertError(f"unexpected original U-Net key {key!r}")
    if m[5] is not None:
        index, rest = int(m[5]), m[6]
        if index % 2:
            return f"mid_block.attentions.{index // 2}.{rest}"
        return f"mid_block.resnets.{index // 2}.{_swap(rest, _invert(_RESNET))}"
    kind, index, slot, rest = m[1], int(m[2]), int(m[3]), m[4]
    slots = _input_slots(layers) if kind == "input_blocks" else _output_slots(layers)
    position = index - 1 if kind == "input_blocks" else index
    if not 0 <= position < len(slots):
        raise ConvertError(f"unexpected original U-Net key {key!r} (the layout {list(layers)} has no block {index})")
    block, pair = slots[position]
    prefix = "down_blocks" if kind == "input_blocks" else "up_blocks"
    if pair is None and slot == 0 and rest.startswith("op."):
        return f"down_blocks.{block}.downsamplers.0.conv.{rest[3:]}"
    if kind == "output_blocks" and (slot == 2 or (slot == 1 and rest.startswith("conv."))):
        return f"up_blocks.{block}.upsamplers.0.{rest}"
    if pair is not None and slot == 0:
        return f"{prefix}.{block}.resnets.{pair}.{_swap(rest, _invert(_RESNET))}"
    if pair is not None and slot == 1:
        return f"{prefix}.{block}.attentions.{pair}.{rest}"
    raise ConvertError(f"unexpected original U-Net key {key!r}")


def unet_to_original(state: Mapping[str, Any], config: UNetConfig) -> dict[str, Any]:
    """A diffusers U-Net state dict under original whole-checkpoint keys (`model.diffusion_model.*`)."""
    up_attention = tuple(bool(config.up_depths(i)) for i in range(len(config.block_out_channels)))
    return {LDM_PREFIX + unet_key_to_original(k, config.layers_per_block, up_attention): v for k, v in state.items()}


def original_unet_layers(keys: Any, where: object) -> tuple[int, ...]:
    """Resnet/attention pairs per stage of an original U-Net, read from its `input_blocks` (conv_in, then
    per stage its pairs and, except at the last stage, a downsampler `K.0.op`)."""
    blocks = _indices(keys, "input_blocks.")
    downsamplers = sorted({int(m[1]) for k in keys if (m := re.match(r"input_blocks\.(\d+)\.0\.op\.", k))})
    bounds = [0, *downsamplers, len(blocks)]
    layers = tuple(b - a - 1 for a, b in zip(bounds, bounds[1:]))
    outputs = _indices(keys, "output_blocks.")
    if (
        blocks != list(range(len(blocks)))
        or not blocks
        or min(layers) < 1
        or outputs != list(range(sum(n + 1 for n in layers)))
    ):
        raise ConvertError(
            f"{where}: cannot read the U-Net layout from its input_blocks ({len(blocks)} blocks, downsamplers at "
            f"{downsamplers}) and {len(outputs)} output_blocks; pass --config"
        )
    return layers


def original_to_diffusers(state: Mapping[str, Any], config: UNetConfig | None, where: object) -> dict[str, Any]:
    """diffusers keys for an original-format U-Net (a whole checkpoint or the U-Net alone); values untouched
    (memory maps stay lazy). The other parts of a whole checkpoint are ignored."""
    if any(k.startswith(LDM_PREFIX) for k in state):
        state = {k[len(LDM_PREFIX) :]: v for k, v in state.items() if k.startswith(LDM_PREFIX)}
    layers = config.layers_per_block if config else original_unet_layers(state, where)
    try:
        return {unet_key_from_original(k, layers): v for k, v in state.items()}
    except ConvertError as e:
        raise ConvertError(f"{where}: {e}") from e


# ------------------------------------------------------------------------------------------------- VAE

_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_VAE_LINEAR = ("q.weight", "k.weight", "v.weight", "proj_out.weight")  # 1x1 convs in the original.


def _up_blocks(keys: Any, pattern: str) -> int:
    return len({m[1] for k in keys if (m := re.match(pattern, k))})


def vae_to_original(state: Mapping[str, Any]) -> dict[str, Any]:
    """A diffusers AutoencoderKL state dict under original (LDM) names, without the `first_stage_model.`
    prefix; attention projections become the original's 1x1 conv weights (a reshape, no copy)."""
    n_up = _up_blocks(state, r"decoder\.up_blocks\.(\d+)\.")
    out = {}
    for key, value in state.items():
        name = _vae_name_to_original(key, n_up)
        if name.split(".", 2)[1:2] == ["mid"] and name.endswith(_VAE_LINEAR) and np.ndim(value) == 2:
            value = np.asarray(value).reshape(*np.shape(value), 1, 1)
        out[name] = value
    return out


def _vae_name_to_original(key: str, n_up: int) -> str:
    coder, _, rest = key.partition(".")
    if rest.startswith("conv_norm_out."):
        return f"{coder}.norm_out.{rest[len('conv_norm_out.') :]}"
    if m := re.match(r"(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.+)$", rest):
        kind, block, member, index, leaf = m.groups()
        block = int(block) if kind == "down" else n_up - 1 - int(block)
        if member == "resnets":
            return f"{coder}.{kind}.{block}.block.{index}.{_swap(leaf, _VAE_RESNET)}"
        return f"{coder}.{kind}.{block}.{'downsample' if kind == 'down' else 'upsample'}.{leaf}"
    if m := re.match(r"mid_block\.resnets\.(\d+)\.(.+)$", rest):
        return f"{coder}.mid.block_{int(m[1]) + 1}.{_swap(m[2], _VAE_RESNET)}"
    if m := re.match(r"mid_block\.attentions\.0\.(.+)$", rest):
        return f"{coder}.mid.attn_1.{_swap(m[1], _VAE_ATTENTION)}"
    return key  # conv_in, conv_out, quant_conv, post_quant_conv: the same names.


def original_to_vae(state: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of `vae_to_original` (1x1 conv attention weights back to Linear: a view, no copy)."""
    n_up = _up_blocks(state, r"decoder\.up\.(\d+)\.")
    out = {}
    for key, value in state.items():
        name = _vae_name_from_original(key, n_up)
        if ".mid_block.attentions." in name and name.endswith(".weight") and np.ndim(value) == 4:
            value = np.asarray(value)[:, :, 0, 0]
        out[name] = value
    return out


def _vae_name_from_original(key: str, n_up: int) -> str:
    coder, _, rest = key.partition(".")
    if rest.startswith("norm_out."):
        return f"{coder}.conv_norm_out.{rest[len('norm_out.') :]}"
    if m := re.match(r"(down|up)\.(\d+)\.(block\.(\d+)|downsample|upsample)\.(.+)$", rest):
        kind, block, member, index, leaf = m.groups()
        block = int(block) if kind == "down" else n_up - 1 - int(block)
        if index is not None:
            return f"{coder}.{kind}_blocks.{block}.resnets.{index}.{_swap(leaf, _invert(_VAE_RESNET))}"
        return f"{coder}.{kind}_blocks.{block}.{kind}samplers.0.{leaf}"
    if m := re.match(r"mid\.block_(\d+)\.(.+)$", rest):
        return f"{coder}.mid_block.resnets.{int(m[1]) - 1}.{_swap(m[2], _invert(_VAE_RESNET))}"
    if m := re.match(r"mid\.attn_1\.(.+)$", rest):
        return f"{coder}.mid_block.attentions.0.{_swap(m[1], _invert(_VAE_ATTENTION))}"
    return key


# -------------------------------------------------------------------------------------- text encoders

_HF_PREFIX = "text_model."


def clip_to_original(state: Mapping[str, Any]) -> dict[str, Any]:
    """CLIP-L (transformers' CLIPTextModel) under SDXL's names: Hugging Face's own layout, always with
    the `text_model.` level (transformers >= 5.6 saves CLIPTextModel without it)."""
    return {_HF_PREFIX + k.removeprefix(_HF_PREFIX): v for k, v in state.items()}


def original_to_clip(state: Mapping[str, Any]) -> dict[str, Any]:
    return dict(state)


_OPEN_CLIP_TOP = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}
_OPEN_CLIP_LAYER = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_OPEN_CLIP_EXTRA = ("logit_scale", "attn_mask")  # OpenCLIP state that the text encoder does not use.
_QKV = re.compile(r"^encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$")


def open_clip_to_original(state: Mapping[str, Any]) -> dict[str, Any]:
    """OpenCLIP bigG (transformers' CLIPTextModelWithProjection) under SDXL's OpenCLIP names: each
    layer's q, k and v projections stacked into `attn.in_proj_*`, `text_projection` transposed."""
    out, qkv = {}, {}
    for key, value in state.items():
        name = key.removeprefix(_HF_PREFIX)
        if key == "text_projection.weight":
            out["text_projection"] = np.ascontiguousarray(np.asarray(value).T)
        elif name in _OPEN_CLIP_TOP:
            out[_OPEN_CLIP_TOP[name]] = value
        elif m := _QKV.match(name):
            qkv.setdefault((m[1], m[3]), {})[m[2]] = value
        elif m := re.match(r"encoder\.layers\.(\d+)\.(.+)$", name):
            out[f"transformer.resblocks.{m[1]}.{_swap(m[2], _OPEN_CLIP_LAYER)}"] = value
        elif not name.endswith("position_ids"):
            raise ConvertError(f"no OpenCLIP name for text encoder key {key!r}")
    for (layer, leaf), parts in qkv.items():
        out[f"transformer.resblocks.{layer}.attn.in_proj_{leaf}"] = np.concatenate([parts[c] for c in "qkv"])
    return out


def original_to_open_clip(state: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of `open_clip_to_original` (in_proj split in thirds, as diffusers does)."""
    out = {}
    for key, value in state.items():
        if key == "text_projection":
            out["text_projection.weight"] = np.ascontiguousarray(np.asarray(value).T)
        elif key in _invert(_OPEN_CLIP_TOP):
            out[_HF_PREFIX + _invert(_OPEN_CLIP_TOP)[key]] = value
        elif m := re.match(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$", key):
            for part, chunk in zip("qkv", np.split(np.asarray(value), 3)):
                out[f"{_HF_PREFIX}encoder.layers.{m[1]}.self_attn.{part}_proj.{m[2]}"] = chunk
        elif m := re.match(r"transformer\.resblocks\.(\d+)\.(.+)$", key):
            out[f"{_HF_PREFIX}encoder.layers.{m[1]}.{_swap(m[2], _invert(_OPEN_CLIP_LAYER))}"] = value
        elif key not in _OPEN_CLIP_EXTRA:
            raise ConvertError(f"unexpected OpenCLIP key {key!r}")
    return out


COMPONENT_TO_ORIGINAL: dict[str, Callable[[Mapping[str, Any]], dict[str, Any]]] = {
    "vae": vae_to_original,
    "text_encoder": clip_to_original,
    "text_encoder_2": open_clip_to_original,
}
COMPONENT_FROM_ORIGINAL: dict[str, Callable[[Mapping[str, Any]], dict[str, Any]]] = {
    "vae": original_to_vae,
    "text_encoder": original_to_clip,
    "text_encoder_2": original_to_open_clip,
}


def component_to_original(name: str, state: Mapping[str, Any]) -> dict[str, Any]:
    """A pipeline component's state dict ('vae', 'text_encoder', 'text_encoder_2') under its whole-checkpoint
    keys (prefix included)."""
    return {PREFIXES[name] + k: v for k, v in COMPONENT_TO_ORIGINAL[name](state).items()}


def read_original_components(path: Path, config: UNetConfig | None = None) -> dict[str, dict[str, Any]]:
    """Every part of a whole original checkpoint in diffusers layout ({'unet': ..., 'vae': ...}; parts the
    file does not hold are left out), memory-mapped where no reshaping is needed."""
    state = read_weights_file(path, allow_pickle=False)
    parts = {}
    for name, prefix in PREFIXES.items():
        own = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if own:
            try:
                parts[name] = (
                    original_to_diffusers(own, config, path) if name == "unet" else COMPONENT_FROM_ORIGINAL[name](own)
                )
            except ConvertError as e:
                raise ConvertError(f"{path}: {e}") from e
    return parts


# ------------------------------------------------------------------------------------ reading a U-Net


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


def is_pickle_source(src: str | os.PathLike) -> bool:
    """Whether a weights source is read through torch.load: a pickle file, or a diffusers U-Net or pipeline
    folder whose only U-Net weights are a .bin (reads folder and file names only)."""
    path = Path(src)
    if path.is_file():
        return path.suffix.lower() in PICKLE_SUFFIXES
    folders = [f for f in (path, path / "unet") if (f / CONFIG_NAME).is_file()]
    return bool(folders) and not has_safetensors(folders[0]) and (folders[0] / PICKLE_WEIGHTS_NAME).is_file()


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
        raise ConvertError(f"{path}: torch.load(weights_only=True, mmap=True) refused it: {e}") from e
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


def _indices(keys: Any, prefix: str) -> list[int]:
    """Sorted distinct integers that directly follow `prefix` in `keys`."""
    found = {int(m.group(1)) for k in keys if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return sorted(found)


def infer_config(state: Mapping[str, Any], where: object) -> UNetConfig:
    """The architecture of diffusers-keyed U-Net weights, read from their names and shapes, per-pair
    transformer depths and the mid block's kind included.

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
    ups = _indices(state, "up_blocks.")
    channels = [shape[f"down_blocks.{i}.resnets.0.conv1.weight"][0] for i in stages]
    head_channels = 64  # SDXL's (diffusers' SDXL config: attention_head_dim [5, 10, 20] for [320, 640, 1280]).
    for i, ch in zip(stages, channels):
        if _indices(state, f"down_blocks.{i}.attentions.") and ch % head_channels:
            raise ConvertError(
                f"{where}: stage {i} has {ch} channels, not a multiple of SDXL's {head_channels} "
                f"channels per head; pass --config with the model's config.json"
            )

    def depths(block: str) -> list[int]:
        pairs = _indices(state, f"{block}.attentions.")
        return [len(_indices(state, f"{block}.attentions.{j}.transformer_blocks.")) for j in pairs]

    mid = "UNetMidBlock2DCrossAttn" if _indices(state, "mid_block.attentions.") else None
    mid = mid or ("UNetMidBlock2D" if "mid_block.resnets.0.conv1.weight" in state else None)
    encoder = [depths(f"down_blocks.{i}") or [1] for i in stages]
    if mid == "UNetMidBlock2DCrossAttn":  # diffusers reads the mid depth from the deepest down block.
        mid_depth = depths("mid_block")[0]
        if not _indices(state, f"down_blocks.{stages[-1]}.attentions."):
            encoder[-1] = [mid_depth]
        elif encoder[-1][0] != mid_depth:
            raise ConvertError(
                f"{where}: the mid block has {mid_depth} transformer blocks and down_blocks.{stages[-1]}'s first "
                f"attention {encoder[-1][0]}; diffusers configs tie the two, so no config describes these weights"
            )
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
        "up_block_types": [_block_type(state, f"up_blocks.{i}", "Up") for i in ups],
        "mid_block_type": mid,
        "transformer_layers_per_block": encoder,
        "reverse_transformer_layers_per_block": [depths(f"up_blocks.{i}") or 1 for i in ups],
        "attention_head_dim": [max(1, ch // head_channels) for ch in channels],
        "cross_attention_dim": to_k[1],
        "use_linear_projection": proj_in is not None and len(proj_in) == 2,
        "norm_num_groups": SDXL_BASE.norm_num_groups,
        "addition_embed_type": "text_time" if "add_embedding.linear_1.weight" in state else None,
        "addition_time_embed_dim": SDXL_BASE.addition_time_embed_dim,
        "projection_class_embeddings_input_dim": shape.get("add_embedding.linear_1.weight", (0, None))[1],
    }
    try:
        config = UNetConfig.from_diffusers(raw)
    except ValueError as e:
        raise ConvertError(
            f"{where}: the architecture read from the weights is not supported ({e}); pass --config"
        ) from e
    require_sdxl_family(config, where)
    return config


def _block_type(state: Mapping[str, Any], block: str, kind: str) -> str:
    return f"CrossAttn{kind}Block2D" if _indices(state, f"{block}.attentions.") else f"{kind}Block2D"
