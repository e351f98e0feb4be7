"""What an evaluation writes: a table (markdown, for people), JSON (for scripts), and an image grid where
the models stand side by side: one row per prompt, a group of columns per model, one column per seed within it,
so a model's seeds and the models' same seed can be compared at a glance; `Report` holds all three for world
prompt sets and prompt files alike. Each file is written whole or not at all (a full disk is one error naming
the path, the bytes needed and free)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from koala_jax.files import write_json, write_text
from koala_jax.pipelines.sampling import save_png

# The grid stays under MAX_GRID_HEIGHT pixels where it can: its images shrink to fit, within CELL_RANGE.
MAX_GRID_HEIGHT = 2000
CELL_RANGE = (64, 256)
FONT_SIZE = 14
LINE = FONT_SIZE + 4
LABEL_WIDTH = 200  # the prompts' column
GAP = 12  # between the models' groups of columns
HEADER = 2 * LINE + 8  # the model's name, then each column's seed


def markdown_table(rows: Sequence[Mapping[str, object]], columns: Sequence[str]) -> str:
    """A markdown table of `rows` (dicts) in `columns`; floats with 3 decimals, missing cells '-'."""

    def cell(value: object) -> str:
        if isinstance(value, float):
            return "-" if math.isnan(value) else f"{value:.3f}"
        return "-" if value is None else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def grid_cell(rows: int) -> int:
    """The side of each image in a grid of `rows` prompts: as large as keeps it under MAX_GRID_HEIGHT, within
    CELL_RANGE."""
    low, high = CELL_RANGE
    return max(low, min(high, (MAX_GRID_HEIGHT - HEADER) // max(rows, 1)))


def wrap(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont, width: int, lines: int) -> str:
    """`text` wrapped at words into at most `lines` lines of `width` pixels (cut with an ellipsis)."""
    wrapped = [""]
    for word in text.split():
        candidate = f"{wrapped[-1]} {word}".strip()
        if wrapped[-1] and draw.textlength(candidate, font=font) > width:
            wrapped.append(word)
        else:
            wrapped[-1] = candidate
    if len(wrapped) > lines:
        wrapped = wrapped[:lines]
        wrapped[-1] += " ..."
    return "\n".join(wrapped)


def side_by_side(
    images: Mapping[str, Sequence[np.ndarray]], prompts: Sequence[str], seeds: Sequence[int], cell: int | None = None
) -> Image.Image:
    """Prompts in rows (wrapped on the left), models in groups of columns (named on top), one column per seed
    within each group (numbered under the name). Each model has one image per (prompt, seed), prompt-major as
    the evaluations draw them. Images are scaled to `cell` pixels (default: `grid_cell`), nearest-neighbour when
    enlarged (the pixels a detector judged) and Lanczos when reduced."""
    cell = cell or grid_cell(len(prompts))
    group = cell * len(seeds)
    width = LABEL_WIDTH + len(images) * (group + GAP) - GAP
    grid = Image.new("RGB", (width, HEADER + cell * len(prompts)), "white")
    draw, font = ImageDraw.Draw(grid), ImageFont.load_default(size=FONT_SIZE)
    for m, (name, model_images) in enumerate(images.items()):
        left = LABEL_WIDTH + m * (group + GAP)
        draw.text((left + group // 2, 2), wrap(draw, name, font, group, 1), fill="black", font=font, anchor="ma")
        for s, seed in enumerate(seeds):
            seed_label = f"seed {seed}" if draw.textlength(f"seed {seed}", font=font) < cell else str(seed)
            draw.text((left + s * cell + cell // 2, LINE + 4), seed_label, fill="dimgray", font=font, anchor="ma")
        for i, image in enumerate(model_images):
            tile = Image.fromarray(np.asarray(image, np.uint8))
            enlarge = tile.width < cell
            tile = tile.resize((cell, cell), Image.Resampling.NEAREST if enlarge else Image.Resampling.LANCZOS)
            row, column = divmod(i, len(seeds))
            grid.paste(tile, (left + column * cell, HEADER + row * cell))
    for row, prompt in enumerate(prompts):
        label = wrap(draw, prompt, font, LABEL_WIDTH - 8, max(1, cell // LINE))
        draw.multiline_text((4, HEADER + row * cell + 2), label, fill="black", font=font, spacing=4)
    return grid


@dataclasses.dataclass
class Report:
    """One evaluation: one table row and one report.json entry per model ({"accuracy": ..., "agreement": ...,
    "metrics": ...}), the (prompt, seed) items (every prompt with each of `seeds`, prompt by prompt), and each
    model's images (one per item) for the grid."""

    reference: str | None
    items: list[dict[str, object]]
    images: dict[str, list[np.ndarray]]
    models: dict[str, dict[str, object]]
    columns: tuple[str, ...]
    seeds: list[int]

    def prompts(self) -> list[str]:
        """The grid's rows: one per prompt."""
        return [str(item["prompt"]) for item in self.items[:: len(self.seeds)]]

    def rows(self) -> list[dict[str, object]]:
        return [
            {"model": m, **entry.get("accuracy", {}), **entry.get("agreement", {}), **entry.get("metrics", {})}
            for m, entry in self.models.items()
        ]

    def add_metrics(self, scores: Mapping[str, Mapping[str, dict]], names: Sequence[str]) -> None:
        """Real-model metrics: their keys in each model's report.json entry, their columns in the table."""
        for model, entry in scores.items():
            self.models[model].update(entry)
        self.columns = (*self.columns, *names)

    def write(self, out: Path, settings: Mapping[str, object]) -> None:
        """report.json (settings, metrics per model, items), report.md (the table), grid.png (models side by side)."""
        out.mkdir(parents=True, exist_ok=True)
        data = {"settings": dict(settings), "reference": self.reference, "items": self.items, "models": self.models}
        write_json(out / "report.json", data)
        write_text(out / "report.md", markdown_table(self.rows(), self.columns) + "\n")
        save_png(side_by_side(self.images, self.prompts(), self.seeds), out / "grid.png")
