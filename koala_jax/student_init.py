"""Which teacher block each student block comes from: the student's initialisation and the pairing of
student and teacher features for distillation use this one mapping.

Rule (BK-SDM's, which KOALA follows; see docs/paper.md):
- encoder stages keep the teacher's first `layers_per_block` (resnet, attention) pairs;
- decoder stages keep the first `n - 1` pairs and the teacher's *last* pair as the student's last,
  because the last pair of a decoder stage is the one whose skip input has the previous stage's width
  (so its weights only fit the student's last pair);
- a kept attention block keeps the teacher's first `depth` transformer blocks;
- every other module (embeddings, conv_in/out, samplers, mid block when kept) keeps its name.
"""

from __future__ import annotations

import math

import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from koala_jax.models.config import UNetConfig
from koala_jax.naming import flax_path_to_torch_module


def teacher_path_for(student_path: str, teacher: UNetConfig, student: UNetConfig) -> str:
    """The teacher module path or state-dict key that student `student_path` comes from.

    'up_blocks.0.resnets.1.conv1.weight' -> 'up_blocks.0.resnets.2.conv1.weight' for SDXL -> KOALA.
    """
    parts = student_path.split(".")
    if len(parts) >= 4 and parts[0] == "up_blocks" and parts[2] in ("resnets", "attentions"):
        stage = len(student.block_out_channels) - 1 - int(parts[1])
        student_last = student.layers_per_block[stage]  # decoder stages have layers_per_block + 1 pairs
        if int(parts[3]) == student_last:
            parts[3] = str(teacher.layers_per_block[stage])
    return ".".join(parts)


def _flax_key(path: tuple[str, ...]) -> str:
    return flax_path_to_torch_module(path)


def init_student_from_teacher(teacher_params: dict, teacher: UNetConfig, student: UNetConfig,
                              fresh_params: dict) -> tuple[dict, dict[str, str], list[str]]:
    """Student params copied from the teacher where a source of the same shape exists.

    `fresh_params` is a randomly initialised student (its values are used only where the teacher has
    no matching tensor). Returns (params, {student path: teacher path}, [fresh student paths]); paths
    are written with dots, the Flax leaf names kept ('up_blocks.0.resnets.1.conv1.kernel').
    """
    teacher_flat = {_flax_key(k): v for k, v in flatten_dict(teacher_params).items()}
    out, mapping, fresh = {}, {}, []
    for path, value in flatten_dict(fresh_params).items():
        key = _flax_key(path)
        source = teacher_path_for(key, teacher, student)
        if source in teacher_flat and np.shape(teacher_flat[source]) == np.shape(value):
            out[path] = teacher_flat[source]
            mapping[key] = source
        else:
            out[path] = value
            fresh.append(key)
    return unflatten_dict(out), mapping, fresh


def mapped_fraction(mapping: dict[str, str], params: dict) -> float:
    """Fraction of student parameters (by count) that came from the teacher."""
    flat = {_flax_key(k): v for k, v in flatten_dict(params).items()}
    total = sum(math.prod(np.shape(v)) for v in flat.values())
    return sum(math.prod(np.shape(flat[k])) for k in mapping) / total


__all__ = ["init_student_from_teacher", "mapped_fraction", "teacher_path_for"]
