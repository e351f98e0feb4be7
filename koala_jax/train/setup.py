"""Everything a run needs before its first step: processes, teacher and student, the Flax modules and
their feature pairs, the record source, and arrays laid out on the mesh."""

from __future__ import annotations

import dataclasses
import os

import jax
import ml_collections
import numpy as np
import optax

from koala_jax.dtypes import dtype
from koala_jax.errors import ConfigError
from koala_jax.models import ForwardOptions, UNet2DConditionModel, UNetConfig, abstract_params, dummy_inputs
from koala_jax.students import Student, build_student
from koala_jax.train.losses import LossWeights, feature_pairs
from koala_jax.train.noise import NoiseSchedule
from koala_jax.train.preview import euler_schedule
from koala_jax.train.progressive import PROGRESSIVE, ProgressiveDistillation
from koala_jax.train.sharding import reading_sharding
from koala_jax.train.state import make_optimizer
from koala_jax.train.step import StepConfig
from koala_jax.weights import read_source
from koala_jax.weights.checks import ValueChecker, is_float, nonfinite
from koala_jax.weights.pipeline_dir import default_image_size, is_pipeline_dir
from koala_jax.weights.safetensors import read_slice
from koala_jax.weights.state_dict import flax_path_to_torch_key


def setup_distributed(cfg: ml_collections.ConfigDict) -> None:
    """Join the other processes of a multi-host run (a no-op for one process)."""
    if cfg.auto:
        jax.distributed.initialize()
    elif cfg.coordinator:
        if jax.config.jax_platforms in (None, "", "cpu"):
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(cfg.coordinator, num_processes=cfg.num_processes, process_id=cfg.process_id)


# student.variant of plain diffusion training or fine-tuning: the model trained is the teacher's own architecture
# (initialised from its weights, or randomly with student.init='random'), usually with the task loss only.
SAME_AS_TEACHER = "same"


def load_models(cfg: ml_collections.ConfigDict) -> tuple[UNetConfig, dict, Student]:
    """(teacher config, teacher host params, student): the teacher from any source `read_source` reads,
    the student its KOALA variant initialised from it (the same builder as `convert_weights.py student`)."""
    # Values are checked as each host places its slices (`place(check=...)`), not here: a host reads only those.
    teacher_config, teacher_params = read_source(cfg.teacher.source, seed=cfg.seed, check_values=False)
    architecture = teacher_config if cfg.student.variant == SAME_AS_TEACHER else cfg.student.variant
    student = build_student(teacher_config, teacher_params, architecture, cfg.student.init, seed=cfg.seed + 1)
    return teacher_config, teacher_params, student


def forward_options(cfg: ml_collections.ConfigDict) -> ForwardOptions:
    """How the student computes (`compute.*`) and which features it captures for feature KD (`kd.features`)."""
    c = cfg.compute
    return ForwardOptions(
        dtype=dtype(c.dtype),
        remat=tuple(c.remat),
        remat_policy=c.remat_policy,
        attention_impl=c.attention_impl,
        attention_block_q=c.attention_block_q,
        attention_block_kv=c.attention_block_kv,
        capture=tuple(cfg.kd.features) if cfg.kd.feat else (),
    )


def make_models(
    cfg: ml_collections.ConfigDict,
    teacher_config: UNetConfig,
    student_config: UNetConfig,
    selection: dict[str, tuple[int, ...]] | None = None,
) -> tuple[UNet2DConditionModel, UNet2DConditionModel, dict[str, str]]:
    """(teacher, student, feature pairs). The teacher needs no remat: it is never differentiated.
    `selection`: the teacher blocks a student spec lists (`Student.selection`)."""
    opts = forward_options(cfg)
    capture = opts.capture
    teacher = UNet2DConditionModel(teacher_config, dataclasses.replace(opts, remat=()))
    student = UNet2DConditionModel(student_config, opts)

    def feature_shapes(model: UNet2DConditionModel) -> dict[str, tuple]:
        variables = {"params": abstract_params(model.config, model.opts)}
        _, feats = jax.eval_shape(
            lambda v: model.apply_with_features(v, *dummy_inputs(model.config, size=16)), variables
        )
        return {k: v.shape for k, v in feats.items()}

    pairs = (
        feature_pairs(
            feature_shapes(student),
            feature_shapes(teacher),
            teacher_config,
            student_config,
            cfg.kd.feature_regex,
            selection,
        )
        if capture
        else {}
    )
    return teacher, student, pairs


def train_optimizer(cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """The run's optimizer (`state.make_optimizer` with the run's length, which a cosine schedule needs)."""
    return make_optimizer(ml_collections.ConfigDict({**cfg.optim.to_dict(), "total_steps": cfg.total_steps}))


def noise_schedule(n: ml_collections.ConfigDict) -> NoiseSchedule:
    """The training noise schedule of `noise.*`."""
    return NoiseSchedule(
        n.num_train_timesteps, n.beta_start, n.beta_end, n.prediction_type, tuple(n.timesteps) if n.timesteps else None
    )


def progressive_round(cfg: ml_collections.ConfigDict, schedule: NoiseSchedule) -> ProgressiveDistillation | None:
    """The progressive distillation round of `objective='progressive'` (None for KOALA's objective): Euler on the
    training schedule with trailing spacing, as the step-distilled model is sampled."""
    if cfg.objective != PROGRESSIVE:
        return None
    return ProgressiveDistillation(euler_schedule(schedule), cfg.progressive.steps, cfg.progressive.guidance)


def make_step_config(
    cfg: ml_collections.ConfigDict,
    teacher: UNet2DConditionModel,
    student: UNet2DConditionModel,
    pairs: dict[str, str],
    optimizer: optax.GradientTransformation,
) -> StepConfig:
    """The training step's settings: loss weights, noise schedule, EMA, caption dropout, accumulation, and the
    progressive distillation round of `objective='progressive'`. The loop runs it and the planner (plan.py) compiles
    the same."""
    schedule = noise_schedule(cfg.noise)
    return StepConfig(
        student=student,
        teacher=teacher,
        schedule=schedule,
        progressive=progressive_round(cfg, schedule),
        weights=LossWeights(cfg.kd.task, cfg.kd.out, cfg.kd.feat),
        pairs=pairs,
        optimizer=optimizer,
        ema_decay=cfg.ema_decay,
        caption_dropout=cfg.data.caption_dropout,
        grad_accum=cfg.optim.grad_accum,
    )


def make_source(cfg: ml_collections.ConfigDict, teacher: UNetConfig, workdir: str, teacher_source: str):
    """The record source: a prepared dataset folder, synthetic records shaped for `teacher`, or any input that
    prepare_data.py takes (an image folder, table, webdataset, tfds or `world:` spec), encoded once into
    `<workdir>/data` with the JAX encoders of `data.encoders` (default: the teacher's pipeline folder)."""
    # grain and tfds only where records are read: the planner (plan.py) builds the step without them.
    from koala_jax.data import SyntheticSource, open_source, schema

    if cfg.source == "synthetic":
        size = cfg.synthetic_latent_size
        return SyntheticSource(
            cfg.synthetic_records,
            (teacher.in_channels, size, size),
            cfg.synthetic_text_len,
            teacher.cross_attention_dim[0],
            teacher.pooled_text_dim,
        )
    if os.path.isdir(cfg.source) and os.path.exists(os.path.join(cfg.source, schema.DATASET_INFO_FILE)):
        return open_source(cfg.source)
    return open_source(prepare_on_the_fly(cfg, os.path.join(workdir, "data"), cfg.encoders or teacher_source))


def prepare_on_the_fly(cfg: ml_collections.ConfigDict, output_dir: str, encoders: str) -> str:
    """Encode the raw input `cfg.source` into `output_dir` with prepare_data.py's machinery (JAX backend: no torch)
    unless it is already there; a rerun resumes or reuses it, and other settings are refused by name."""
    from koala_jax.data import ingest, prepare, schema  # The preparation layer: only for raw inputs.

    if jax.process_count() > 1:
        raise ConfigError(
            f"data.source {cfg.source!r} is not a prepared dataset: with several processes, prepare it "
            f"first (prepare_data.py --input {cfg.source} --output-dir ...)"
        )
    if not is_pipeline_dir(encoders):
        raise ConfigError(
            f"data.source {cfg.source!r} needs the teacher's VAE and text encoders: data.encoders "
            f"(default teacher.source) {encoders!r} is not a diffusers pipeline folder"
        )
    config = on_the_fly_config(cfg, output_dir, encoders)
    collection = ingest.open_collection(cfg.source)
    if os.path.exists(os.path.join(output_dir, schema.DATASET_INFO_FILE)):
        prepare.check_settings(output_dir, config.content_settings(collection))  # Same input and settings, or stop.
    else:
        print(f"preparing {cfg.source} with the encoders of {encoders} into {output_dir} (once)", flush=True)
        prepare.prepare_dataset(collection, config)
    return output_dir


def on_the_fly_config(cfg: ml_collections.ConfigDict, output_dir: str, encoders: str):
    """The `prepare.PrepareConfig` of raw input `cfg.source` encoded into `output_dir` (JAX encoders of `encoders`)."""
    from koala_jax.data import prepare

    resolution = cfg.resolution or default_image_size(encoders)
    return prepare.PrepareConfig(
        output_dir=output_dir, teacher=encoders, resolution=resolution, backend="jax", batch_size=64
    )


def place(tree, shardings, cast=None, check: object | None = None):
    """Host arrays -> global jax arrays with the given shardings. Each process reads only the slices of its own
    devices, cut where a checkpoint's tensor is contiguous in its file (`sharding.reading_sharding`, then
    resharded on the devices), with one read each (`read_slice`: no page-fault read-around), and casts them
    slice by slice, so a memory-mapped checkpoint is never read whole on a host.

    `check` (where the arrays come from): refuse NaN/Inf values in what is placed, after the cast (so a
    down-cast that overflows counts), as one error naming the tensors; each host checks the slices it reads.
    """
    counts: dict[str, list[int]] = {}

    def put(path, x, sharding):
        x = np.asarray(x)  # a memory map, or a transposed view of one, stays a view: nothing is read yet
        name = flax_path_to_torch_key(tuple(getattr(k, "key", k) for k in path)) if check is not None else ""
        seen: set[str] = set()

        def read(index):
            part = read_slice(x, index)
            if cast is not None:
                with np.errstate(over="ignore", invalid="ignore"):  # with `check`, reported below by name
                    part = part.astype(cast)
            if check is not None and is_float(part.dtype) and repr(index) not in seen:  # replicas count once
                seen.add(repr(index))
                nan, inf = nonfinite(part)
                total = counts.setdefault(name, [0, 0])
                total[0], total[1] = total[0] + nan, total[1] + inf
            return part

        read_as = reading_sharding(path, x.shape, sharding)
        placed = jax.make_array_from_callback(x.shape, read_as, read)
        return placed if read_as == sharding else jax.device_put(placed, sharding)  # reshard on the devices

    placed = jax.tree_util.tree_map_with_path(put, tree, shardings)
    if check is not None:
        checker = ValueChecker(check)
        for name, (nan, inf) in counts.items():
            checker.record(name, nan, inf)
        checker.done()
    return placed
