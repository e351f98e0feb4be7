"""The U-Net architecture as a hashable dataclass built from a diffusers `config.json`.

The Flax modules take a `UNetConfig` as a module attribute, so it must be frozen and hashable (tuples,
not lists). `UNetConfig.from_diffusers` accepts exactly the fields of diffusers'
`UNet2DConditionModel` that the SDXL family uses, and refuses any other field that is set to something
we do not implement: an unsupported option is an error that names the field, never silently ignored.

Transformer depths follow diffusers: per down block, one int (every resnet/attention pair of the block)
or one depth per pair, as SSD-1B and Segmind-Vega use (`[[1], [2, 2], [4, 4]]`); the decoder's depths
(`reverse_transformer_layers_per_block`, deepest block first) are the encoder's reversed unless given,
and a given entry may list one depth per decoder pair (`[[4, 4, 10], [2, 1, 1], 1]`). The mid block's
depth is not a field of its own: diffusers takes the deepest down block's entry (its first depth when it
is a list), and so do we.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from koala_jax.errors import KoalaError

DOWN_BLOCK_TYPES = ("DownBlock2D", "CrossAttnDownBlock2D")
UP_BLOCK_TYPES = ("UpBlock2D", "CrossAttnUpBlock2D")
# UNetMidBlock2D is the single-resnet mid block of SSD-1B and Segmind-Vega (diffusers builds it without
# attention inside UNet2DConditionModel); None: no mid block (KOALA-700M).
MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D", None)
_RES_PREFIX = "UNetRes"  # diffusers reads 'UNetResDownBlock2D' as 'DownBlock2D' (get_down_block strips it).

# One block's transformer depth: the same for every resnet/attention pair, or one per pair.
Depth = int | tuple[int, ...]

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
# Spellings diffusers treats as the fixed value ('swish' is SiLU; a per-block list of False is False).
_EQUIVALENT = {"act_fn": ("swish",)}
# Fields that carry no architecture (diffusers metadata, or ignored by UNet2DConditionModel itself).
_IGNORED_FIELDS = ("addition_embed_type_num_heads",)


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


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _depth_entry(name: str, i: int, value: Any) -> Depth:
    """One block's depth entry as an int or a tuple of ints >= 0."""
    if isinstance(value, (list, tuple)):
        if not all(_is_int(d) and d >= 0 for d in value):
            raise UnsupportedConfigError(f"config field {name!r}: entry {i} = {list(value)} must hold ints >= 0")
        return tuple(value)
    if not _is_int(value) or value < 0:
        raise UnsupportedConfigError(f"config field {name!r}: entry {i} = {value!r} is not an int >= 0 or a list")
    return value


def _uniform(depth: Depth) -> Depth:
    """A checked entry whose pairs all have the same depth as that int (`[2, 2]` and `2` build the same
    blocks), so equal architectures compare equal."""
    return depth[0] if isinstance(depth, tuple) and depth and len(set(depth)) == 1 else depth


def per_layer(depth: Depth, layers: int) -> tuple[int, ...]:
    """One block's depth as one int per resnet/attention pair."""
    return (depth,) * layers if isinstance(depth, int) else depth


def _nested_lists(value: Any) -> Any:
    return [_nested_lists(v) for v in value] if isinstance(value, tuple) else value


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """SDXL-family `UNet2DConditionModel` architecture. Field names follow diffusers' config.json."""

    block_out_channels: tuple[int, ...] = (320, 640, 1280)
    down_block_types: tuple[str, ...] = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
    up_block_types: tuple[str, ...] = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    layers_per_block: tuple[int, ...] = (2, 2, 2)
    # Per down block: an int (every pair) or one depth per pair. Lists are normalised to tuples, and a
    # list whose depths are all equal to that int, so equal architectures compare equal.
    transformer_layers_per_block: tuple[Depth, ...] = (1, 2, 10)
    # Decoder depths, from the deepest block up (diffusers' reverse_transformer_layers_per_block); an
    # entry may list one depth per decoder pair (layers_per_block + 1 of them).
    reverse_transformer_layers_per_block: tuple[Depth, ...] = (10, 2, 1)
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
    # Not architecture: the latent size the model was trained at, from which diffusers' pipelines derive their
    # default image size (x the VAE factor). Kept so an exported student says what its teacher said.
    sample_size: int | tuple[int, int] | None = None

    def __post_init__(self) -> None:
        n = len(self.block_out_channels)
        if not n:
            raise UnsupportedConfigError("config field 'block_out_channels' is empty: a U-Net needs one block or more")
        for name in (
            "down_block_types",
            "up_block_types",
            "layers_per_block",
            "transformer_layers_per_block",
            "reverse_transformer_layers_per_block",
            "num_attention_heads",
            "cross_attention_dim",
        ):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)) or len(value) != n:
                raise UnsupportedConfigError(f"config field {name!r} needs {n} entries, got {value!r}")
        for name in ("transformer_layers_per_block", "reverse_transformer_layers_per_block"):
            depths = tuple(_depth_entry(name, i, d) for i, d in enumerate(getattr(self, name)))
            object.__setattr__(self, name, depths)  # Frozen: normalise once, here.
        self._check_types()
        self._check_depths()
        self._check_widths()
        for name in ("transformer_layers_per_block", "reverse_transformer_layers_per_block"):
            object.__setattr__(self, name, tuple(_uniform(d) for d in getattr(self, name)))

    def _check_types(self) -> None:
        for name in ("block_out_channels", "layers_per_block", "num_attention_heads", "cross_attention_dim"):
            if not all(_is_int(v) and v >= 1 for v in getattr(self, name)):
                raise UnsupportedConfigError(f"config field {name!r} = {list(getattr(self, name))}: ints >= 1 expected")
        for name in ("in_channels", "out_channels", "norm_num_groups"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise UnsupportedConfigError(f"config field {name!r} = {getattr(self, name)!r}: an int >= 1 expected")
        for name in ("use_linear_projection", "flip_sin_to_cos"):
            if not isinstance(getattr(self, name), bool):
                raise UnsupportedConfigError(f"config field {name!r} = {getattr(self, name)!r}: true or false expected")
        for name in ("norm_eps", "freq_shift"):
            if not isinstance(getattr(self, name), (int, float)) or isinstance(getattr(self, name), bool):
                raise UnsupportedConfigError(f"config field {name!r} = {getattr(self, name)!r}: a number expected")
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
        if self.addition_embed_type == "text_time" and not (
            _is_int(self.addition_time_embed_dim)
            and _is_int(self.projection_class_embeddings_input_dim)
            and self.addition_time_embed_dim >= 1
            and self.pooled_text_dim >= 1
        ):
            raise UnsupportedConfigError(
                "addition_embed_type 'text_time' needs 'addition_time_embed_dim' >= 1 and a "
                "'projection_class_embeddings_input_dim' above 6 x addition_time_embed_dim (the pooled text width)"
            )

    def _check_widths(self) -> None:
        for ch in self.block_out_channels:
            if ch % self.norm_num_groups:
                raise UnsupportedConfigError(
                    f"config field 'norm_num_groups': {self.norm_num_groups} groups do not divide {ch} channels"
                )
        if len(set(self.cross_attention_dim)) > 1:
            raise UnsupportedConfigError(
                f"config field 'cross_attention_dim' = {list(self.cross_attention_dim)}: one text context feeds "
                f"every block, so the widths must be equal"
            )
        n = len(self.block_out_channels)
        stages = {i for i in range(n) if self.down_depths(i)} | {n - 1 - i for i in range(n) if self.up_depths(i)}
        stages |= {n - 1} if self.mid_depths() else set()
        for i in sorted(stages):
            if self.block_out_channels[i] % self.num_attention_heads[i]:
                raise UnsupportedConfigError(
                    f"config field 'num_attention_heads': {self.num_attention_heads[i]} heads do not divide "
                    f"{self.block_out_channels[i]} channels"
                )

    def _check_depths(self) -> None:
        """Per-pair depth lists must give one depth per pair of a block with attention (diffusers would
        ignore extra entries and fail on missing ones); entries of blocks without attention are unused."""
        n = len(self.block_out_channels)
        for name, kinds, layers, cross in (
            ("transformer_layers_per_block", self.down_block_types, self.layers_per_block, "CrossAttnDownBlock2D"),
            (
                "reverse_transformer_layers_per_block",
                self.up_block_types,
                self.up_layers_per_block,
                "CrossAttnUpBlock2D",
            ),
        ):
            prefix = "down" if name.startswith("transformer") else "up"
            for i, (kind, depth) in enumerate(zip(kinds, getattr(self, name))):
                if kind == cross and isinstance(depth, tuple) and len(depth) != layers[i]:
                    raise UnsupportedConfigError(
                        f"config field {name!r}: {prefix}_blocks.{i} ({kind}) has {layers[i]} resnet/attention "
                        f"pairs, entry {i} = {list(depth)} gives {len(depth)} depths"
                    )
        last = self.transformer_layers_per_block[-1]
        if self.mid_block_type == "UNetMidBlock2DCrossAttn" and last == ():
            raise UnsupportedConfigError(
                f"config field 'transformer_layers_per_block': entry {n - 1} is empty, but the mid block takes its "
                f"depth from it"
            )

    @property
    def up_layers_per_block(self) -> tuple[int, ...]:
        """Resnet/attention pairs of each up block (deepest first): one more than its down block."""
        return tuple(n + 1 for n in self.layers_per_block[::-1])

    def down_depths(self, i: int) -> tuple[int, ...]:
        """Transformer blocks of each attention of down_blocks.i; () when the block has no attention."""
        if self.down_block_types[i] != "CrossAttnDownBlock2D":
            return ()
        return per_layer(self.transformer_layers_per_block[i], self.layers_per_block[i])

    def up_depths(self, i: int) -> tuple[int, ...]:
        """Transformer blocks of each attention of up_blocks.i; () when the block has no attention."""
        if self.up_block_types[i] != "CrossAttnUpBlock2D":
            return ()
        return per_layer(self.reverse_transformer_layers_per_block[i], self.up_layers_per_block[i])

    def mid_depths(self) -> tuple[int, ...]:
        """Transformer blocks of the mid block's attention (diffusers: the first depth of the deepest down
        block's entry); () for a mid block without attention or none."""
        if self.mid_block_type != "UNetMidBlock2DCrossAttn":
            return ()
        return per_layer(self.transformer_layers_per_block[-1], 1)[:1]

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
                _check_fixed(key, value)
            elif key not in fields and key not in ("attention_head_dim",):
                raise UnsupportedConfigError(f"unknown config field {key!r} = {value!r}")
        channels = given.get("block_out_channels", cls.block_out_channels)
        if not isinstance(channels, (list, tuple)):
            raise UnsupportedConfigError(f"config field 'block_out_channels' = {channels!r}: a list of ints expected")
        n = len(channels)
        heads = given.get("num_attention_heads") or given.get("attention_head_dim", 8)
        depth, reverse = _depth_fields(given, n)
        kwargs = {k: given[k] for k in fields & given.keys()}
        kwargs.update(
            block_out_channels=tuple(channels),
            down_block_types=_block_types("down_block_types", given.get("down_block_types", cls.down_block_types)),
            up_block_types=_block_types("up_block_types", given.get("up_block_types", cls.up_block_types)),
            mid_block_type=given.get("mid_block_type", "UNetMidBlock2DCrossAttn"),
            layers_per_block=_per_block("layers_per_block", given.get("layers_per_block", 2), n),
            transformer_layers_per_block=depth,
            reverse_transformer_layers_per_block=reverse,
            num_attention_heads=_per_block("num_attention_heads", heads, n),
            cross_attention_dim=_per_block("cross_attention_dim", given.get("cross_attention_dim", 1280), n),
            use_linear_projection=given.get("use_linear_projection", False),
            addition_embed_type=given.get("addition_embed_type"),
            addition_time_embed_dim=given.get("addition_time_embed_dim"),
            projection_class_embeddings_input_dim=given.get("projection_class_embeddings_input_dim"),
            sample_size=tuple(size) if isinstance(size := given.get("sample_size"), (list, tuple)) else size,
        )
        return cls(**kwargs)

    def to_diffusers(self) -> dict[str, Any]:
        """The diffusers config dict (`UNet2DConditionModel(**d)` builds the same architecture, and
        `from_diffusers` reads it back equal). The decoder depths are always written: diffusers needs
        them whenever an encoder entry is a list. `layers_per_block` is one int where every stage has the same
        count (diffusers' own convention: its single-file converter computes `layers_per_block + 1`)."""
        d = {k: _nested_lists(v) for k, v in dataclasses.asdict(self).items()}
        if len(set(self.layers_per_block)) == 1:
            d["layers_per_block"] = self.layers_per_block[0]
        # diffusers' SDXL checkpoints store head counts under `attention_head_dim`; write it the same way
        # so the exported config.json reads like the teacher's.
        d["attention_head_dim"] = d.pop("num_attention_heads")
        return {"_class_name": "UNet2DConditionModel", **d}


def _check_fixed(key: str, value: Any) -> None:
    default = _FIXED_FIELDS[key]
    ok = value == default or value in _EQUIVALENT.get(key, ())
    if key == "only_cross_attention" and isinstance(value, list):
        ok = all(v is False for v in value)
    if not ok:
        raise UnsupportedConfigError(f"config field {key!r} = {value!r} is not supported (only {default!r})")


def _block_types(name: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(t, str) for t in value):
        raise UnsupportedConfigError(f"config field {name!r} = {value!r}: a list of block type names expected")
    return tuple(t.removeprefix(_RES_PREFIX) for t in value)


def _depth_fields(given: dict[str, Any], n: int) -> tuple[tuple, tuple]:
    """(encoder, decoder) depth entries as diffusers reads them: an int broadcasts to every block, and the
    decoder defaults to the encoder reversed, which diffusers refuses when an encoder entry is a list."""
    depth = given.get("transformer_layers_per_block", 1)
    reverse = given.get("reverse_transformer_layers_per_block")
    if _is_int(depth):
        depth = [depth] * n
    if not isinstance(depth, (list, tuple)) or len(depth) != n:
        raise UnsupportedConfigError(
            f"config field 'transformer_layers_per_block' = {depth!r}: an int or {n} entries (one per block) expected"
        )
    if reverse is None:
        if any(isinstance(d, (list, tuple)) for d in depth):
            raise UnsupportedConfigError(
                "config field 'reverse_transformer_layers_per_block' is required when 'transformer_layers_per_block' "
                "lists per-pair depths (diffusers refuses it too)"
            )
        reverse = depth[::-1]
    if not isinstance(reverse, (list, tuple)) or len(reverse) != n:
        raise UnsupportedConfigError(
            f"config field 'reverse_transformer_layers_per_block' = {reverse!r}: {n} entries (one per block) expected"
        )
    return tuple(depth), tuple(reverse)
