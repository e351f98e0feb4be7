"""Raw inputs become a prepared dataset before training. train.py takes any input prepare_data.py takes (an image
folder, a table, webdataset shards, tfds, `world:<records>`) as `data.source`, encodes it once into
<workdir>/data with the JAX encoders of `data.encoders` (default: the teacher's pipeline folder; no torch), and
then trains on that folder. A rerun reuses or resumes the encoding; other settings are refused by name.

It is a stage of its own, as prepare_data.py is a command of its own: the training loop trains on prepared or
synthetic records only. Everything about the input is checked before anything is encoded.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import ml_collections

from koala_jax.console import info
from koala_jax.errors import ConfigError
from koala_jax.train.preflight import Problems, check_encoded_for, find_problems
from koala_jax.train.setup import describe_models
from koala_jax.weights.export import check_pipeline
from koala_jax.weights.pipeline_dir import default_image_size, is_pipeline_dir

OUTPUT_DIR = "data"  # <workdir>/data


def is_raw_input(data: ml_collections.ConfigDict) -> bool:
    """Whether `data.source` is neither synthetic records nor a prepared dataset (nor an unfinished one)."""
    from koala_jax.data import schema

    if data.source == "synthetic":
        return False
    markers = (schema.DATASET_INFO_FILE, schema.PREPARE_CONFIG_FILE)
    return not any(os.path.isfile(os.path.join(data.source, marker)) for marker in markers)


def prepare_raw_input(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`cfg` itself for synthetic or prepared data; for a raw input, every setting and the input are checked (one
    ConfigError listing every problem), the input is encoded into <workdir>/data unless it is there, and a copy of
    `cfg` whose `data.source` is that folder is returned."""
    if not is_raw_input(cfg.data):
        return cfg
    problems = find_problems(cfg, raw_input_ok=True)
    check_raw_input(cfg, problems)
    problems.raise_any()
    prepared = copy.deepcopy(cfg)
    prepared.data.source = prepare_on_the_fly(cfg.data, os.path.join(cfg.workdir, OUTPUT_DIR), cfg.teacher.source)
    return prepared


def raw_input_problem(data: ml_collections.ConfigDict, teacher_source: str, processes: int) -> str | None:
    """Why raw input `data.source` cannot be encoded on the fly here, or None."""
    if processes > 1:
        return (
            f"data.source {data.source!r} is not a prepared dataset: with several processes, prepare it first "
            f"(prepare_data.py --input {data.source} --output-dir ...)"
        )
    encoders = data.encoders or teacher_source
    if not is_pipeline_dir(encoders):
        return (
            f"data.source {data.source!r} needs the teacher's VAE and text encoders: data.encoders (default "
            f"teacher.source) {encoders!r} is not a diffusers pipeline folder"
        )
    return None


def check_raw_input(cfg: ml_collections.ConfigDict, problems: Problems) -> None:
    """A raw input to encode into <workdir>/data: readable, with encoders that fit the teacher, and the same
    settings as an earlier encoding there."""
    from koala_jax.data import ingest, prepare, schema

    data = cfg.data
    several = bool(cfg.distributed.auto or cfg.distributed.coordinator) and cfg.distributed.num_processes != 1
    problem = raw_input_problem(data, cfg.teacher.source, 2 if several else 1)
    if problem and several:
        problems.add(problem)
        return
    collection = None
    with problems.collect():
        collection = ingest.open_collection(data.source)
    if collection is None:  # A path that is wrong says nothing about the encoders.
        return
    if problem:
        problems.add(problem)
        return
    encoders = data.encoders or cfg.teacher.source
    teacher = None
    with problems.collect():
        teacher = describe_models(cfg.teacher.source, cfg.student.variant).teacher
    if teacher is not None:
        with problems.collect():
            check_pipeline(Path(encoders), teacher)
    output_dir = os.path.join(cfg.workdir, OUTPUT_DIR)
    if os.path.isfile(os.path.join(output_dir, schema.DATASET_INFO_FILE)):
        check_encoded_for(output_dir, teacher, problems)
    with problems.collect():
        config = on_the_fly_config(data, output_dir, encoders)
        problems.found += config.problems()
        prepare.check_settings(output_dir, config.content_settings(collection))


def prepare_on_the_fly(data: ml_collections.ConfigDict, output_dir: str, teacher_source: str) -> str:
    """Encode the raw input `data.source` into `output_dir` with prepare_data.py's machinery (JAX backend: no torch)
    unless it is already there; a rerun resumes or reuses it, and other settings are refused by name."""
    from koala_jax.data import ingest, prepare, schema  # The preparation layer: only for raw inputs.

    problem = raw_input_problem(data, teacher_source, 1)
    if problem:
        raise ConfigError(problem)
    encoders = data.encoders or teacher_source
    config = on_the_fly_config(data, output_dir, encoders)
    collection = ingest.open_collection(data.source)
    if os.path.exists(os.path.join(output_dir, schema.DATASET_INFO_FILE)):
        prepare.check_settings(output_dir, config.content_settings(collection))  # Same input and settings, or stop.
    else:
        info(f"preparing {data.source} with the encoders of {encoders} into {output_dir} (once)")
        prepare.prepare_dataset(collection, config)
    return output_dir


def on_the_fly_config(data: ml_collections.ConfigDict, output_dir: str, encoders: str):
    """The `prepare.PrepareConfig` of raw input `data.source` encoded into `output_dir` (JAX encoders of
    `encoders`)."""
    from koala_jax.data import prepare

    resolution = data.resolution or default_image_size(encoders)
    return prepare.PrepareConfig(
        output_dir=output_dir, teacher=encoders, resolution=resolution, backend="jax", batch_size=64
    )
