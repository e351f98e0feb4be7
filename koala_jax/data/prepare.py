"""Encode an image-caption collection once with the teacher's VAE and text encoders.

Training reads latents and text embeddings instead of pixels and captions, so the
frozen encoders run once per record rather than once per epoch. The input is cut into
shards of `records_per_shard` input records (shard k holds inputs [kR, (k+1)R)), and
each shard is written under a temporary name and renamed when complete: a rerun skips
the shards that exist, and a crash never leaves one that reads as complete. Tasks on
several machines may split the shards (`task_index`/`task_count`); whichever run finds
all shards complete writes the tfds metadata that makes the folder loadable.

The encoders are the teacher's VAE and text encoders either as diffusers/transformers models
(`backend="torch"`, `TeacherEncoders`) or as our Flax modules (`backend="jax"`,
`encoders_jax.JaxTeacherEncoders`: no torch, batches over this process's devices). torch, diffusers and
transformers are imported only when used, so the JAX backend runs where torch is not installed.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
from array_record.python import array_record_module

from koala_jax.console import Progress
from koala_jax.data import ingest, schema
from koala_jax.errors import ConfigError, DataError
from koala_jax.files import disk_full_as, write_json
from koala_jax.models.vae import VAEConfig
from koala_jax.weights import pipeline_dir

log = logging.getLogger(__name__)
SHARD_REPORTS_DIR = "_shard_reports"
BACKENDS = ("torch", "jax")
# Larger squares cannot be encoded in one piece by a VAE on any current accelerator (a 100000 px image alone is
# 120 GB of float32 pixels): refused before anything is loaded.
MAX_RESOLUTION = 4096


@dataclasses.dataclass(frozen=True)
class PrepareConfig:
    """What to produce; the fields in `content_settings` must match on resume."""

    output_dir: str
    teacher: str  # diffusers SDXL folder: vae/, text_encoder(_2)/, tokenizer(_2)/
    resolution: int = 1024
    filters: ingest.Filters = ingest.Filters()
    records_per_shard: int = 1000
    batch_size: int = 16
    dtype: str = "float32"  # text encoders; the VAE upcasts to float32 when its config says so
    device: str | None = None  # torch backend: default cuda when available
    num_threads: int = 4  # image reading and decoding
    task_index: int = 0
    task_count: int = 1
    backend: str = "torch"  # the encoders: "torch" (diffusers/transformers) or "jax" (no torch)

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend {self.backend!r}: choose from {', '.join(BACKENDS)}")
        if self.backend == "jax" and self.device is not None:
            raise ConfigError(f"device {self.device!r} is a torch device; the jax backend uses every local device")

    def problems(self) -> list[str]:
        """Every setting out of range and every part of the teacher folder that is missing, read from its
        configs only (nothing loaded): checked before anything is written, so a typo leaves no output behind."""
        found = [
            f"{name} {value} must be at least {low}"
            for name, value, low in (
                ("records_per_shard", self.records_per_shard, 1),
                ("batch_size", self.batch_size, 1),
                ("num_threads", self.num_threads, 1),
                ("resolution", self.resolution, 1),
                ("task_count", self.task_count, 1),
            )
            if value < low
        ]
        if self.resolution > MAX_RESOLUTION:
            found.append(f"resolution {self.resolution} is above {MAX_RESOLUTION} (SDXL's own is 1024)")
        if self.task_count >= 1 and not 0 <= self.task_index < self.task_count:
            found.append(f"task_index {self.task_index} not in [0, {self.task_count})")
        try:
            factor = teacher_vae_factor(self.teacher)
        except (ConfigError, DataError, OSError) as e:
            return [*found, str(e)]
        if self.resolution >= 1 and self.resolution % factor:
            found.append(f"resolution {self.resolution} is not a multiple of the teacher VAE's factor {factor}")
        return found

    def content_settings(self, collection: ingest.Collection) -> dict[str, Any]:
        """Settings that change what the shards contain, checked when resuming."""
        return {
            "input": collection.description,
            "num_inputs": len(collection),
            "teacher": os.path.abspath(self.teacher),
            "resolution": self.resolution,
            "filters": dataclasses.asdict(self.filters),
            "records_per_shard": self.records_per_shard,
            "dtype": self.dtype,
        }


TEACHER_PARTS = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")


def teacher_vae_factor(teacher: str) -> int:
    """The VAE factor of a teacher folder that has every part preparation loads (its configs only)."""
    if not os.path.isdir(teacher):
        raise DataError(f"teacher {teacher}: no such folder (a diffusers SDXL folder with {', '.join(TEACHER_PARTS)})")
    missing = [part for part in TEACHER_PARTS if not os.path.isdir(os.path.join(teacher, part))]
    if missing:
        raise DataError(f"teacher {teacher}: no {', '.join(m + '/' for m in missing)} (not a diffusers SDXL folder?)")
    try:
        return pipeline_dir.vae_factor(teacher)
    except (OSError, ValueError, KeyError) as e:
        raise DataError(
            f"{os.path.join(teacher, 'vae', 'config.json')}: not a readable AutoencoderKL config ({e})"
        ) from e


def set_torch_threads(n: int) -> None:
    """Threads of torch's CPU kernels (1 can be much faster on a busy CPU)."""
    import torch

    torch.set_num_threads(n)


def load_tokenizers(teacher: str) -> list:
    """The teacher's two CLIP tokenizers (transformers' CLIPTokenizer; no torch needed)."""
    from transformers import CLIPTokenizer

    return [CLIPTokenizer.from_pretrained(os.path.join(teacher, name)) for name in ("tokenizer", "tokenizer_2")]


def make_encoders(config: PrepareConfig):
    """The teacher's encoders for `config.backend`: `TeacherEncoders` or `JaxTeacherEncoders`."""
    if config.backend == "jax":
        from koala_jax.data.encoders_jax import JaxTeacherEncoders

        return JaxTeacherEncoders.from_folder(config.teacher, load_tokenizers(config.teacher), config.dtype)
    return TeacherEncoders(config.teacher, config.device, config.dtype)


class TeacherEncoders:
    """The teacher's VAE and two CLIP text encoders in PyTorch, encoding as SDXL's pipeline does."""

    def __init__(self, teacher: str, device: str | None = None, dtype: str = "float32"):
        import torch
        from diffusers import AutoencoderKL
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        self.device = self.default_device(device)
        text_dtype = getattr(torch, dtype)
        vae_dir = os.path.join(teacher, "vae")
        # SDXL's VAE overflows in float16 (force_upcast): keep it in float32 then.
        force_upcast = AutoencoderKL.load_config(vae_dir).get("force_upcast", True)
        vae_dtype = torch.float32 if force_upcast else text_dtype
        self.vae = AutoencoderKL.from_pretrained(vae_dir, torch_dtype=vae_dtype)
        self.vae.to(self.device).eval()
        self.tokenizers = load_tokenizers(teacher)
        self.text_encoders = [
            CLIPTextModel.from_pretrained(os.path.join(teacher, "text_encoder")),
            CLIPTextModelWithProjection.from_pretrained(os.path.join(teacher, "text_encoder_2")),
        ]
        for encoder in self.text_encoders:
            encoder.to(self.device, text_dtype).eval()

    @staticmethod
    def default_device(device: str | None):
        import torch

        return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        factor = VAEConfig.from_diffusers(dict(self.vae.config)).downscale_factor
        if resolution % factor:
            raise DataError(f"resolution {resolution} is not a multiple of the VAE's {factor}")
        side = resolution // factor
        return (self.vae.config.latent_channels, side, side)

    @property
    def text_dim(self) -> int:
        return sum(encoder.config.hidden_size for encoder in self.text_encoders)

    @property
    def pooled_dim(self) -> int:
        return self.text_encoders[1].config.projection_dim

    def encode_images(self, pixels: np.ndarray) -> np.ndarray:
        """Scaled latents [B, C, h, w] float32 of pixels [B, 3, H, W] in [-1, 1].

        The posterior mean, not a sample: the record is then a deterministic function
        of the image, and the sampling noise (std ~ exp(logvar / 2), tiny for SDXL's
        VAE) is negligible next to the diffusion noise added in training.
        """
        import torch

        with torch.no_grad():
            x = torch.from_numpy(pixels).to(self.device, self.vae.dtype)
            mean = self.vae.encode(x).latent_dist.mean
            return (mean * self.vae.config.scaling_factor).float().cpu().numpy()

    def encode_captions(self, captions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(prompt_embeds [B, 77, D], pooled [B, P]) as StableDiffusionXLPipeline.encode_prompt.

        Both encoders' penultimate hidden states, concatenated on the feature axis; the
        pooled embedding is the second encoder's projected text embedding.
        """
        import torch

        hidden, pooled = [], None
        with torch.no_grad():
            for tokenizer, encoder in zip(self.tokenizers, self.text_encoders, strict=True):
                ids = tokenizer(
                    list(captions),
                    padding="max_length",
                    max_length=tokenizer.model_max_length,
                    truncation=True,
                    return_tensors="pt",
                ).input_ids.to(self.device)
                output = encoder(ids, output_hidden_states=True)
                hidden.append(output.hidden_states[-2])
                pooled = output[0]  # text_embeds of CLIPTextModelWithProjection, the last encoder
            prompt_embeds = torch.cat(hidden, dim=-1)
        return prompt_embeds.float().cpu().numpy(), pooled.float().cpu().numpy()


class _ShardWriter:
    """Writes shards of one output folder: temporary name first, rename when complete. The settings the shards are
    made with are recorded with the first one (a run stopped before any shard exists leaves nothing that binds a
    rerun to its settings)."""

    def __init__(self, output_dir: str, num_shards: int, settings: dict[str, Any], record_bytes: int):
        self.output_dir = output_dir
        self.num_shards = num_shards
        self.settings = settings
        self.record_bytes = record_bytes  # About the size of one record: what a shard needs, with its input count.
        self.tmp_dir = os.path.join(output_dir, schema.INCOMPLETE_DIR)
        self.reports_dir = os.path.join(output_dir, SHARD_REPORTS_DIR)
        os.makedirs(self.tmp_dir, exist_ok=True)
        os.makedirs(self.reports_dir, exist_ok=True)

    def path(self, shard: int) -> str:
        return os.path.join(self.output_dir, schema.shard_filename(shard, self.num_shards))

    def report_path(self, shard: int) -> str:
        return os.path.join(self.reports_dir, schema.shard_filename(shard, self.num_shards) + ".json")

    def is_complete(self, shard: int) -> bool:
        """The shard file appears only by the final rename, after its report."""
        return os.path.exists(self.path(shard))

    def read_report(self, shard: int) -> ingest.IngestReport:
        with open(self.report_path(shard)) as f:
            return ingest.IngestReport.from_dict(json.load(f))

    def write(self, shard: int, records: Iterator[bytes], report: ingest.IngestReport, num_inputs: int) -> None:
        """Write shard `shard` (up to `num_inputs` records) whole or not at all: a failure, a signal or a full disk
        (one DiskFullError naming the shard) leaves no partial file behind."""
        tmp_path = os.path.join(self.tmp_dir, os.path.basename(self.path(shard)))
        try:
            with disk_full_as(self.path(shard), self.record_bytes * num_inputs):
                # group_size:1 makes every record its own chunk: cheap random access for grain.
                writer = array_record_module.ArrayRecordWriter(tmp_path, "group_size:1")
                try:
                    for record in records:
                        writer.write(record)
                finally:
                    writer.close()
                record_settings(self.output_dir, self.settings)
                write_json(self.report_path(shard), report.to_dict())
                os.replace(tmp_path, self.path(shard))
        finally:
            if os.path.exists(tmp_path):
                os.remove(tmp_path)


def check_settings(output_dir: str, settings: dict[str, Any]) -> None:
    """Refuse to mix shards made with different inputs or settings in one folder (reads only)."""
    path = os.path.join(output_dir, schema.PREPARE_CONFIG_FILE)
    # Without a complete shard the folder binds nothing (a folder of an older version records its settings first).
    if os.path.exists(path) and schema.complete_shards(output_dir):
        with open(path) as f:
            stored = json.load(f)
        changed = sorted(k for k in settings.keys() | stored.keys() if settings.get(k) != stored.get(k))
        if changed:
            differences = "; ".join(f"{k}: {stored.get(k)!r} then, {settings.get(k)!r} now" for k in changed)
            raise DataError(
                f"{output_dir} holds shards prepared with other settings ({differences}); "
                "use a new --output-dir or the same settings"
            )


def record_settings(output_dir: str, settings: dict[str, Any]) -> None:
    """Write the settings the shards are made with, just before the first shard appears (`check_settings` has
    refused other settings already, so an existing file with complete shards beside it holds these)."""
    path = os.path.join(output_dir, schema.PREPARE_CONFIG_FILE)
    if not os.path.exists(path) or not schema.complete_shards(output_dir):
        write_json(path, settings)


class _Progress:
    """Counts and throughput, logged once per shard."""

    def __init__(self, num_inputs: int):
        self.num_inputs = num_inputs
        self.start = time.perf_counter()
        self.done = 0

    def shard_done(self, shard: int, num_shards: int, report: ingest.IngestReport) -> None:
        self.done += report.total
        rate = self.done / max(time.perf_counter() - self.start, 1e-9)
        log.info(
            "shard %d/%d: %d kept, %d filtered, %d unreadable | %d/%d inputs, %.1f images/s",
            shard + 1,
            num_shards,
            report.kept,
            sum(report.filtered.values()),
            sum(report.unreadable.values()),
            self.done,
            self.num_inputs,
            rate,
        )


class _ShardEncoder:
    """Turns one shard's input records into serialized records, counting every skip."""

    def __init__(
        self,
        collection: ingest.Collection,
        config: PrepareConfig,
        encoders: Any,  # TeacherEncoders or JaxTeacherEncoders
        serialize: Callable[[dict[str, Any]], bytes],
        pool: concurrent.futures.Executor,
    ):
        self.collection, self.config, self.encoders = collection, config, encoders
        self.serialize, self.pool = serialize, pool

    def inputs(self, shard: int) -> range:
        start = shard * self.config.records_per_shard
        return range(start, min(start + self.config.records_per_shard, len(self.collection)))

    def _load(self, index: int) -> ingest.Example | ingest.SkipRecord:
        """Runs in a worker thread; returns the skip rather than raising it."""
        try:
            return ingest.load_example(self.collection, index, self.config.filters, self.config.resolution)
        except ingest.SkipRecord as skip:
            return skip

    def _batches(self, indices: Sequence[int]) -> Iterator[list[ingest.Example | ingest.SkipRecord]]:
        """Loaded batches in order, the next one decoding while this one is encoded."""
        size = self.config.batch_size
        chunks = [indices[i : i + size] for i in range(0, len(indices), size)]
        ahead = [self.pool.submit(self._load, i) for i in chunks[0]] if chunks else []
        for chunk in chunks[1:] + [[]]:
            current, ahead = ahead, [self.pool.submit(self._load, i) for i in chunk]
            yield [future.result() for future in current]

    def _encode(self, examples: list[ingest.Example], report: ingest.IngestReport) -> Iterator[bytes]:
        """Records of kept examples; a non-finite encoding is skipped and counted."""
        latents = self.encoders.encode_images(np.stack([e.pixels for e in examples]))
        prompt_embeds, pooled = self.encoders.encode_captions([e.caption for e in examples])
        for i, example in enumerate(examples):
            if not all(np.isfinite(a).all() for a in (latents[i], prompt_embeds[i], pooled[i])):
                report.count_skip(ingest.Unreadable("non_finite_encoding", example.where))
                continue
            report.kept += 1
            yield self.serialize(
                {
                    "latents": latents[i].astype(np.float16),
                    "prompt_embeds": prompt_embeds[i].astype(np.float16),
                    "pooled_prompt_embeds": pooled[i].astype(np.float16),
                    "original_size": np.asarray(example.original_size, np.int32),
                    "crop_top_left": np.asarray(example.crop_top_left, np.int32),
                    "target_size": np.asarray(example.pixels.shape[1:], np.int32),
                    "caption": example.caption,
                }
            )

    def records(self, shard: int, report: ingest.IngestReport) -> Iterator[bytes]:
        for batch in self._batches(self.inputs(shard)):
            kept = []
            for item in batch:
                if isinstance(item, ingest.SkipRecord):
                    report.count_skip(item)
                else:
                    kept.append(item)
            if kept:
                yield from self._encode(kept, report)


def _finalize(writer: _ShardWriter, features: Any, collection: ingest.Collection) -> ingest.IngestReport | None:
    """Write the tfds metadata and the report once every shard is complete."""
    missing = [k for k in range(writer.num_shards) if not writer.is_complete(k)]
    if missing:
        log.info("%d shards still missing (other tasks?): metadata not written yet", len(missing))
        return None
    report = ingest.IngestReport(skipped_shards=list(collection.skipped_shards))
    lengths = []
    for shard in range(writer.num_shards):
        shard_report = writer.read_report(shard)
        lengths.append(shard_report.kept)
        report.merge(shard_report)
    with disk_full_as(writer.output_dir):
        schema.write_tfds_metadata(writer.output_dir, features, lengths)
    write_json(os.path.join(writer.output_dir, schema.PREPARE_REPORT_FILE), report.to_dict())
    return report


def prepare_dataset(collection: ingest.Collection, config: PrepareConfig) -> ingest.IngestReport | None:
    """Encode `collection` into `config.output_dir`; returns the full report when complete.

    Returns None while shards of other tasks are still missing.
    """
    problems = config.problems() + ([] if len(collection) else [f"{collection.description} holds no records"])
    if problems:  # Before anything is loaded or written.
        raise ConfigError("; ".join(problems))
    settings = config.content_settings(collection)
    check_settings(config.output_dir, settings)
    encoders = make_encoders(config)
    latent_shape = encoders.latent_shape(config.resolution)
    features = schema.record_features(latent_shape, encoders.text_dim, encoders.pooled_dim)
    num_shards = math.ceil(len(collection) / config.records_per_shard)
    record_bytes = 2 * (math.prod(latent_shape) + schema.TEXT_LENGTH * encoders.text_dim + encoders.pooled_dim)
    writer = _ShardWriter(config.output_dir, num_shards, settings, record_bytes)
    null_embeds, null_pooled = encoders.encode_captions([""])
    schema.save_null_embeddings(config.output_dir, null_embeds[0], null_pooled[0])
    mine = range(config.task_index, num_shards, config.task_count)
    todo = [k for k in mine if not writer.is_complete(k)]
    log.info("%d shards, %d for this task, %d to write", num_shards, len(mine), len(todo))
    with concurrent.futures.ThreadPoolExecutor(config.num_threads) as pool:
        encoder = _ShardEncoder(collection, config, encoders, features.serialize_example, pool)
        progress = _Progress(sum(len(encoder.inputs(k)) for k in todo))
        with Progress(progress.num_inputs, "encoding", unit="img") as bar:  # a bar on a terminal only
            for shard in todo:
                report = ingest.IngestReport()
                writer.write(shard, encoder.records(shard, report), report, len(encoder.inputs(shard)))
                progress.shard_done(shard, num_shards, report)
                bar.update(report.total)
    return _finalize(writer, features, collection)
