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
from collections.abc import Iterator
from pathlib import Path

import jax
import ml_collections

from koala_jax.errors import ConfigError, KoalaError
from koala_jax.models import UNetConfig
from koala_jax.train.identity import CHANGEABLE
from koala_jax.train.progressive import OBJECTIVES, PROGRESSIVE
from koala_jax.train.setup import SAME_AS_TEACHER, describe_models, student_models
from koala_jax.train.sharding import mesh_shape
from koala_jax.train.step_builder import step_settings
from koala_jax.weights.sources import is_hub_id
from koala_jax.weights.training_run import STUDENT_CONFIG, checkpoint_steps

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
    find_problems(cfg).raise_any()


def find_problems(cfg: ml_collections.ConfigDict, raw_input_ok: bool = False) -> Problems:
    """Every problem of `cfg`; `raw_input_ok`: a raw `data.source` is the data stage's to check (`data_stage`)."""
    problems = Problems()
    check_settings(cfg, problems)
    check_devices(cfg, problems)
    teacher, student = check_models(cfg, problems)
    check_data(cfg, teacher, problems, raw_input_ok)
    check_workdir(cfg, student, problems)
    return problems


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
    check_ranges(cfg, problems)
    weights = {"kd.task": cfg.kd.task, "kd.out": cfg.kd.out, "kd.feat": cfg.kd.feat}
    if any(w < 0 for w in weights.values()) or not any(weights.values()):
        problems.add(f"loss weights {weights}: none may be negative and one must be positive")
    unknown = [p for p in cfg.resume.allow_changes.split(",") if p.strip() and p.strip() not in CHANGEABLE]
    if unknown:
        problems.add(f"resume.allow_changes {cfg.resume.allow_changes!r}: choose among {', '.join(CHANGEABLE)}")
    with problems.collect(ValueError):  # the step's own settings, built as build_step builds them
        step_settings(cfg)
    check_objective(cfg, problems)


def check_ranges(cfg: ml_collections.ConfigDict, problems: Problems) -> None:
    """Values with a range: seeds, rates, probabilities, betas (before anything loads)."""
    ranges = (
        ("seed", cfg.seed, 0, 2**32 - 1, "a seed is a non-negative 32-bit integer"),
        ("optim.lr", cfg.optim.lr, 1e-30, None, "a learning rate is positive"),
        ("optim.warmup_steps", cfg.optim.warmup_steps, 0, None, ""),
        ("optim.b1", cfg.optim.b1, 0.0, 0.999999, ""),
        ("optim.b2", cfg.optim.b2, 0.0, 0.999999, ""),
        ("optim.weight_decay", cfg.optim.weight_decay, 0.0, 1.0, ""),
        ("optim.grad_clip", cfg.optim.grad_clip, 0.0, None, "0 turns clipping off"),
        ("data.caption_dropout", cfg.data.caption_dropout, 0.0, 1.0, "a probability"),
        ("noise.beta_start", cfg.noise.beta_start, 1e-8, 0.999, ""),
        ("noise.beta_end", cfg.noise.beta_end, cfg.noise.beta_start, 0.999, "at least noise.beta_start"),
        ("ema.decay", 0.0 if cfg.ema.decay is None else cfg.ema.decay, 0.0, 0.999999, "None turns EMA off"),
    )
    for name, value, low, high, why in ranges:
        if not (low <= value and (high is None or value <= high)):
            bound = f"in [{low:g}, {high:g}]" if high is not None else f"at least {low:g}"
            problems.add(f"{name} {value!r} must be {bound}" + (f" ({why})" if why else ""))


def check_objective(cfg: ml_collections.ConfigDict, problems: Problems) -> None:
    """`objective` is known; progressive distillation has one loss (the two-step teacher's epsilon: no output or
    feature KD term), its own timesteps, and a round that fits the schedule (`ProgressiveDistillation`)."""
    if cfg.objective.kind not in OBJECTIVES:
        problems.add(f"objective {cfg.objective.kind!r}: choose from {', '.join(OBJECTIVES)}")
    if cfg.objective.kind != PROGRESSIVE:
        return
    if cfg.kd.out or cfg.kd.feat:
        problems.add(
            f"objective 'progressive' regresses the two-step teacher only: set kd.out=0 and kd.feat=0 (given "
            f"{cfg.kd.out} and {cfg.kd.feat})"
        )
    if cfg.noise.timesteps:
        problems.add("objective 'progressive' trains on its own steps (objective.steps): unset noise.timesteps")


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
    is only resolved when downloaded); a wrong student still lets the data be checked against the teacher."""
    if is_hub_id(cfg.teacher.source) and not os.path.exists(cfg.teacher.source):
        return None, None
    teacher = None
    with problems.collect():
        teacher = describe_models(cfg.teacher.source, SAME_AS_TEACHER).teacher
    if teacher is None or cfg.student.variant == SAME_AS_TEACHER:
        return teacher, teacher
    with problems.collect():
        return teacher, student_models(teacher, cfg.student.variant).student
    return teacher, None


def check_data(
    cfg: ml_collections.ConfigDict, teacher: UNetConfig | None, problems: Problems, raw_input_ok: bool
) -> None:
    """data.source exists, and its records were encoded for this teacher (a raw input: `data_stage`)."""
    from koala_jax.data import schema  # tfds metadata: only where a dataset is named

    data = cfg.data
    if data.source == "synthetic":
        if data.synthetic.records < jax.process_count() or min(data.synthetic.latent_size, data.synthetic.text_len) < 1:
            problems.add("data.synthetic.records, latent_size and text_len must be positive")
        return
    prepared = os.path.join(data.source, schema.DATASET_INFO_FILE)
    if os.path.isfile(prepared):
        check_encoded_for(data.source, teacher, problems)
    elif os.path.isfile(os.path.join(data.source, schema.PREPARE_CONFIG_FILE)):
        problems.add(
            f"data.source {data.source}: an unfinished preparation (no {schema.DATASET_INFO_FILE}); rerun the "
            "prepare_data.py command to finish it"
        )
    elif not raw_input_ok:
        problems.add(
            f"data.source {data.source}: not a prepared dataset; train.py encodes raw inputs before training "
            "(koala_jax.train.data_stage), or prepare it with prepare_data.py"
        )


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
