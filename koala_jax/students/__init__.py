"""KOALA students: the paper's architectures (presets), the layer-wise removal rule that derives a
student from any SDXL-family teacher, custom student specs, and which teacher block initialises each
student block."""

from koala_jax.students.mapping import Student, build_student, student_architecture, teacher_path_for
from koala_jax.students.presets import STUDENT_VARIANTS, derive_student_config, preset
from koala_jax.students.spec import StudentSpec, load_spec

__all__ = [
    "STUDENT_VARIANTS",
    "Student",
    "StudentSpec",
    "build_student",
    "derive_student_config",
    "load_spec",
    "preset",
    "student_architecture",
    "teacher_path_for",
]
