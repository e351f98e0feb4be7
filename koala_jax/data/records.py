"""What every raw input collection gives (an image folder, a table, webdataset shards, tfds, the tiny world): one
record before decoding, and random access to them. Its own module so that the collections (`ingest`, `world`)
import it rather than each other."""

from __future__ import annotations

import dataclasses
from typing import Protocol


@dataclasses.dataclass(frozen=True)
class RawRecord:
    """One input pair before decoding; `where` locates it in error messages and reports."""

    where: str
    image: bytes
    caption: str


class Collection(Protocol):
    """Random access to the records of one input.

    `description` names the input stably (checked when resuming a preparation);
    `skipped_shards` lists input files left out whole.
    """

    description: str
    skipped_shards: list[str]

    def __len__(self) -> int: ...

    def load(self, index: int) -> RawRecord:
        """The record at `index`; raises `Unreadable` when it cannot be read."""
        ...
