"""A tiny procedural world of captioned images: coloured shapes on a 3x3 grid.

Why: distilling an SDXL-shaped U-Net is only measurable if the teacher's images can be checked
against their prompts. Real captions cannot be checked on CPU; here every image comes from a
`Scene` whose attributes (shape, colour, size, grid cell, background, relation between two
objects) a deterministic detector (`koala_jax.evaluation.detector`) reads back. A tiny teacher
trained on these images can then be scored by attribute accuracy, and so can its students.

Design choices, each so that a detector separates the classes after blur and noise:
- colours are six hues 48 to 80 degrees apart, all strongly saturated (chroma >= 180 of 255);
- backgrounds are neutral (grey, white, black), so an object is exactly the saturated pixels and
  blending an object with its background changes its chroma but not its hue;
- objects sit exactly at the 3x3 grid centres (no jitter: a tiny teacher must learn this world in
  minutes on CPU) and come in two sizes whose sides differ by 1.7x (areas by 2.9x);
- two objects never share a grid cell or a (colour, shape) pair, and their bounding boxes are at
  least `MARGIN` apart, so they never touch and a prompt's objects can be matched by colour+shape.
  Three large objects do not fit side by side, so neighbouring cells hold only two small objects,
  and a large object in the centre cell is always alone.

Captions (`caption`) come in two styles:
- "short": "a red circle", "a red circle and a blue square";
- "rich": "a large red circle in the top left corner on a grey background" and, with two objects,
  "..., to the left of a small blue square". The second object's own cell is not stated: it is
  given only through the relation, which therefore carries information the model must use.

Position phrases: corners "in the top left corner" (etc.), edge midpoints "at the top",
"at the bottom", "on the left", "on the right", and "in the centre". The relation describes object
1 relative to object 2 along the axis where their cells differ most (horizontal on a tie):
"to the left of", "to the right of", "above", "below".

Evaluation prompts (`single_object_prompts`, `rich_prompts`) pair a prompt with a `PromptSpec`:
the attributes the image must satisfy, None where the prompt does not constrain them.

Only numpy and PIL are used here (no torch, no jax), so the world renders anywhere.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import itertools
import re
from collections.abc import Iterator
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw

from koala_jax.data.records import RawRecord

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Hues (degrees): red 0, yellow ~54, green ~127, cyan 180, blue ~232, purple ~280.
COLOURS: tuple[str, ...] = ("red", "yellow", "green", "cyan", "blue", "purple")
COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (225, 35, 35),
    "yellow": (235, 215, 30),
    "green": (20, 200, 40),
    "cyan": (25, 205, 205),
    "blue": (35, 60, 230),
    "purple": (160, 40, 220),
}
BACKGROUNDS: tuple[str, ...] = ("grey", "white", "black")
BACKGROUND_RGB: dict[str, tuple[int, int, int]] = {
    "grey": (128, 128, 128),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SIZES: tuple[str, ...] = ("small", "large")
# Side of an object's bounding box as a fraction of the image side (circle: its diameter).
SIZE_FRACTION: dict[str, float] = {"small": 0.2, "large": 0.34}
COLUMNS: tuple[str, ...] = ("left", "centre", "right")
ROWS: tuple[str, ...] = ("top", "middle", "bottom")
# Grid-cell centres as fractions of the image side: a large object at an edge cell keeps 0.03.
CELL_CENTRES: tuple[float, float, float] = (0.2, 0.5, 0.8)
# Smallest gap between two objects' bounding boxes (fraction of the side). Adjacent cells are
# 0.3 apart, so only two small objects may be neighbours (gap 0.1); the margin keeps them apart
# after blur, so the detector never sees them as one component.
MARGIN = 0.08
RELATIONS: tuple[str, ...] = ("to the left of", "to the right of", "above", "below")
STYLES: tuple[str, ...] = ("short", "rich")
SUPERSAMPLE = 4

Style = Literal["short", "rich"]


@dataclasses.dataclass(frozen=True)
class ObjectSpec:
    """One object of a scene: every attribute is set."""

    shape: str
    colour: str
    size: str
    column: str
    row: str

    @property
    def cell(self) -> tuple[int, int]:
        """(column index, row index), 0..2 each, left-to-right and top-to-bottom."""
        return COLUMNS.index(self.column), ROWS.index(self.row)


@dataclasses.dataclass(frozen=True)
class Scene:
    """What one image shows: a background and one or two objects (order matters for captions)."""

    background: str
    objects: tuple[ObjectSpec, ...]


@dataclasses.dataclass(frozen=True)
class ObjectConstraint:
    """What a prompt says about one object; None marks an attribute the prompt leaves free."""

    shape: str | None = None
    colour: str | None = None
    size: str | None = None
    column: str | None = None
    row: str | None = None


@dataclasses.dataclass(frozen=True)
class PromptSpec:
    """What an image must satisfy for a prompt; None marks an unconstrained attribute.

    The number of objects is always constrained (len(objects)). `relation` (object 1 relative
    to object 2) is only set for two-object prompts that state it.
    """

    objects: tuple[ObjectConstraint, ...]
    background: str | None = None
    relation: str | None = None


@dataclasses.dataclass(frozen=True)
class Prompt:
    """An evaluation prompt and the attributes an image generated from it should show."""

    text: str
    spec: PromptSpec


# --- sampling -----------------------------------------------------------------------------------


def _bbox(obj: ObjectSpec) -> tuple[float, float, float, float]:
    """Bounding box (x0, y0, x1, y1) in fractions of the image side."""
    half = SIZE_FRACTION[obj.size] / 2
    column, row = obj.cell
    cx, cy = CELL_CENTRES[column], CELL_CENTRES[row]
    return cx - half, cy - half, cx + half, cy + half


def compatible(first: ObjectSpec, second: ObjectSpec) -> bool:
    """Whether two objects may share a scene: other cell, other (colour, shape), boxes apart."""
    if first.cell == second.cell or (first.colour, first.shape) == (second.colour, second.shape):
        return False
    a, b = _bbox(first), _bbox(second)
    gap = max(b[0] - a[2], a[0] - b[2], b[1] - a[3], a[1] - b[3])
    return gap >= MARGIN - 1e-9


def _all_objects() -> list[ObjectSpec]:
    return [
        ObjectSpec(shape, colour, size, column, row)
        for shape, colour, size, row, column in itertools.product(SHAPES, COLOURS, SIZES, ROWS, COLUMNS)
    ]


_OBJECTS = _all_objects()


@functools.cache
def _partners() -> tuple[tuple[int, ...], ...]:
    """For each object (index into _OBJECTS), the indices of the objects it may share a scene with."""
    return tuple(tuple(j for j, other in enumerate(_OBJECTS) if compatible(obj, other)) for obj in _OBJECTS)


@functools.cache
def _firsts() -> tuple[int, ...]:
    """The objects (indices into _OBJECTS) that can be the first of two."""
    return tuple(i for i, options in enumerate(_partners()) if options)


def sample_scene(rng: np.random.Generator, max_objects: int = 2, p_two: float = 0.5) -> Scene:
    """A random scene: a uniform background and one object, or (with probability p_two) two.

    The first object is uniform over all objects, or over those that have a partner when there are
    two (a large object in the centre cell is adjacent to every other cell, so it is always alone);
    the second is uniform over the partners of the first. Choosing from enumerated candidates
    instead of rejection sampling draws a fixed count of random numbers per scene.
    """
    if max_objects not in (1, 2):
        raise ValueError(f"max_objects must be 1 or 2, got {max_objects}")
    background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    two = max_objects == 2 and rng.random() < p_two
    if not two:
        return Scene(background, (_OBJECTS[rng.integers(len(_OBJECTS))],))
    firsts, partners = _firsts(), _partners()
    first = firsts[rng.integers(len(firsts))]
    second = partners[first][rng.integers(len(partners[first]))]
    return Scene(background, (_OBJECTS[first], _OBJECTS[second]))


def scene_at(seed: int, index: int, max_objects: int = 2, p_two: float = 0.5) -> Scene:
    """Scene `index` of world `seed`: its own generator per index, so it does not depend on n."""
    return sample_scene(np.random.default_rng([seed, index]), max_objects, p_two)


@dataclasses.dataclass(frozen=True)
class World:
    """A deterministic, endless sequence of scenes: `World(seed).scene(i)` never changes."""

    seed: int
    max_objects: int = 2
    p_two: float = 0.5

    def scene(self, index: int) -> Scene:
        return scene_at(self.seed, index, self.max_objects, self.p_two)

    def scenes(self, n: int, start: int = 0) -> Iterator[Scene]:
        return (self.scene(i) for i in range(start, start + n))


def scenes(n: int, seed: int, max_objects: int = 2, p_two: float = 0.5) -> list[Scene]:
    """The first n scenes of World(seed); scene i is the same for every n."""
    return list(World(seed, max_objects, p_two).scenes(n))


# --- rendering ----------------------------------------------------------------------------------


def _draw_object(draw: ImageDraw.ImageDraw, obj: ObjectSpec, side: int) -> None:
    """Draw on a `side`-pixel canvas. PIL fills shapes up to and including their end coordinates,
    so the box is snapped to whole pixels and drawn to x1 - 1: the object then covers exactly
    [x0, x1) and its rendered area and centre match the geometry the detector fits."""
    x0, y0, x1, y1 = (round(v * side) for v in _bbox(obj))
    x1, y1 = x1 - 1, y1 - 1
    colour = COLOUR_RGB[obj.colour]
    if obj.shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=colour)
    elif obj.shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=colour)
    elif obj.shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=colour)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}")


def render(scene: Scene, size: int = 64) -> np.ndarray:
    """The scene as a uint8 (size, size, 3) image.

    Drawn at SUPERSAMPLE x the resolution and box-filtered down, so edge pixels are the exact
    coverage-weighted mix of object and background (smooth edges, and a detector can recover
    sub-pixel area from chroma).
    """
    big = size * SUPERSAMPLE
    image = Image.new("RGB", (big, big), BACKGROUND_RGB[scene.background])
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        _draw_object(draw, obj, big)
    return np.asarray(image.resize((size, size), Image.Resampling.BOX), dtype=np.uint8)


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of a uint8 HxWx3 image (lossless, so records decode to the rendered pixels)."""
    buffer = io.BytesIO()
    Image.fromarray(image, "RGB").save(buffer, format="PNG")
    return buffer.getvalue()


# --- language -----------------------------------------------------------------------------------

_POSITION_PHRASES: dict[tuple[str, str], str] = {
    ("left", "top"): "in the top left corner",
    ("centre", "top"): "at the top",
    ("right", "top"): "in the top right corner",
    ("left", "middle"): "on the left",
    ("centre", "middle"): "in the centre",
    ("right", "middle"): "on the right",
    ("left", "bottom"): "in the bottom left corner",
    ("centre", "bottom"): "at the bottom",
    ("right", "bottom"): "in the bottom right corner",
}
_PUNCTUATION = (",",)
_WORD = re.compile(r"[a-z]+|[^\sa-z]")


def position_phrase(column: str, row: str) -> str:
    """How a caption states a grid cell, e.g. ("left", "top") -> "in the top left corner"."""
    return _POSITION_PHRASES[(column, row)]


def relation(first: ObjectSpec, second: ObjectSpec) -> str:
    """Where `first` is relative to `second`, along the axis on which their cells differ most
    (horizontal on a tie): one of RELATIONS."""
    (c1, r1), (c2, r2) = first.cell, second.cell
    if abs(c1 - c2) >= abs(r1 - r2):
        return "to the left of" if c1 < c2 else "to the right of"
    return "above" if r1 < r2 else "below"


def _noun_phrase(colour: str, shape: str, size: str | None = None) -> str:
    return " ".join(w for w in ("a", size, colour, shape) if w)


def caption(scene: Scene, style: Style = "rich") -> str:
    """The scene in words; see the module docstring for both styles."""
    objects = scene.objects
    if style == "short":
        return " and ".join(_noun_phrase(o.colour, o.shape) for o in objects)
    if style != "rich":
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    first = objects[0]
    text = (
        f"{_noun_phrase(first.colour, first.shape, first.size)} {position_phrase(first.column, first.row)}"
        f" on a {scene.background} background"
    )
    if len(objects) == 2:
        second = objects[1]
        text += f", {relation(first, second)} {_noun_phrase(second.colour, second.shape, second.size)}"
    return text


def words(text: str) -> list[str]:
    """A caption split into words and punctuation marks, the units `vocabulary` lists."""
    return _WORD.findall(text.lower())


def vocabulary() -> list[str]:
    """Every word (and punctuation mark) any caption can contain, sorted: a tokenizer's vocabulary."""
    fixed = {"a", "and", "on", "background"}
    phrases = [*_POSITION_PHRASES.values(), *RELATIONS]
    found = fixed | {w for phrase in phrases for w in words(phrase)}
    found |= {*SHAPES, *COLOURS, *BACKGROUNDS, *SIZES, *_PUNCTUATION}
    return sorted(found)


# --- evaluation prompts -------------------------------------------------------------------------


def prompt_spec(scene: Scene, style: Style = "rich") -> PromptSpec:
    """The attributes `caption(scene, style)` states: what an image generated from it must show."""
    if style == "short":
        return PromptSpec(tuple(ObjectConstraint(shape=o.shape, colour=o.colour) for o in scene.objects))
    first = scene.objects[0]
    constraints = [ObjectConstraint(first.shape, first.colour, first.size, first.column, first.row)]
    rel = None
    if len(scene.objects) == 2:
        second = scene.objects[1]
        constraints.append(ObjectConstraint(second.shape, second.colour, second.size))
        rel = relation(first, second)
    return PromptSpec(tuple(constraints), background=scene.background, relation=rel)


def scene_spec(scene: Scene) -> PromptSpec:
    """Every attribute of the scene constrained (both objects' cells included): what a detector
    must read from the scene's own render."""
    objects = tuple(ObjectConstraint(o.shape, o.colour, o.size, o.column, o.row) for o in scene.objects)
    rel = relation(*scene.objects) if len(scene.objects) == 2 else None
    return PromptSpec(objects, background=scene.background, relation=rel)


def scene_prompt(scene: Scene, style: Style = "rich") -> Prompt:
    """The caption of a scene together with the spec an image generated from it must satisfy."""
    return Prompt(caption(scene, style), prompt_spec(scene, style))


def single_object_prompts() -> list[Prompt]:
    """ "a <colour> <shape>" for every colour and shape: constrains one object's colour and shape."""
    return [
        Prompt(f"a {colour} {shape}", PromptSpec((ObjectConstraint(shape=shape, colour=colour),)))
        for colour in COLOURS
        for shape in SHAPES
    ]


def rich_prompts(n: int, seed: int = 0) -> list[Prompt]:
    """n rich prompts, alternating one object (size, position, background) and two objects (plus a
    relation), so both kinds are equally represented. Prompt i is the same for every n."""
    prompts = []
    for i in range(n):
        rng = np.random.default_rng([seed, i, 1])  # a stream apart from World(seed)'s training scenes
        scene = sample_scene(rng, max_objects=1 + i % 2, p_two=1.0)
        prompts.append(scene_prompt(scene, "rich"))
    return prompts


# --- a Collection for data preparation ----------------------------------------------------------


# Caption styles of a collection: every record short, every record rich, or each record either (decided by its
# index and seed): a model trained on 'mixed' follows both "a red circle" and the rich descriptions.
CAPTION_MIXES: tuple[str, ...] = (*STYLES, "mixed")


class WorldCollection:
    """`num_records` rendered scenes of World(seed) as a `koala_jax.data.ingest.Collection`, so the
    ordinary preparation pipeline (encode once, shard, load with grain) can consume the tiny world."""

    def __init__(self, num_records: int, seed: int = 0, style: str = "rich", resolution: int = 64):
        if style not in CAPTION_MIXES:
            raise ValueError(f"style must be one of {CAPTION_MIXES}, got {style!r}")
        self.num_records = num_records
        self.world = World(seed)
        self.style = style
        self.resolution = resolution
        self.description = f"world:seed={seed},n={num_records},style={style},res={resolution}"
        self.skipped_shards: list[str] = []

    def __len__(self) -> int:
        return self.num_records

    def scene(self, index: int) -> Scene:
        if not 0 <= index < self.num_records:
            raise IndexError(f"record {index} outside [0, {self.num_records})")
        return self.world.scene(index)

    def caption_style(self, index: int) -> Style:
        if self.style != "mixed":
            return self.style
        return STYLES[int(np.random.default_rng([self.world.seed, index, 1]).integers(len(STYLES)))]

    def load(self, index: int) -> RawRecord:
        scene = self.scene(index)
        image = encode_png(render(scene, self.resolution))
        return RawRecord(f"world:seed={self.world.seed}:{index}", image, caption(scene, self.caption_style(index)))
