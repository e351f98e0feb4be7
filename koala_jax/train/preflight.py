"""What train.py checks before it reads a weight, compiles a step or writes a file, so that a mistake costs
seconds rather than a teacher load (minutes at full size) and leaves the workdir as it was: every setting,
the teacher's and the student's architectures (configs only), the mesh against the devices, the batch
against the mesh, the data against the teacher (a prepared dataset's tfds features metadata: no record is
read) and an existing run in the workdir against this one. Every problem found is raised together, as one
ConfigError, rather than one per attempt.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from collections.abc import Iterator
from pathlib import Path

import jax
import ml_collections

from koala_jax.dtypes import dtype
from koala_jax.errors import ConfigError, KoalaError
from koala_jax.models import UNetConfig
from koala_jax.students import student_architecture
from koala_jax.train.progressive import OBJECTIVES, PROGRESSIVE
from koala_jax.train.setup import (
    SAME_AS_TEACHER,
    forward_options,
    noise_schedule,
    on_the_fly_config,
    progressive_round,
)
from koala_jax.train.sharding import mesh_shape
from koala_jax.weights import source_config
from koala_jax.weights.export import check_pipeline
from koala_jax.weights.pipeline_dir import is_pipeline_dir
from koala_jax.weights.training_run import STUDENT_CONFIG, checkpoint_steps

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_STUDENT_INITS = ("teacher", "random")
_SCHEDULES = ("constant", "cosine")


class Problems:
    """The problems found so far; `collect` turns a KoalaError raised by a check into one of them."""

    def __init__(self) -> None:
        self.found: list[str] = []

    def add(self, problem: str) -> None:
        self.found.append(problem)

    @contextlib.contextmanager
    def collect(self, *also: type[Exception]) -> Iterator[None]:
        """Record a KoalaError (or one of `also`) raised in the block as a problem and go on after it."""
        try:
            yield
        except (KoalaError, *also) as e:
            self.found.append(str(e))

    def raise_any(self) -> None:
        if len(self.found) == 1:
            raise ConfigError(self.found[0])
        if self.found:
            raise ConfigError(
                f"{len(self.found)} problems: " + "; ".join(f"({i}) {p}" for i, p in enumerate(self.found, 1))
            )


def check_run(cfg: ml_collections.ConfigDict) -> None:
    """Raise one ConfigError listing every problem of `cfg` that can be known before loading anything
    (call after `setup_distributed`: the mesh is checked against the devices of every process)."""
    problems = Problems()
    check_settings(cfg, problems)
    check_devices(cfg, problems)
    teacher, student = check_models(cfg, problems)
    check_data(cfg, teacher, problems)
    check_workdir(cfg, student, problems)
    problems.raise_any()


def check_settings(cfg: ml_collections.ConfigDict, problems: Problems) -> None:
    """Numbers in range and names among the choices."""
    minimum = {
        "total_steps": (cfg.total_steps, 1),
        "log_every": (cfg.log_every, 1),
        "ckpt.every": (cfg.ckpt.every, 1),
        "ckpt.keep": (cfg.ckpt.keep, 1),
        "optim.grad_accum": (cfg.optim.grad_accum, 1),
        "data.num_workers": (cfg.data.num_workers, 0),
        "sample.every": (cfg.sample.every, 0),
    }
    for name, (value, low) in minimum.items():
        if value < low:
            problems.add(f"{name} {value} must be at least {low}")
    for name, value, choices in (
        ("optim.schedule", cfg.optim.schedule, _SCHEDULES),
        ("student.init", cfg.student.init, _STUDENT_INITS),
    ):
        if value not in choices:
            problems.add(f"{name} {value!r}: choose from {', '.join(choices)}")
    if cfg.ema_decay is not None and not 0.0 <= cfg.ema_decay < 1.0:
        problems.add(f"ema_decay {cfg.ema_decay} must be in [0, 1) (or None: no EMA)")
    weights = {"kd.task": cfg.kd.task, "kd.out": cfg.kd.out, "kd.feat": cfg.kd.feat}
    if any(w < 0 for w in weights.values()) or not any(weights.values()):
        problems.add(f"loss weights {weights}: none may be negative and one must be positive")
    with problems.collect(ValueError):  # ForwardOptions: dtypes, remat, attention, feature kinds
        forward_options(cfg)
    check_objective(cfg, problems)
    with problems.collect():
        dtype(cfg.teacher.param_dtype)
    if cfg.eval.prompts and not is_pipeline_dir(cfg.eval.pipeline or cfg.teacher.source):
        problems.add(
            f"eval.prompts needs a pipeline folder for the VAE and text encoders: eval.pipeline (default "
            f"teacher.source) {cfg.eval.pipeline or cfg.teacher.source!r} is not one"
        )


def check_objective(cfg: ml_collections.ConfigDict, problems: Problems) -> None:
    """`objective` is known; progressive distillation has one loss (the two-step teacher's epsilon: no output or
    feature KD term), its own timesteps, and a round that fits the schedule (`ProgressiveDistillation`)."""
    if cfg.objective not in OBJECTIVES:
        problems.add(f"objective {cfg.objective!r}: choose from {', '.join(OBJECTIVES)}")
    if cfg.objective != PROGRESSIVE:
        return
    if cfg.kd.out or cfg.kd.feat:
        problems.add(
            f"objective 'progressive' regresses the two-step teacher only: set kd.out=0 and kd.feat=0 (given "
            f"{cfg.kd.out} and {cfg.kd.feat})"
        )
    if cfg.noise.timesteps:
        problems.add("objective 'progressive' trains on its own steps (progressive.steps): unset noise.timesteps")
    with problems.collect(ValueError):  # NoiseSchedule: the prediction type
        progressive_round(cfg, noise_schedule(cfg.noise))


def check_devices(cfg: ml_collections.ConfigDict, problems: Problems) -> None:
    """The mesh covers the devices exactly and the batch (split over every device, and into optim.grad_accum
    micro-batches) splits evenly."""
    devices, processes = jax.device_count(), jax.process_count()
    with problems.collect():
        mesh_shape(cfg.mesh.data, cfg.mesh.fsdp, devices)
    batch, accum = cfg.data.global_batch_size, max(cfg.optim.grad_accum, 1)
    multiple = math.lcm(devices, processes, accum)
    if batch < 1:
        problems.add(f"data.global_batch_size {batch} must be at least 1")
    elif batch % multiple:
        problems.add(
            f"data.global_batch_size {batch} does not split over the {devices} device(s) of {processes} process(es)"
            f"{f' into optim.grad_accum={accum} micro-batches' if accum > 1 else ''}: use a multiple of {multiple}"
        )


def check_models(cfg: ml_collections.ConfigDict, problems: Problems) -> tuple[UNetConfig | None, UNetConfig | None]:
    """(teacher config, student config) from configs alone (None where unknown: a problem, or a hub id that
    is only resolved when downloaded)."""
    source = cfg.teacher.source
    if _HUB_ID.match(source) and not os.path.exists(source):
        return None, None
    teacher = None
    with problems.collect():
        teacher = source_config(source)[0]
    if teacher is None or cfg.student.variant == SAME_AS_TEACHER:
        return teacher, teacher
    with problems.collect():
        return teacher, student_architecture(teacher, cfg.student.variant)[0]
    return teacher, None


def check_data(cfg: ml_collections.ConfigDict, teacher: UNetConfig | None, problems: Problems) -> None:
    """data.source exists, and its records were (or will be) encoded for this teacher."""
    from koala_jax.data import schema  # tfds metadata: only where a dataset is named

    data = cfg.data
    if data.source == "synthetic":
        if data.synthetic_records < jax.process_count() or min(data.synthetic_latent_size, data.synthetic_text_len) < 1:
            problems.add("data.synthetic_records, synthetic_latent_size and synthetic_text_len must be positive")
        return
    prepared = os.path.join(data.source, schema.DATASET_INFO_FILE)
    if os.path.isfile(prepared):
        check_encoded_for(data.source, teacher, problems)
    elif os.path.isfile(os.path.join(data.source, schema.PREPARE_CONFIG_FILE)):
        problems.add(
            f"data.source {data.source}: an unfinished preparation (no {schema.DATASET_INFO_FILE}); rerun the "
            "prepare_data.py command to finish it"
        )
    else:
        check_raw_input(cfg, teacher, problems)


def check_raw_input(cfg: ml_collections.ConfigDict, teacher: UNetConfig | None, problems: Problems) -> None:
    """A raw input to encode into <workdir>/data: readable, with encoders that fit the teacher, and the same
    settings as an earlier encoding there."""
    from koala_jax.data import ingest, prepare, schema

    data = cfg.data
    if jax.process_count() > 1:
        problems.add(
            f"data.source {data.source!r} is not a prepared dataset: with several processes, prepare it first "
            f"(prepare_data.py --input {data.source} --output-dir ...)"
        )
        return
    collection = None
    with problems.collect():
        collection = ingest.open_collection(data.source)
    if collection is None:  # A path that is wrong says nothing about the encoders.
        return
    encoders = data.encoders or cfg.teacher.source
    if not is_pipeline_dir(encoders):
        problems.add(
            f"data.source {data.source!r} needs the teacher's VAE and text encoders: data.encoders (default "
            f"teacher.source) {encoders!r} is not a diffusers pipeline folder"
        )
        return
    if teacher is not None:
        with problems.collect():
            check_pipeline(Path(encoders), teacher)
    output_dir = os.path.join(cfg.workdir, "data")
    if os.path.isfile(os.path.join(output_dir, schema.DATASET_INFO_FILE)):
        check_encoded_for(output_dir, teacher, problems)
    with problems.collect():
        config = on_the_fly_config(data, output_dir, encoders)
        problems.found += config.problems()
        prepare.check_settings(output_dir, config.content_settings(collection))


def check_encoded_for(data_dir: str, teacher: UNetConfig | None, problems: Problems) -> None:
    """The record shapes in a prepared dataset's features metadata against what the teacher consumes."""
    from koala_jax.data import schema

    features = None
    with problems.collect(OSError, ValueError):  # tfds reading a damaged dataset_info.json / features.json
        features = schema.read_tfds_info(data_dir)[0]
    if not os.path.isfile(os.path.join(data_dir, schema.NULL_EMBEDDINGS_FILE)):
        problems.add(f"{data_dir}: no {schema.NULL_EMBEDDINGS_FILE}; rerun prepare_data.py to finish it")
    if features is None or teacher is None:
        return
    found = {
        "latent channels": features["latents"].shape[0],
        "text embedding width": features["prompt_embeds"].shape[-1],
        "pooled text embedding width": features["pooled_prompt_embeds"].shape[-1],
    }
    wanted = {
        "latent channels": teacher.in_channels,
        "text embedding width": teacher.cross_attention_dim[0],
        "pooled text embedding width": teacher.pooled_text_dim,
    }
    wrong = [f"{k} {found[k]} (the teacher takes {wanted[k]})" for k in found if found[k] != wanted[k]]
    if wrong:
        problems.add(
            f"data.source {data_dir} was encoded for another teacher: {', '.join(wrong)}; prepare it with this "
            f"teacher's VAE and text encoders"
        )


def check_workdir(cfg: ml_collections.ConfigDict, student: UNetConfig | None, problems: Problems) -> None:
    """The workdir is a folder, and a run saved there trains the same student (before anything overwrites its
    student_config.json)."""
    workdir = Path(cfg.workdir)
    if workdir.exists() and not workdir.is_dir():
        problems.add(f"workdir {workdir} is a file, not a folder")
        return
    saved = workdir / STUDENT_CONFIG
    if student is None or not saved.is_file() or not checkpoint_steps(workdir):
        return
    with problems.collect(ValueError):
        before = UNetConfig.from_diffusers(json.loads(saved.read_text())).to_diffusers()
        now = student.to_diffusers()
        changed = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
        if changed:
            shown = ", ".join(f"{k} {before.get(k)!r} then, {now.get(k)!r} now" for k in changed[:4])
            problems.add(
                f"{workdir} holds checkpoints of another student ({saved.name}: {shown}"
                f"{', ...' if len(changed) > 4 else ''}); resume with that run's student.variant and teacher, "
                f"or use another workdir"
            )
