"""KOALA students: the paper's architectures (presets), the layer-wise removal rule that derives a
student from any SDXL-family teacher, and which teacher block initialises each student block."""

from koala_jax.students.mapping import Student, build_student, teacher_path_for
from koala_jax.students.presets import STUDENT_VARIANTS, derive_student_config, preset

__all__ = ["STUDENT_VARIANTS", "Student", "build_student", "derive_student_config", "preset", "teacher_path_for"]
