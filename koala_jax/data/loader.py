"""The grain input pipeline of train.py: prepared records to per-process batches.

Each process reads a disjoint slice of the records (index `process_index` modulo
`process_count`), shuffles it with a fresh order every epoch, repeats forever and
batches `global_batch_size // process_count` records; `to_global_batch` then lays the
process-local batches out as one global array over the mesh's data axes. The returned
iterator is a grain `DatasetIterator`: its `get_state()`/`set_state()` (or grain's
orbax `CheckpointSave`/`CheckpointRestore`) make resume continue with the exact next
batch. A corrupt record is skipped, never batched, and counted in `skip_counts`.

Imports neither torch nor tensorflow.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from typing import Any, Protocol

import grain
import jax
import numpy as np
from absl import flags
from google.protobuf import message as protobuf_message
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from koala_jax.data import schema
from koala_jax.errors import DataError

log = logging.getLogger(__name__)
Example = dict[str, Any]
Batch = dict[str, np.ndarray]
TRAIN_KEYS = ("latents", "prompt_embeds", "pooled_prompt_embeds", "time_ids")
_SKIPPED_KEY = "_corrupt_records"  # travels with each batch from the workers to the main process
# A batch that meets this many corrupt records in a row means the data, not a few records, is bad.
MAX_CORRUPT_PER_BATCH = 1000


class CorruptRecordError(Exception):
    """A record that cannot be read or decoded; the loader skips and counts it."""


class RecordSource(Protocol):
    """Random access to records of the prepared schema (see `schema.record_features`)."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Example:
        """The record at `index`; raises `CorruptRecordError` if it is unreadable."""
        ...


def _check_shard(path: str, expected: int) -> str | None:
    """Why the shard at `path` cannot be used, or None when it holds `expected` records."""
    try:
        found = len(grain.sources.ArrayRecordDataSource([path]))
    except (RuntimeError, OSError) as error:  # array_record reports truncation as RuntimeError
        return f"{path}: {error}"
    return None if found == expected else f"{path}: {found} records, metadata says {expected}"


class PreparedSource:
    """The records prepare_data.py wrote, minus shards that are missing or truncated.

    An unusable shard is logged and listed in `skipped_shards` rather than failing the
    run: the other shards still train, and the count reaches the training log.
    """

    def __init__(self, data_dir: str):
        self.data_dir = data_dir
        self._features, lengths = schema.read_tfds_info(data_dir)
        self.skipped_shards: list[str] = []
        paths = []
        for shard, expected in enumerate(lengths):
            path = os.path.join(data_dir, schema.shard_filename(shard, len(lengths)))
            problem = _check_shard(path, expected) if expected else None
            if problem:
                log.warning("skipping unusable shard %s", problem)
                self.skipped_shards.append(problem)
            elif expected:
                paths.append(path)
        if not paths:
            raise DataError(f"{data_dir} has no usable records; skipped: {self.skipped_shards}")
        self._records = grain.sources.ArrayRecordDataSource(paths)

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> Example:
        try:
            return self._features.deserialize_example_np(self._records[index])
        except (RuntimeError, protobuf_message.DecodeError, ValueError) as error:
            raise CorruptRecordError(f"record {index} of {self.data_dir}: {error}") from error

    def null_embeddings(self) -> dict[str, np.ndarray]:
        return schema.load_null_embeddings(self.data_dir)


def open_source(data_dir: str) -> PreparedSource:
    """Random access to a prepared dataset (the output folder of prepare_data.py)."""
    return PreparedSource(data_dir)


@dataclasses.dataclass(frozen=True)
class SyntheticSource:
    """Random records of the prepared schema, the same for the same index and seed.

    Lets the tiny training config and the benchmarks run with no data on disk.
    """

    num_records: int
    latent_shape: tuple[int, int, int]
    text_len: int
    text_dim: int
    pooled_dim: int
    seed: int = 0
    vae_scale_factor: int = 8

    def __len__(self) -> int:
        return self.num_records

    def __getitem__(self, index: int) -> Example:
        if not 0 <= index < self.num_records:
            raise IndexError(f"index {index} out of range for {self.num_records} records")
        rng = np.random.default_rng([self.seed, index])
        image_size = np.asarray(self.latent_shape[1:], np.int32) * self.vae_scale_factor
        return {
            "latents": rng.standard_normal(self.latent_shape, np.float32).astype(np.float16),
            "prompt_embeds": rng.standard_normal((self.text_len, self.text_dim), np.float32).astype(np.float16),
            "pooled_prompt_embeds": rng.standard_normal(self.pooled_dim, np.float32).astype(np.float16),
            "original_size": image_size,
            "crop_top_left": np.zeros(2, np.int32),
            "target_size": image_size,
            "caption": f"synthetic caption {index}",
        }

    def null_embeddings(self) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, self.num_records, 0])
        return {
            "prompt_embeds": rng.standard_normal((self.text_len, self.text_dim), np.float32),
            "pooled_prompt_embeds": rng.standard_normal(self.pooled_dim, np.float32),
        }


@dataclasses.dataclass(frozen=True)
class _CorruptRecord:
    """Stands in for a corrupt record between reading and batching (picklable for workers)."""

    message: str


@dataclasses.dataclass(frozen=True)
class _ReadTrainExample:
    """Reads record `index` as float32 training arrays with SDXL's time_ids."""

    source: RecordSource

    def __call__(self, index: int) -> dict[str, np.ndarray] | _CorruptRecord:
        try:
            record = self.source[index]
        except CorruptRecordError as error:
            return _CorruptRecord(str(error))
        time_ids = np.concatenate([record[field] for field in schema.TIME_ID_FIELDS])
        return {
            "latents": record["latents"].astype(np.float32),
            "prompt_embeds": record["prompt_embeds"].astype(np.float32),
            "pooled_prompt_embeds": record["pooled_prompt_embeds"].astype(np.float32),
            "time_ids": time_ids.astype(np.float32),
        }


class _ValidBatchIterator(grain.DatasetIterator):
    """Batches the next `batch_size` readable examples and notes how many were corrupt."""

    def __init__(self, parent: grain.DatasetIterator, batch_size: int):
        super().__init__(parent)
        self._batch_size = batch_size

    def __next__(self) -> Batch:
        examples, corrupt = [], 0
        while len(examples) < self._batch_size:
            element = next(self._parent)
            if isinstance(element, _CorruptRecord):
                log.warning("skipping corrupt record: %s", element.message)
                corrupt += 1
                if corrupt >= MAX_CORRUPT_PER_BATCH:
                    raise RuntimeError(f"{corrupt} corrupt records in one batch: {element.message}")
            else:
                examples.append(element)
        batch = {key: np.stack([e[key] for e in examples]) for key in TRAIN_KEYS}
        batch[_SKIPPED_KEY] = np.int64(corrupt)
        return batch

    def get_state(self) -> dict[str, Any]:
        return self._parent.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state)


class _ValidBatchDataset(grain.IterDataset):
    def __init__(self, parent: grain.IterDataset, batch_size: int):
        super().__init__(parent)
        self._batch_size = batch_size

    def __iter__(self) -> _ValidBatchIterator:
        return _ValidBatchIterator(self._parent.__iter__(), self._batch_size)


class TrainIterator(grain.DatasetIterator):
    """The loader's iterator: batches of TRAIN_KEYS, checkpointable, with skip counts."""

    def __init__(self, parent: grain.DatasetIterator, skipped_shards: Sequence[str]):
        super().__init__(parent)
        self._corrupt_records = 0
        self._skipped_shards = len(skipped_shards)

    def __next__(self) -> Batch:
        batch = dict(next(self._parent))
        self._corrupt_records += int(batch.pop(_SKIPPED_KEY))
        return batch

    @property
    def skip_counts(self) -> dict[str, int]:
        """For the training log: corrupt records met so far and shards left out at open."""
        return {"corrupt_records": self._corrupt_records, "skipped_shards": self._skipped_shards}

    def get_state(self) -> dict[str, Any]:
        return {"pipeline": self._parent.get_state(), "corrupt_records": self._corrupt_records}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["pipeline"])
        self._corrupt_records = int(state["corrupt_records"])


class _TrainDataset(grain.IterDataset):
    def __init__(self, parent: grain.IterDataset, skipped_shards: Sequence[str]):
        super().__init__(parent)
        self._skipped_shards = list(skipped_shards)

    def __iter__(self) -> TrainIterator:
        return TrainIterator(self._parent.__iter__(), self._skipped_shards)


def local_batch_size(global_batch_size: int, process_count: int) -> int:
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise DataError(
            f"global_batch_size {global_batch_size} must be a positive multiple of the process count {process_count}"
        )
    return global_batch_size // process_count


def make_train_loader(
    source: RecordSource,
    *,
    global_batch_size: int,
    seed: int,
    process_index: int,
    process_count: int,
    num_workers: int = 0,
    read_threads: int = 8,
    prefetch_batches: int = 2,
) -> TrainIterator:
    """An endless, shuffled iterator of this process's batches of `source`.

    Yields dicts of float32 arrays: latents [B, C, h, w], prompt_embeds [B, 77, D],
    pooled_prompt_embeds [B, P], time_ids [B, 6] (original size, crop top-left, target
    size), with B = global_batch_size // process_count. `num_workers` > 0 reads and
    batches in that many worker processes; 0 reads with `read_threads` threads here.
    """
    batch_size = local_batch_size(global_batch_size, process_count)
    if not 0 <= process_index < process_count:
        raise DataError(f"process_index {process_index} not in [0, {process_count})")
    if len(source) < process_count:
        raise DataError(f"{len(source)} records cannot be split over {process_count} processes")
    indices = grain.MapDataset.range(len(source))[process_index::process_count]
    # shuffle before repeat: grain reseeds the shuffle for every epoch of the repeat.
    examples = indices.shuffle(seed=seed).repeat().map(_ReadTrainExample(source))
    read_options = grain.ReadOptions(
        num_threads=read_threads,
        prefetch_buffer_size=max(read_threads, prefetch_batches * batch_size),
    )
    batches: grain.IterDataset = _ValidBatchDataset(examples.to_iter_dataset(read_options), batch_size)
    if num_workers > 0:
        # grain's worker start-up reads absl flags; a program without absl never parsed them.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        options = grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=prefetch_batches)
        batches = batches.mp_prefetch(options)
    return iter(_TrainDataset(batches, getattr(source, "skipped_shards", ())))


def to_global_batch(local_batch: Batch, mesh: Mesh, data_axes: str | Sequence[str]) -> dict[str, jax.Array]:
    """Assemble every process's local batch into global arrays split over `data_axes`.

    The leading (batch) axis is sharded over the mesh's data axes, the other axes are
    replicated; each process contributes its own rows, in process order.
    """
    axes = (data_axes,) if isinstance(data_axes, str) else tuple(data_axes)
    shards = int(np.prod([mesh.shape[axis] for axis in axes]))
    global_rows = next(iter(local_batch.values())).shape[0] * jax.process_count()
    if global_rows % shards:
        raise DataError(f"global batch {global_rows} does not split over {shards} devices of mesh axes {axes}")
    sharding = NamedSharding(mesh, PartitionSpec(axes))
    return {key: jax.make_array_from_process_local_data(sharding, value) for key, value in local_batch.items()}
