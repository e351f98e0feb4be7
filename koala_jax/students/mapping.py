"""Which teacher block each student block comes from, and the one student builder.

The student's initialisation (`build_student`, used by both `convert_weights.py student` and
`train.py`) and the pairing of student and teacher features for distillation
(`koala_jax.train.losses.feature_pairs`) use this one mapping, `teacher_path_for`.

Rule (BK-SDM's, which KOALA follows; see docs/paper.md and `students.spec`):
- encoder stages keep the teacher's first `layers_per_block` (resnet, attention) pairs;
- decoder stages keep the first `n - 1` pairs and the teacher's *last* pair as the student's last,
  because the last pair of a decoder stage is the one whose skip input has the previous stage's width
  (so its weights only fit the student's last pair);
- a kept attention block keeps the teacher's first `depth` transformer blocks, or the blocks a spec lists
  (a `Selection`);
- every other module (embeddings, conv_in/out, samplers, the mid block's resnets and attention when kept)
  keeps its name.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from koala_jax.errors import ConfigError
from koala_jax.models.config import UNetConfig
from koala_jax.models.init import abstract_params, random_leaf
from koala_jax.models.naming import flax_path_to_torch_module
from koala_jax.students.presets import STUDENT_VARIANTS, derive_student_config
from koala_jax.students.spec import Selection, StudentSpec, decoder_source, load_spec, resolve

STUDENT_INITS = ("teacher", "random")


def teacher_path_for(
    student_path: str, teacher: UNetConfig, student: UNetConfig, selection: Mapping[str, tuple[int, ...]] | None = None
) -> str:
    """The teacher module path or state-dict key that student `student_path` comes from.

    'up_blocks.0.resnets.1.conv1.weight' -> 'up_blocks.0.resnets.2.conv1.weight' for SDXL -> KOALA;
    with `selection` {'down_blocks.2.attentions.0': (0, 4)}, 'down_blocks.2.attentions.0.transformer_blocks.1'
    -> 'down_blocks.2.attentions.0.transformer_blocks.4'.
    """
    parts = student_path.split(".")
    if "transformer_blocks" in parts:
        at = parts.index("transformer_blocks")
        chosen = (selection or {}).get(".".join(parts[:at]))
        if chosen and at + 1 < len(parts):
            parts[at + 1] = str(chosen[int(parts[at + 1])])
    if len(parts) >= 4 and parts[0] == "up_blocks" and parts[2] in ("resnets", "attentions"):
        i = int(parts[1])
        source = decoder_source(int(parts[3]), student.up_layers_per_block[i], teacher.up_layers_per_block[i])
        parts[3] = str(source)
    return ".".join(parts)


@dataclasses.dataclass
class Student:
    """A student derived from a teacher. `params` leaves are the teacher's own arrays (possibly lazy
    memory-mapped views: nothing is read until used) or fresh numpy arrays. Paths are written with
    dots and Flax leaf names ('up_blocks.0.resnets.1.conv1.kernel')."""

    config: UNetConfig
    params: dict
    mapping: dict[str, str]  # student parameter path -> teacher parameter path
    fresh: list[str]  # student parameter paths without a teacher source (randomly initialised)
    selection: Selection = dataclasses.field(default_factory=dict)  # listed teacher transformer blocks


def student_architecture(
    teacher_config: UNetConfig, student: str | StudentSpec | UNetConfig
) -> tuple[UNetConfig, Selection]:
    """(config, selection) of a KOALA variant name, a spec (object, .json path or inline JSON) or an
    explicit architecture."""
    if isinstance(student, UNetConfig):
        return student, {}
    if isinstance(student, StudentSpec):
        return resolve(student, teacher_config, f"student spec {student.name!r}")
    if student in STUDENT_VARIANTS:
        return derive_student_config(teacher_config, student), {}
    if not student.endswith(".json") and not student.lstrip().startswith("{"):
        raise ConfigError(
            f"unknown student {student!r}: give a variant ({', '.join(sorted(STUDENT_VARIANTS))}), a spec .json "
            f"file or inline JSON"
        )
    where = "inline student spec" if student.lstrip().startswith("{") else student
    return resolve(load_spec(student), teacher_config, where)


def build_student(
    teacher_config: UNetConfig,
    teacher_params: Mapping,
    student: str | StudentSpec | UNetConfig,
    init: str = "teacher",
    seed: int = 0,
) -> Student:
    """A student of the teacher: `student` is a KOALA variant name (derived from the teacher by
    `derive_student_config`), a spec (see `students.spec`) or an explicit architecture. Each parameter is
    copied from its teacher source when one of the same shape exists (`init='teacher'`), otherwise drawn
    by `random_leaf` (all of them with `init='random'`). Parameters are float32 whatever the teacher's dtype:
    they are the student's master weights (an fp16 teacher, e.g. a step-distilled export, must not make an
    fp16 student that the optimizer then updates in float32)."""
    if init not in STUDENT_INITS:
        raise ConfigError(f"student init {init!r}: choose from {', '.join(STUDENT_INITS)}")
    config, selection = student_architecture(teacher_config, student)
    teacher_flat = {flax_path_to_torch_module(k): v for k, v in flatten_dict(dict(teacher_params)).items()}
    rng = np.random.default_rng(seed)
    params, mapping, fresh = {}, {}, []
    for path, leaf in flatten_dict(abstract_params(config)).items():
        key = flax_path_to_torch_module(path)
        source = teacher_path_for(key, teacher_config, config, selection)
        value = teacher_flat.get(source) if init == "teacher" else None
        if value is not None and tuple(np.shape(value)) == tuple(leaf.shape):
            params[path], mapping[key] = np.asarray(value, leaf.dtype), source
        else:
            params[path] = random_leaf(path[-1], leaf.shape, leaf.dtype, rng)
            fresh.append(key)
    return Student(config, unflatten_dict(params), mapping, fresh, selection)


def mapping_lines(mapping: Mapping[str, str]) -> list[str]:
    """'student <- teacher' per module (attention projections, resnets, single transformer blocks), in
    the student's parameter order; a printable summary of the parameter-level mapping."""
    units: dict[str, str] = {}
    for student, teacher in mapping.items():
        units.setdefault(_unit(student), _unit(teacher))
    return [f"{s} <- {t}" + ("" if s == t else "   (renamed)") for s, t in sorted(units.items(), key=_natural)]


def _unit(path: str) -> str:
    """Module path up to the block that the student keeps or drops as a whole."""
    parts = path.split(".")
    for i, part in enumerate(parts[:-1]):
        if part in ("transformer_blocks", "resnets", "downsamplers", "upsamplers") and parts[i + 1].isdigit():
            return ".".join(parts[: i + 2])
    return ".".join(parts[:-1]) if parts[0] in ("down_blocks", "up_blocks", "mid_block") else parts[0]


def _natural(item: tuple[str, str]) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", item[0])]
