"""Read image-caption pairs from the forms users arrive with, and decide what to keep.

Four input forms share one interface, `Collection` (random access to `RawRecord`s):
a folder of images with same-name .txt/.json captions, a CSV/Parquet table, webdataset
.tar shards, and a tfds dataset. Random access (rather than a stream) is what makes
preparation resumable shard by shard and parallel across tasks.

Every record that is not kept raises a `SkipRecord` naming the reason and the place;
`IngestReport` counts them, so nothing is dropped silently. No torch here.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import tarfile
import urllib.parse
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from koala_jax.data import images
from koala_jax.data.records import Collection, RawRecord
from koala_jax.data.world import CAPTION_MIXES, WorldCollection
from koala_jax.errors import DataError, MissingPathError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
CAPTION_SUFFIXES = (".txt", ".json")
TABLE_SUFFIXES = (".csv", ".tsv", ".parquet")
_EXAMPLES_PER_REASON = 5


class SkipRecord(Exception):
    """A record left out of the dataset; `kind` is "filtered" or "unreadable"."""

    kind = ""

    def __init__(self, reason: str, where: str, detail: str = ""):
        super().__init__(f"{self.kind} ({reason}): {where}" + (f": {detail}" if detail else ""))
        self.reason = reason
        self.where = where


class Unreadable(SkipRecord):
    """The record is broken: corrupt image, missing file, empty or malformed caption."""

    kind = "unreadable"


class Filtered(SkipRecord):
    """The record is fine but fails a user filter (resolution, aspect, caption length)."""

    kind = "filtered"


@dataclasses.dataclass(frozen=True)
class Filters:
    """What users filter on; the defaults keep everything readable.

    Aspect is width / height. Caption length counts whitespace-separated words,
    since rich captions (KOALA's LAION-POP lesson) are long in words, not tokens.
    """

    min_side: int = 0
    min_aspect: float = 0.0
    max_aspect: float = math.inf
    min_caption_words: int = 0

    def check(self, width: int, height: int, caption: str, where: str) -> None:
        """Raise `Filtered` with the first failing filter's reason."""
        if min(width, height) < self.min_side:
            raise Filtered("too_small", where, f"{width}x{height} < min side {self.min_side}")
        aspect = width / height
        if not self.min_aspect <= aspect <= self.max_aspect:
            raise Filtered(
                "aspect_ratio",
                where,
                f"{aspect:.3f} outside [{self.min_aspect}, {self.max_aspect}]",
            )
        if len(caption.split()) < self.min_caption_words:
            raise Filtered("short_caption", where, f"fewer than {self.min_caption_words} words")


@dataclasses.dataclass
class IngestReport:
    """How many records were kept, filtered and unreadable, and why, with a few examples."""

    kept: int = 0
    filtered: Counter = dataclasses.field(default_factory=Counter)
    unreadable: Counter = dataclasses.field(default_factory=Counter)
    examples: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    skipped_shards: list[str] = dataclasses.field(default_factory=list)

    @property
    def total(self) -> int:
        return self.kept + sum(self.filtered.values()) + sum(self.unreadable.values())

    def count_skip(self, skip: SkipRecord) -> None:
        counter = self.filtered if isinstance(skip, Filtered) else self.unreadable
        counter[skip.reason] += 1
        examples = self.examples.setdefault(skip.reason, [])
        if len(examples) < _EXAMPLES_PER_REASON:
            examples.append(str(skip))

    def merge(self, other: IngestReport) -> None:
        self.kept += other.kept
        self.filtered.update(other.filtered)
        self.unreadable.update(other.unreadable)
        for reason, examples in other.examples.items():
            mine = self.examples.setdefault(reason, [])
            mine.extend(examples[: _EXAMPLES_PER_REASON - len(mine)])
        self.skipped_shards.extend(other.skipped_shards)

    def to_dict(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "kept": self.kept,
            "filtered": dict(self.filtered),
            "unreadable": dict(self.unreadable),
            "examples": self.examples,
            "skipped_shards": self.skipped_shards,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IngestReport:
        return cls(
            kept=data["kept"],
            filtered=Counter(data["filtered"]),
            unreadable=Counter(data["unreadable"]),
            examples=data["examples"],
            skipped_shards=data["skipped_shards"],
        )

    def summary(self) -> str:
        def reasons(counter: Counter) -> str:
            return ", ".join(f"{r}: {n}" for r, n in sorted(counter.items())) or "none"

        lines = [
            f"{self.total} records: {self.kept} kept, "
            f"{sum(self.filtered.values())} filtered, {sum(self.unreadable.values())} unreadable",
            f"  filtered: {reasons(self.filtered)}",
            f"  unreadable: {reasons(self.unreadable)}",
        ]
        if self.skipped_shards:
            lines.append(f"  input shards skipped whole: {', '.join(self.skipped_shards)}")
        return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class Example:
    """A kept record, ready for the encoders, with SDXL's micro-conditioning."""

    where: str
    pixels: np.ndarray  # float32 [3, S, S] in [-1, 1]
    caption: str
    original_size: tuple[int, int]  # (height, width) before resizing
    crop_top_left: tuple[int, int]  # (top, left) in the resized image


def load_example(collection: Collection, index: int, filters: Filters, resolution: int) -> Example:
    """Read, decode, filter and crop record `index`; raises `SkipRecord` to leave it out."""
    record = collection.load(index)
    caption = record.caption.strip()
    if not caption:
        raise Unreadable("empty_caption", record.where)
    try:
        image = images.decode_rgb(record.image)
    except images.DECODE_ERRORS as error:
        raise Unreadable("corrupt_image", record.where, str(error)) from error
    filters.check(image.width, image.height, caption, record.where)
    pixels, crop_top_left = images.resize_center_crop(image, resolution)
    return Example(record.where, pixels, caption, (image.height, image.width), crop_top_left)


def _read_file(path: str, missing_reason: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError as error:
        raise Unreadable(missing_reason, path) from error
    except OSError as error:
        raise Unreadable("unreadable_file", path, str(error)) from error


def parse_caption(data: bytes, suffix: str, caption_key: str, where: str) -> str:
    """A caption from a .txt file's text or a .json file's `caption_key` field."""
    try:
        text = data.decode("utf-8")
        if suffix == ".txt":
            return text
        caption = json.loads(text)[caption_key]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise Unreadable("bad_caption", where, repr(error)) from error
    if not isinstance(caption, str):
        raise Unreadable("bad_caption", where, f"{caption_key!r} is not a string")
    return caption


class FolderCollection:
    """Images anywhere under `root`, each captioned by a same-name .txt or .json file."""

    def __init__(self, root: str, caption_key: str = "caption"):
        self._caption_key = caption_key
        self._images = sorted(
            os.path.join(folder, name)
            for folder, _, names in os.walk(root)
            for name in names
            if name.lower().endswith(IMAGE_SUFFIXES)
        )
        if not self._images:
            raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {root}")
        self.description = f"folder:{os.path.abspath(root)}"
        self.skipped_shards: list[str] = []

    def __len__(self) -> int:
        return len(self._images)

    def _caption(self, image_path: str) -> str:
        stem = os.path.splitext(image_path)[0]
        for suffix in CAPTION_SUFFIXES:
            if os.path.exists(stem + suffix):
                data = _read_file(stem + suffix, "missing_caption")
                return parse_caption(data, suffix, self._caption_key, stem + suffix)
        raise Unreadable("missing_caption", image_path, f"no {' or '.join(CAPTION_SUFFIXES)} beside it")

    def load(self, index: int) -> RawRecord:
        path = self._images[index]
        caption = self._caption(path)
        return RawRecord(path, _read_file(path, "missing_image"), caption)


def _read_table(path: str) -> Any:
    import pandas as pd  # only this input form needs pandas

    if not os.path.isfile(path):
        raise MissingPathError(f"{path}: no such table file")
    try:
        if path.endswith(".parquet"):
            table = pd.read_parquet(path)
        else:
            table = pd.read_csv(path, sep="\t" if path.endswith(".tsv") else ",")
    except (ValueError, OSError) as e:  # pandas' ParserError / EmptyDataError, pyarrow's ArrowInvalid
        raise DataError(f"{path}: not a readable table ({' '.join(str(e).split())})") from e
    if table.empty:
        raise DataError(f"{path}: the table has no rows")
    return table


def resolve_image_path(value: str, image_root: str) -> str:
    """A table's image cell as a local path.

    Relative paths are under `image_root`; an http(s) URL means the image was already
    downloaded into `image_root` under the URL's file name.
    """
    url = urllib.parse.urlparse(value)
    if url.scheme in ("http", "https"):
        return os.path.join(image_root, os.path.basename(url.path))
    return os.path.join(image_root, value)


class TableCollection:
    """Rows of a CSV/TSV/Parquet table: an image path (or downloaded URL) and a caption."""

    def __init__(
        self,
        path: str,
        image_column: str = "image",
        caption_column: str = "caption",
        image_root: str | None = None,
    ):
        table = _read_table(path)
        missing = [c for c in (image_column, caption_column) if c not in table.columns]
        if missing:
            raise DataError(
                f"{path} has no column {missing}; its columns are {list(table.columns)} "
                "(choose with --image-column / --caption-column)"
            )
        self._where = path
        self._root = image_root if image_root is not None else os.path.dirname(path)
        self._images = table[image_column].tolist()
        self._captions = table[caption_column].tolist()
        self.description = f"table:{os.path.abspath(path)}[{image_column},{caption_column}]"
        self.skipped_shards: list[str] = []

    def __len__(self) -> int:
        return len(self._images)

    def load(self, index: int) -> RawRecord:
        where = f"{self._where} row {index}"
        image, caption = self._images[index], self._captions[index]
        if not isinstance(image, str) or not image:
            raise Unreadable("missing_image", where, "empty image cell")
        if not isinstance(caption, str):  # pandas reads an empty cell as NaN
            raise Unreadable("missing_caption", where)
        path = resolve_image_path(image, self._root)
        return RawRecord(f"{where} ({path})", _read_file(path, "missing_image"), caption)


@dataclasses.dataclass(frozen=True)
class _TarMember:
    tar_path: str
    name: str
    offset: int
    size: int

    def read(self) -> bytes:
        with open(self.tar_path, "rb") as f:
            f.seek(self.offset)
            return f.read(self.size)


def _webdataset_key(member_name: str) -> tuple[str, str]:
    """Webdataset's grouping: the key ends at the first dot of the file name."""
    folder, name = os.path.split(member_name)
    stem, _, suffix = name.partition(".")
    return os.path.join(folder, stem), "." + suffix.lower()


def index_tar(tar_path: str) -> dict[str, dict[str, _TarMember]]:
    """Members of one webdataset shard grouped by key; raises `tarfile.TarError` if truncated.

    Reading members later by offset (not through tarfile) keeps random access cheap
    and thread safe.
    """
    file_size = os.path.getsize(tar_path)
    samples: dict[str, dict[str, _TarMember]] = {}
    with tarfile.open(tar_path, mode="r:") as tar:
        for info in tar:
            if not info.isfile():
                continue
            if info.offset_data + info.size > file_size:
                raise tarfile.ReadError(f"member {info.name} runs past the end of the file")
            key, suffix = _webdataset_key(info.name)
            member = _TarMember(tar_path, info.name, info.offset_data, info.size)
            samples.setdefault(key, {})[suffix] = member
    return samples


def _expand_tar_paths(spec: str) -> list[str]:
    if os.path.isdir(spec):
        return sorted(glob.glob(os.path.join(spec, "*.tar")))
    return sorted(glob.glob(spec)) if glob.has_magic(spec) else [spec]


class WebDatasetCollection:
    """Samples of webdataset .tar shards (a file, a folder of them, or a glob).

    A shard that is truncated or not a tar is skipped whole and listed in
    `skipped_shards`: its last samples would be cut anyway, and the user should fetch
    it again.
    """

    def __init__(self, spec: str, caption_key: str = "caption"):
        self._caption_key = caption_key
        self._samples: list[tuple[str, dict[str, _TarMember]]] = []
        self.description = f"webdataset:{os.path.abspath(spec)}"
        self.skipped_shards: list[str] = []
        tar_paths = _expand_tar_paths(spec)
        if not tar_paths:
            raise DataError(f"no .tar shards match {spec}")
        for tar_path in tar_paths:
            try:
                members = index_tar(tar_path)
            except (tarfile.TarError, OSError) as error:
                self.skipped_shards.append(f"{tar_path}: {error}")
                continue
            self._samples.extend((f"{tar_path}:{key}", members[key]) for key in sorted(members))

    def __len__(self) -> int:
        return len(self._samples)

    def _member(self, members: dict[str, _TarMember], suffixes: Sequence[str]) -> _TarMember | None:
        return next((members[s] for s in suffixes if s in members), None)

    def load(self, index: int) -> RawRecord:
        where, members = self._samples[index]
        image = self._member(members, IMAGE_SUFFIXES)
        if image is None:
            raise Unreadable("missing_image", where, f"no {'/'.join(IMAGE_SUFFIXES)} member")
        caption = self._member(members, CAPTION_SUFFIXES)
        if caption is None:
            raise Unreadable("missing_caption", where)
        suffix = _webdataset_key(caption.name)[1]
        text = parse_caption(caption.read(), suffix, self._caption_key, where)
        return RawRecord(where, image.read(), text)


class TfdsCollection:
    """A tfds dataset (by name, or by the folder holding its dataset_info.json).

    The image feature is read undecoded (`SkipDecoding`) so that our decoder, which
    counts corrupt images instead of crashing, does the decoding.
    """

    def __init__(
        self,
        name_or_dir: str,
        split: str = "train",
        data_dir: str | None = None,
        image_key: str = "image",
        caption_key: str = "caption",
    ):
        import tensorflow_datasets as tfds

        if os.path.exists(os.path.join(name_or_dir, "dataset_info.json")):
            builder = tfds.builder_from_directory(name_or_dir)
        else:
            try:
                builder = tfds.builder(name_or_dir, data_dir=data_dir)
            except ValueError as e:  # tfds' DatasetNotFoundError, or a string that is not a dataset name at all
                raise MissingPathError(f"{name_or_dir}: no such file or folder, nor a registered tfds dataset") from e
        features = builder.info.features
        for key in (image_key, caption_key):
            if key not in features:
                raise DataError(f"tfds dataset {name_or_dir} has no feature {key!r}: {list(features)}")
        if not isinstance(features[image_key], tfds.features.Image):
            raise DataError(f"feature {image_key!r} of {name_or_dir} is not a tfds Image")
        self._source = builder.as_data_source(split=split, decoders={image_key: tfds.decode.SkipDecoding()})
        self._where = f"{name_or_dir}[{split}]"
        self._image_key, self._caption_key = image_key, caption_key
        self.description = f"tfds:{self._where}"
        self.skipped_shards: list[str] = []

    def __len__(self) -> int:
        return len(self._source)

    def load(self, index: int) -> RawRecord:
        example = self._source[index]
        where = f"{self._where} #{index}"
        caption = example[self._caption_key]
        try:
            text = caption.decode("utf-8") if isinstance(caption, bytes) else str(caption)
        except UnicodeDecodeError as error:
            raise Unreadable("bad_caption", where, repr(error)) from error
        return RawRecord(where, example[self._image_key], text)


INPUT_KINDS = ("auto", "folder", "table", "webdataset", "tfds", "world")
WORLD_PREFIX = "world:"  # world:<records>[:<caption style>[:<seed>]], the tiny procedural world (data/world.py)


@dataclasses.dataclass(frozen=True)
class InputOptions:
    """Per-form settings; each form reads only its own."""

    caption_key: str = "caption"  # .json caption field (folder, webdataset); tfds feature
    image_key: str = "image"  # tfds feature
    image_column: str = "image"  # table
    caption_column: str = "caption"  # table
    image_root: str | None = None  # table; default: the table's folder
    split: str = "train"  # tfds
    tfds_data_dir: str | None = None  # tfds, when given by name


def detect_kind(path: str) -> str:
    """Guess the input form from the path, as the CLI's --input-kind auto does."""
    if path.startswith(WORLD_PREFIX):
        return "world"
    if path.endswith(TABLE_SUFFIXES):
        return "table"
    if path.endswith(".tar") or glob.has_magic(path):
        return "webdataset"
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "dataset_info.json")):
            return "tfds"
        return "webdataset" if glob.glob(os.path.join(path, "*.tar")) else "folder"
    if os.path.exists(path):
        raise DataError(f"cannot tell the input form of {path}; pass --input-kind")
    return "tfds"  # not a path: a registered tfds name


def open_collection(path: str, kind: str = "auto", options: InputOptions = InputOptions()) -> Collection:
    """Open `path` as the given input form ("auto" guesses it from the path)."""
    if kind not in INPUT_KINDS:
        raise DataError(f"unknown input kind {kind!r}; choose from {INPUT_KINDS}")
    kind = detect_kind(path) if kind == "auto" else kind
    if kind == "folder":
        return FolderCollection(path, options.caption_key)
    if kind == "table":
        return TableCollection(path, options.image_column, options.caption_column, options.image_root)
    if kind == "webdataset":
        return WebDatasetCollection(path, options.caption_key)
    if kind == "world":
        return open_world(path)
    return TfdsCollection(path, options.split, options.tfds_data_dir, options.image_key, options.caption_key)


def open_world(spec: str) -> Collection:
    """`world:<records>[:<caption style>[:<seed>]]`: rendered scenes of the tiny world (64 px; resized by the
    preparation like any image), captions 'short', 'rich' or 'mixed' (default)."""

    parts = spec[len(WORLD_PREFIX) :].split(":")
    if not 1 <= len(parts) <= 3 or not parts[0].isdigit() or int(parts[0]) < 1:
        raise DataError(f"{spec!r}: expected world:<records>[:<caption style>[:<seed>]], e.g. world:20000:mixed:0")
    style = parts[1] if len(parts) > 1 else "mixed"
    if style not in CAPTION_MIXES:
        raise DataError(f"{spec!r}: caption style {style!r}; choose from {', '.join(CAPTION_MIXES)}")
    if len(parts) > 2 and not parts[2].isdigit():
        raise DataError(f"{spec!r}: the seed {parts[2]!r} is not a non-negative integer")
    return WorldCollection(int(parts[0]), seed=int(parts[2]) if len(parts) > 2 else 0, style=style)
