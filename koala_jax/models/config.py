"""The U-Net architecture as a hashable dataclass built from a diffusers `config.json`.

The Flax modules take a `UNetConfig` as a module attribute, so it must be frozen and hashable (tuples,
not lists). `UNetConfig.from_diffusers` accepts exactly the fields of diffusers'
`UNet2DConditionModel` that the SDXL family uses, and refuses any other field that is set to something
we do not implement: an unsupported option is an error that names the field, never silently ignored.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from koala_jax.errors import KoalaError

DOWN_BLOCK_TYPES = ("DownBlock2D", "CrossAttnDownBlock2D")
UP_BLOCK_TYPES = ("UpBlock2D", "CrossAttnUpBlock2D")
MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn", None)

# diffusers fields that we accept only at their default value (they select variants SDXL never uses).
_FIXED_FIELDS: dict[str, Any] = {
    "center_input_sample": False,
    "only_cross_attention": False,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "dropout": 0.0,
    "act_fn": "silu",
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "dual_cross_attention": False,
    "class_embed_type": None,
    "num_class_embeds": None,
    "upcast_attention": False,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
}
# Fields that carry no architecture (diffusers metadata, or ignored by UNet2DConditionModel itself).
_IGNORED_FIELDS = ("sample_size", "addition_embed_type_num_heads")


class UnsupportedConfigError(KoalaError, ValueError):
    """A diffusers config field that this implementation does not support."""


def _per_block(name: str, value: Any, n: int) -> tuple:
    """Broadcast an int-or-list config field to one entry per block, checking its length."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise UnsupportedConfigError(
                f"config field {name!r} has {len(value)} entries, expected {n} (one per block)"
            )
        return tuple(value)
    return (value,) * n


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """SDXL-family `UNet2DConditionModel` architecture. Field names follow diffusers' config.json."""

    block_out_channels: tuple[int, ...] = (320, 640, 1280)
    down_block_types: tuple[str, ...] = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
    up_block_types: tuple[str, ...] = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    layers_per_block: tuple[int, ...] = (2, 2, 2)
    transformer_layers_per_block: tuple[int, ...] = (1, 2, 10)
    # Decoder depths, from the deepest stage up (diffusers' reverse_transformer_layers_per_block).
    reverse_transformer_layers_per_block: tuple[int, ...] = (10, 2, 1)
    # Number of heads per block. diffusers' SDXL config stores this in `attention_head_dim` (a
    # historical misnomer that diffusers itself resolves as `num_attention_heads or attention_head_dim`).
    num_attention_heads: tuple[int, ...] = (5, 10, 20)
    cross_attention_dim: tuple[int, ...] = (2048, 2048, 2048)
    use_linear_projection: bool = True
    in_channels: int = 4
    out_channels: int = 4
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    addition_embed_type: str | None = "text_time"
    addition_time_embed_dim: int | None = 256
    projection_class_embeddings_input_dim: int | None = 2816

    def __post_init__(self) -> None:
        n = len(self.block_out_channels)
        for name in (
            "down_block_types",
            "up_block_types",
            "layers_per_block",
            "transformer_layers_per_block",
            "reverse_transformer_layers_per_block",
            "num_attention_heads",
            "cross_attention_dim",
        ):
            if len(getattr(self, name)) != n:
                raise UnsupportedConfigError(f"config field {name!r} needs {n} entries, got {getattr(self, name)}")
        for t in self.down_block_types:
            if t not in DOWN_BLOCK_TYPES:
                raise UnsupportedConfigError(f"config field 'down_block_types': unsupported block type {t!r}")
        for t in self.up_block_types:
            if t not in UP_BLOCK_TYPES:
                raise UnsupportedConfigError(f"config field 'up_block_types': unsupported block type {t!r}")
        if self.mid_block_type not in MID_BLOCK_TYPES:
            raise UnsupportedConfigError(f"config field 'mid_block_type': unsupported {self.mid_block_type!r}")
        if self.addition_embed_type not in ("text_time", None):
            raise UnsupportedConfigError(
                f"config field 'addition_embed_type': unsupported {self.addition_embed_type!r}"
            )
        for ch, heads in zip(self.block_out_channels, self.num_attention_heads):
            if ch % heads:
                raise UnsupportedConfigError(
                    f"config field 'num_attention_heads': {heads} heads do not divide {ch} channels"
                )

    @property
    def time_embed_dim(self) -> int:
        return self.block_out_channels[0] * 4

    @property
    def pooled_text_dim(self) -> int | None:
        """Width of the pooled text embedding (`text_embeds`, 1280 in SDXL): what the add_embedding takes
        beside the 6 micro-conditioning ids, each embedded to `addition_time_embed_dim`."""
        if self.addition_embed_type != "text_time":
            return None
        return self.projection_class_embeddings_input_dim - 6 * self.addition_time_embed_dim

    @classmethod
    def from_diffusers(cls, config: dict[str, Any]) -> UNetConfig:
        """Parse a diffusers `UNet2DConditionModel` config dict; refuse fields we do not implement."""
        fields = {f.name for f in dataclasses.fields(cls)}
        given = {k: v for k, v in config.items() if not k.startswith("_") and k not in _IGNORED_FIELDS}
        for key, value in given.items():
            if key in _FIXED_FIELDS:
                if value != _FIXED_FIELDS[key]:
                    raise UnsupportedConfigError(
                        f"config field {key!r} = {value!r} is not supported (only {_FIXED_FIELDS[key]!r})"
                    )
            elif key not in fields and key not in ("attention_head_dim",):
                raise UnsupportedConfigError(f"unknown config field {key!r} = {value!r}")
        n = len(given.get("block_out_channels", cls.block_out_channels))
        heads = given.get("num_attention_heads") or given.get("attention_head_dim", 8)
        depth = _per_block("transformer_layers_per_block", given.get("transformer_layers_per_block", 1), n)
        reverse = given.get("reverse_transformer_layers_per_block")
        kwargs = {k: given[k] for k in fields & given.keys()}
        kwargs.update(
            block_out_channels=tuple(given.get("block_out_channels", cls.block_out_channels)),
            down_block_types=tuple(given.get("down_block_types", cls.down_block_types)),
            up_block_types=tuple(given.get("up_block_types", cls.up_block_types)),
            mid_block_type=given.get("mid_block_type", "UNetMidBlock2DCrossAttn"),
            layers_per_block=_per_block("layers_per_block", given.get("layers_per_block", 2), n),
            transformer_layers_per_block=depth,
            reverse_transformer_layers_per_block=tuple(reverse) if reverse is not None else depth[::-1],
            num_attention_heads=_per_block("num_attention_heads", heads, n),
            cross_attention_dim=_per_block("cross_attention_dim", given.get("cross_attention_dim", 1280), n),
            use_linear_projection=given.get("use_linear_projection", False),
            addition_embed_type=given.get("addition_embed_type"),
            addition_time_embed_dim=given.get("addition_time_embed_dim"),
            projection_class_embeddings_input_dim=given.get("projection_class_embeddings_input_dim"),
        )
        if kwargs["addition_embed_type"] == "text_time" and not (
            kwargs["addition_time_embed_dim"] and kwargs["projection_class_embeddings_input_dim"]
        ):
            raise UnsupportedConfigError(
                "addition_embed_type 'text_time' needs 'addition_time_embed_dim' and "
                "'projection_class_embeddings_input_dim'"
            )
        return cls(**kwargs)

    def to_diffusers(self) -> dict[str, Any]:
        """The diffusers config dict (`UNet2DConditionModel(**d)` builds the same architecture)."""
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
        # diffusers' SDXL checkpoints store head counts under `attention_head_dim`; write it the same way
        # so the exported config.json reads like the teacher's.
        d["attention_head_dim"] = d.pop("num_attention_heads")
        return {"_class_name": "UNet2DConditionModel", **d}
