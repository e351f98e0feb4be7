"""What an evaluation writes: a table (markdown, for people), JSON (for scripts), and an image grid where
the models stand side by side, one column per model, one row per (prompt, seed); `Report` holds all three for
world prompt sets and prompt files alike."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def markdown_table(rows: Sequence[Mapping[str, object]], columns: Sequence[str]) -> str:
    """A markdown table of `rows` (dicts) in `columns`; floats with 3 decimals, missing cells '-'."""

    def cell(value: object) -> str:
        if isinstance(value, float):
            return "-" if math.isnan(value) else f"{value:.3f}"
        return "-" if value is None else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def side_by_side(images: Mapping[str, Sequence[np.ndarray]], labels: Sequence[str], cell: int = 128) -> Image.Image:
    """One row per item (its label on the left), one column per model (its name on top), images upscaled
    to `cell` pixels (nearest: the pixels a detector judged)."""
    names = list(images)
    label_width, header = 8 * max((len(label) for label in labels), default=0) // 2 + 8, 16
    grid = Image.new("RGB", (label_width + cell * len(names), header + cell * len(labels)), "white")
    draw = ImageDraw.Draw(grid)
    for c, name in enumerate(names):
        draw.text((label_width + c * cell + 4, 2), name, fill="black")
        for r, image in enumerate(images[name]):
            tile = Image.fromarray(np.asarray(image, np.uint8)).resize((cell, cell), Image.Resampling.NEAREST)
            grid.paste(tile, (label_width + c * cell, header + r * cell))
    for r, label in enumerate(labels):
        words, lines = label.split(), [""]
        for word in words:  # Wrap the label into the margin.
            if len(lines[-1]) + len(word) + 1 > label_width // 6:
                lines.append("")
            lines[-1] = f"{lines[-1]} {word}".strip()
        draw.multiline_text((4, header + r * cell + 4), "\n".join(lines[: cell // 12]), fill="black")
    return grid


def write_json(path: str | os.PathLike, data: object) -> None:
    """Write `data` as JSON under a temporary name, then rename (never half a file)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=float) + "\n")
    tmp.replace(path)


@dataclasses.dataclass
class Report:
    """One evaluation: one table row and one report.json entry per model ({"accuracy": ..., "agreement": ...,
    "metrics": ...}), the (prompt, seed) items, and each model's images (one per item) for the grid."""

    reference: str | None
    items: list[dict[str, object]]
    images: dict[str, list[np.ndarray]]
    models: dict[str, dict[str, object]]
    columns: tuple[str, ...]

    def labels(self) -> list[str]:
        return [f"{item['prompt']} (seed {item['seed']})" for item in self.items]

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
        (out / "report.md").write_text(markdown_table(self.rows(), self.columns) + "\n")
        side_by_side(self.images, self.labels()).save(out / "grid.png")
