"""The on-disk format of a prepared dataset: record features, file names, side files.

One place defines what `prepare` writes and what `loader` reads, so the two cannot
drift apart. The records are tfds-serialized examples in ArrayRecord shards, with
tfds metadata beside them, so `tfds.builder_from_directory(dir).as_data_source()`
reads them as well as our grain loader does. No torch here.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence

import numpy as np
import tensorflow_datasets as tfds

from koala_jax.errors import MissingPathError
from koala_jax.files import atomic_write

DATASET_NAME = "koala_latents"
SPLIT = "train"
FILE_FORMAT = "array_record"
FILENAME_TEMPLATE = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"
# Complete shards are renamed out of this folder; anything left in it is a crash's debris.
INCOMPLETE_DIR = "_incomplete"
NULL_EMBEDDINGS_FILE = "null_embeddings.npz"
PREPARE_CONFIG_FILE = "prepare_config.json"
PREPARE_REPORT_FILE = "prepare_report.json"
DATASET_INFO_FILE = "dataset_info.json"  # tfds metadata: written last, so a folder with it is complete
TEXT_LENGTH = 77  # CLIP's model_max_length
TIME_ID_FIELDS = ("original_size", "crop_top_left", "target_size")  # SDXL's add_time_ids order


def record_features(latent_shape: Sequence[int], text_dim: int, pooled_dim: int) -> tfds.features.FeaturesDict:
    """The tfds features of one record; float16 halves the size of the big tensors."""
    size = tfds.features.Tensor(shape=(2,), dtype=np.int32)
    return tfds.features.FeaturesDict(
        {
            "latents": tfds.features.Tensor(shape=tuple(latent_shape), dtype=np.float16),
            "prompt_embeds": tfds.features.Tensor(shape=(TEXT_LENGTH, text_dim), dtype=np.float16),
            "pooled_prompt_embeds": tfds.features.Tensor(shape=(pooled_dim,), dtype=np.float16),
            "original_size": size,
            "crop_top_left": size,
            "target_size": size,
            "caption": tfds.features.Text(),
        }
    )


def shard_filename(index: int, num_shards: int) -> str:
    """The tfds name of shard `index`, so the default tfds template finds it."""
    return f"{DATASET_NAME}-{SPLIT}.{FILE_FORMAT}-{index:05d}-of-{num_shards:05d}"


def complete_shards(data_dir: str) -> list[str]:
    """The names of the complete shards in `data_dir` (a shard appears under its name only when complete)."""
    pattern = f"{DATASET_NAME}-{SPLIT}.{FILE_FORMAT}-*-of-*"
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(glob.escape(data_dir), pattern)))


def shard_template(data_dir: str) -> tfds.core.ShardedFileTemplate:
    return tfds.core.ShardedFileTemplate(
        data_dir=data_dir,
        template=FILENAME_TEMPLATE,
        dataset_name=DATASET_NAME,
        split=SPLIT,
        filetype_suffix=FILE_FORMAT,
    )


def write_tfds_metadata(data_dir: str, features: tfds.features.FeaturesDict, shard_lengths: list[int]) -> None:
    """Write dataset_info.json and features.json, which make the folder a tfds dataset."""
    template = shard_template(data_dir)
    split = tfds.core.SplitInfo(name=SPLIT, shard_lengths=shard_lengths, num_bytes=0, filename_template=template)
    # check_data would read an example through tf.data, and tensorflow is not installed.
    tfds.folder_dataset.write_metadata(
        data_dir=data_dir,
        features=features,
        split_infos=[split],
        filename_template=template,
        check_data=False,
        description="KOALA distillation data: SDXL VAE latents and text embeddings.",
    )


def read_tfds_info(data_dir: str) -> tuple[tfds.features.FeaturesDict, list[int]]:
    """Features and per-shard record counts of a prepared dataset."""
    info_file = os.path.join(data_dir, DATASET_INFO_FILE)
    if not os.path.exists(info_file):
        raise MissingPathError(
            f"{data_dir} is not a prepared dataset (no dataset_info.json); run prepare_data.py "
            "first, or rerun it to finish an interrupted preparation."
        )
    info = tfds.builder_from_directory(data_dir).info
    return info.features, list(info.splits[SPLIT].shard_lengths)


def save_null_embeddings(data_dir: str, prompt_embeds: np.ndarray, pooled: np.ndarray) -> None:
    """Store the empty caption's embeddings, stored as float16 like the records (whole or not at all)."""
    with atomic_write(os.path.join(data_dir, NULL_EMBEDDINGS_FILE), "wb") as f:
        np.savez(
            f,
            prompt_embeds=prompt_embeds.astype(np.float16),
            pooled_prompt_embeds=pooled.astype(np.float16),
        )


def load_null_embeddings(data_dir: str) -> dict[str, np.ndarray]:
    """The empty caption's embeddings, for classifier-free-guidance caption dropout.

    Returns float32 `prompt_embeds` [77, D] and `pooled_prompt_embeds` [P], the dtype of
    the loader's batches, so train.py can substitute them for dropped captions.
    """
    path = os.path.join(data_dir, NULL_EMBEDDINGS_FILE)
    if not os.path.exists(path):
        raise MissingPathError(f"no {NULL_EMBEDDINGS_FILE} in {data_dir}: run prepare_data.py")
    with np.load(path) as stored:
        return {name: stored[name].astype(np.float32) for name in stored.files}
