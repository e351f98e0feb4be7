"""Everything a run needs before its first step that reads or writes something: the other processes, the teacher's
and the student's weights, the record source, and arrays laid out on the mesh. The step itself is assembled in
`step_builder` from configs alone."""

from __future__ import annotations

import os

import jax
import ml_collections
import numpy as np

from koala_jax.errors import ConfigError
from koala_jax.models import UNetConfig
from koala_jax.students import Student, build_student, student_architecture
from koala_jax.train.sharding import reading_sharding
from koala_jax.train.step_builder import DataShape, Models, TrainStep
from koala_jax.weights import read_source, source_config
from koala_jax.weights.checks import ValueChecker, is_float, nonfinite
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


def describe_models(teacher_source: str, variant: str) -> Models:
    """The teacher's and the student's architectures from their configs alone (no weights read)."""
    teacher, note = source_config(teacher_source)
    return student_models(teacher, variant, note)


def student_models(teacher: UNetConfig, variant: str, note: str = "") -> Models:
    """`teacher` and its student `variant` (a preset, a spec, or 'same')."""
    if variant == SAME_AS_TEACHER:
        return Models(teacher, teacher, {}, note)
    student, selection = student_architecture(teacher, variant)
    return Models(teacher, student, selection, note)


def load_models(teacher: ml_collections.ConfigDict, student: ml_collections.ConfigDict, seed: int):
    """(models, teacher host params, student): the teacher from any source `read_source` reads (`teacher.source`),
    the student its variant (`student.variant`) initialised from it (`student.init`; the same builder as
    `convert_weights.py student`)."""
    # Values are checked as each host places its slices (`place(check=...)`), not here: a host reads only those.
    teacher_config, teacher_params = read_source(teacher.source, seed=seed, check_values=False)
    architecture = teacher_config if student.variant == SAME_AS_TEACHER else student.variant
    built: Student = build_student(teacher_config, teacher_params, architecture, student.init, seed=seed + 1)
    return Models(teacher_config, built.config, built.selection or {}, teacher.source), teacher_params, built


def make_source(data: ml_collections.ConfigDict, models: Models):
    """The record source of `data.*`: a prepared dataset folder or synthetic records shaped for the teacher (raw
    inputs are encoded into a prepared dataset before training: `data_stage`)."""
    # grain and tfds only where records are read: the planner (plan.py) builds the step without them.
    from koala_jax.data import SyntheticSource, open_source, schema

    if data.source == "synthetic":
        size, teacher = data.synthetic.latent_size, models.teacher
        return SyntheticSource(
            data.synthetic.records,
            (teacher.in_channels, size, size),
            data.synthetic.text_len,
            teacher.cross_attention_dim[0],
            teacher.pooled_text_dim,
        )
    if not os.path.isfile(os.path.join(data.source, schema.DATASET_INFO_FILE)):  # preflight said so already
        raise ConfigError(f"data.source {data.source}: not a prepared dataset")
    return open_source(data.source)


def record_shape(source) -> DataShape:
    """The shape of the records the loop will train on (the planner computes the same from configs alone,
    `step_builder.data_shape`: a test checks they agree on every shipped config)."""
    example = source[0]
    latents, text = example["latents"].shape, example["prompt_embeds"].shape[0]
    return DataShape(tuple(latents), text, int(example["target_size"][0]) // latents[1], "records")


def place_teacher(step: TrainStep, host_params: dict, source: str) -> dict:
    """The frozen teacher on the mesh, in its step's shardings and dtype, its values checked as they are placed;
    {} where the step never runs it (plain diffusion training: it then takes no memory)."""
    if step.teacher_dtype is None:
        return {}
    return place(host_params, step.shardings(step.inputs.teacher_params), step.teacher_dtype, check=source)


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
