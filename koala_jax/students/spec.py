"""Custom students: a spec that says, per stage, how many resnet/attention pairs and which transformer
blocks of the teacher a student keeps (the KOALA presets are specs too, see `presets.koala_spec`).

    {"name": "ssd-1b-like",
     "down": [{"layers": 2}, {"layers": 2, "depth": 2}, {"layers": 2, "depth": [4, 4]}],
     "mid": "resnet",
     "up": [{"depth": [4, 4, 10]}, {"depth": [2, 1, 1]}, {}]}

`down[i].layers`: pairs kept in down_blocks.i (1 to the teacher's). The up blocks' pair counts follow
(diffusers builds layers + 1 per decoder block; an up entry may repeat that number as `layers`).
`depth`: an int (every kept pair keeps the first N transformer blocks of its teacher attention), one
entry per kept pair (an int N, or a list of teacher block indices kept in that order), or omitted (the
teacher's blocks, all of them). `mid`: "keep" (the teacher's mid block; an attention mid block keeps as
many blocks as the deepest down block's first pair, as diffusers ties them), "resnet" (its first resnet
alone: UNetMidBlock2D, as SSD-1B and Segmind-Vega) or "none" (KOALA-700M).

Which teacher pair a kept pair comes from is BK-SDM's rule (`encoder_source`, `decoder_source`); which
transformer blocks: the first N unless the spec lists indices. `resolve` turns a spec into the student's
`UNetConfig` and the listed indices (`Selection`), refusing anything the teacher cannot provide.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from koala_jax.errors import ConfigError
from koala_jax.models.config import Depth, UNetConfig, UnsupportedConfigError

MID_CHOICES = ("keep", "resnet", "none")
# Student attention module ('down_blocks.1.attentions.0') -> the teacher transformer blocks it keeps, in
# order; attentions that keep the teacher's first N blocks are not listed.
Selection = dict[str, tuple[int, ...]]
# One kept pair's depth: the first N teacher blocks, or the listed teacher block indices.
PairDepth = int | tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class StageSpec:
    """One stage of a spec. `layers` None (up stages): follows the down stage. `depth` None: the
    teacher's; an int: for every pair; a tuple: one `PairDepth` per kept pair."""

    layers: int | None = None
    depth: int | tuple[PairDepth, ...] | None = None


@dataclasses.dataclass(frozen=True)
class StudentSpec:
    down: tuple[StageSpec, ...]
    up: tuple[StageSpec, ...]
    mid: str = "keep"
    name: str = "custom"


def encoder_source(pair: int) -> int:
    """The teacher pair of a down block that student pair `pair` comes from: the same (the first ones)."""
    return pair


def decoder_source(pair: int, student_pairs: int, teacher_pairs: int) -> int:
    """The teacher pair of an up block that student pair `pair` comes from: the first ones, and the last
    for the last, whose skip input has the previous stage's width (its weights only fit there)."""
    return teacher_pairs - 1 if pair == student_pairs - 1 else pair


def load_spec(text: str) -> StudentSpec:
    """A spec from a .json file path or inline JSON text (`{...}`)."""
    if text.lstrip().startswith("{"):
        where, raw = "inline student spec", text
    else:
        path = Path(text)
        if not path.is_file():
            raise ConfigError(f"student spec {text}: no such file (give a .json file, inline JSON or a preset name)")
        where, raw = str(path), path.read_text()
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{where}: not JSON ({e})") from e
    return parse_spec(data, where)


def parse_spec(data: Any, where: str) -> StudentSpec:
    """Check the shape of a spec's JSON (keys, types); whether the teacher can provide it is `resolve`'s."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: a student spec is a JSON object with 'down', 'up' and 'mid'")
    unknown = sorted(set(data) - {"name", "down", "up", "mid"})
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; a spec has 'name', 'down', 'up' and 'mid'")
    for key in ("down", "up"):
        if not isinstance(data.get(key), list):
            raise ConfigError(f"{where}: '{key}' must be a list with one entry per stage")
    mid = data.get("mid", "keep")
    if mid not in MID_CHOICES:
        raise ConfigError(f"{where}: 'mid' = {mid!r}; choose from {', '.join(MID_CHOICES)}")
    return StudentSpec(
        down=tuple(_stage(s, f"{where}: down[{i}]", up=False) for i, s in enumerate(data["down"])),
        up=tuple(_stage(s, f"{where}: up[{i}]", up=True) for i, s in enumerate(data["up"])),
        mid=mid,
        name=str(data.get("name", "custom")),
    )


def _stage(data: Any, where: str, up: bool) -> StageSpec:
    if not isinstance(data, dict) or set(data) - {"layers", "depth"}:
        raise ConfigError(f"{where} must be an object with 'layers' and/or 'depth', got {data!r}")
    layers = data.get("layers")
    if (layers is None and not up) or (layers is not None and not _count(layers, 1)):
        raise ConfigError(f"{where}: 'layers' must be an int >= 1, got {layers!r}")
    depth = data.get("depth")
    if depth is None or _count(depth, 0):
        return StageSpec(layers, depth)
    if not isinstance(depth, list) or not all(_count(d, 0) or _indices(d) for d in depth):
        raise ConfigError(
            f"{where}: 'depth' must be an int, or one entry per pair (an int, or a list of teacher block "
            f"indices), got {depth!r}"
        )
    return StageSpec(layers, tuple(d if isinstance(d, int) else tuple(d) for d in depth))


def _count(value: Any, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _indices(value: Any) -> bool:
    return isinstance(value, list) and all(_count(v, 0) for v in value)


def resolve(spec: StudentSpec, teacher: UNetConfig, where: str = "student spec") -> tuple[UNetConfig, Selection]:
    """The student's architecture and transformer-block selection, or a one-line error saying what the
    teacher cannot provide. Widths, heads and conditioning are the teacher's."""
    n = len(teacher.block_out_channels)
    if len(spec.down) != n or len(spec.up) != n:
        raise ConfigError(
            f"{where}: {len(spec.down)} down and {len(spec.up)} up stages given, the teacher has {n} of each"
        )
    selection: Selection = {}
    layers = []
    encoder: list[Depth] = []
    for i, stage in enumerate(spec.down):
        if not 1 <= stage.layers <= teacher.layers_per_block[i]:
            raise ConfigError(
                f"{where}: down[{i}] keeps {stage.layers} pairs, the teacher's down_blocks.{i} has "
                f"{teacher.layers_per_block[i]} (keep 1 to {teacher.layers_per_block[i]})"
            )
        layers.append(stage.layers)
        sources = [encoder_source(j) for j in range(stage.layers)]
        encoder.append(
            _depths(
                stage,
                teacher.down_depths(i),
                sources,
                f"down_blocks.{i}",
                teacher.transformer_layers_per_block[i],
                selection,
                f"{where}: down[{i}]",
            )
        )
    decoder: list[Depth] = []
    for i, stage in enumerate(spec.up):
        pairs, teacher_pairs = layers[n - 1 - i] + 1, teacher.up_layers_per_block[i]
        if stage.layers is not None and stage.layers != pairs:
            raise ConfigError(
                f"{where}: up[{i}] gives {stage.layers} pairs, but diffusers builds one more than down[{n - 1 - i}] "
                f"keeps: {pairs}"
            )
        sources = [decoder_source(j, pairs, teacher_pairs) for j in range(pairs)]
        decoder.append(
            _depths(
                stage,
                teacher.up_depths(i),
                sources,
                f"up_blocks.{i}",
                teacher.reverse_transformer_layers_per_block[i],
                selection,
                f"{where}: up[{i}]",
            )
        )
    mid = _mid_type(spec.mid, teacher, where)
    try:
        config = dataclasses.replace(
            teacher,
            layers_per_block=tuple(layers),
            transformer_layers_per_block=tuple(encoder),
            reverse_transformer_layers_per_block=tuple(decoder),
            mid_block_type=mid,
        )
    except UnsupportedConfigError as e:
        raise ConfigError(f"{where}: {e}") from e
    if config.mid_depths() and config.mid_depths()[0] > teacher.mid_depths()[0]:
        raise ConfigError(
            f"{where}: the mid block would keep {config.mid_depths()[0]} transformer blocks (diffusers ties it to "
            f"down[{n - 1}]'s first depth), the teacher's mid block has {teacher.mid_depths()[0]}"
        )
    return config, selection


def _depths(
    stage: StageSpec,
    teacher_depths: tuple[int, ...],
    sources: list[int],
    block: str,
    teacher_entry: Depth,
    selection: Selection,
    where: str,
) -> Depth:
    """The student block's depth entry; listed teacher block indices go into `selection`. A block without
    attention keeps the teacher's entry (unused, but diffusers reads the mid block's depth from the last)."""
    if not teacher_depths:
        if stage.depth is not None:
            raise ConfigError(f"{where}: the teacher's {block} has no attention, so 'depth' cannot be given")
        return teacher_entry
    available = [teacher_depths[s] for s in sources]
    if stage.depth is None:
        return tuple(available)
    wanted = (stage.depth,) * len(sources) if isinstance(stage.depth, int) else stage.depth
    if len(wanted) != len(sources):
        raise ConfigError(f"{where}: 'depth' lists {len(wanted)} entries for {len(sources)} kept pairs")
    depths = []
    for pair, (want, source, have) in enumerate(zip(wanted, sources, available)):
        teacher_attention = f"{block}.attentions.{source}"
        if isinstance(want, int):
            if want > have:
                raise ConfigError(
                    f"{where}: pair {pair} keeps {want} transformer blocks, the teacher's {teacher_attention} "
                    f"has {have}"
                )
            depths.append(want)
            continue
        if len(set(want)) != len(want) or any(b >= have for b in want):
            raise ConfigError(
                f"{where}: pair {pair} lists teacher blocks {list(want)}; {teacher_attention} has blocks 0 to "
                f"{have - 1}, each usable once"
            )
        if want != tuple(range(len(want))):
            selection[f"{block}.attentions.{pair}"] = want
        depths.append(len(want))
    return tuple(depths)


def _mid_type(mid: str, teacher: UNetConfig, where: str) -> str | None:
    if mid == "none":
        return None
    if teacher.mid_block_type is None:
        raise ConfigError(f"{where}: 'mid' = {mid!r}, but the teacher has no mid block (use 'none')")
    return teacher.mid_block_type if mid == "keep" else "UNetMidBlock2D"
