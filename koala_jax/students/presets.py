"""The paper's three architectures (SDXL-Base teacher, KOALA-1B and KOALA-700M students) and the
layer-wise removal rule that derives a KOALA student from any SDXL-family teacher config."""

from __future__ import annotations

from koala_jax.errors import ConfigError
from koala_jax.models.config import UNetConfig
from koala_jax.students.spec import StageSpec, StudentSpec, decoder_source, resolve

SDXL_BASE = UNetConfig()  # The defaults of UNetConfig are SDXL-Base 1.0's U-Net.

# Fraction of the deepest stage's transformer blocks that each student keeps (10 -> 6 and 10 -> 5 in
# SDXL) and whether it keeps the mid block (KOALA paper, Sec. 3 / Table 1; see docs/paper.md).
STUDENT_VARIANTS = {
    "koala-1b": {"deep_keep_fraction": 0.6, "mid_block": True},
    "koala-700m": {"deep_keep_fraction": 0.5, "mid_block": False},
}
# A tiny SDXL-shaped architecture for random teachers (configs/tiny_random.py), tests and benchmarks: 3 stages, two
# residual blocks per encoder stage, depth 4 at the deepest stage, text dims of koala_jax.pipelines.tiny (64 / 32).
# (The embedded default, configs/tiny.py, distils the shipped tiny-world teacher instead: docs/tiny_world.md.)
TINY_SDXL = UNetConfig(
    block_out_channels=(32, 64, 128),
    layers_per_block=(2, 2, 2),
    transformer_layers_per_block=(1, 2, 4),
    reverse_transformer_layers_per_block=(4, 2, 1),
    num_attention_heads=(2, 4, 8),
    cross_attention_dim=(64, 64, 64),
    norm_num_groups=8,
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=32 + 6 * 8,
)
PARAM_COUNTS = {"sdxl-base": 2_567_463_684, "koala-1b": 1_161_184_324, "koala-700m": 782_822_724}
PRESET_NAMES = ("sdxl-base", "tiny-sdxl", *STUDENT_VARIANTS)


def deep_stage_depth(teacher_depth: int, variant: str) -> int:
    """Transformer blocks a student keeps of a deepest-stage attention (at least one, if it had any)."""
    return min(teacher_depth, max(1, round(teacher_depth * STUDENT_VARIANTS[variant]["deep_keep_fraction"])))


def koala_spec(teacher: UNetConfig, variant: str) -> StudentSpec:
    """KOALA's layer-wise removal as a spec: one resnet/attention pair fewer per stage (encoder 2 -> 1,
    decoder 3 -> 2 in SDXL), the deepest stage's attentions cut to a fraction of their blocks, and for
    KOALA-700M no mid block. Per-pair teacher depths (SSD-1B-like teachers) are cut pair by pair."""
    if variant not in STUDENT_VARIANTS:
        raise ConfigError(f"unknown student variant {variant!r}; choose from {', '.join(sorted(STUDENT_VARIANTS))}")
    n = len(teacher.block_out_channels)
    layers = [max(1, k - 1) for k in teacher.layers_per_block]

    def cut(depths: tuple[int, ...], sources: list[int]) -> tuple[int, ...] | None:
        return tuple(deep_stage_depth(depths[s], variant) for s in sources) if depths else None

    down = [StageSpec(k) for k in layers]
    down[-1] = StageSpec(layers[-1], cut(teacher.down_depths(n - 1), list(range(layers[-1]))))
    pairs = layers[-1] + 1
    up = [StageSpec() for _ in range(n)]
    up[0] = StageSpec(
        None,
        cut(teacher.up_depths(0), [decoder_source(j, pairs, teacher.up_layers_per_block[0]) for j in range(pairs)]),
    )
    keep_mid = STUDENT_VARIANTS[variant]["mid_block"] and teacher.mid_block_type is not None
    return StudentSpec(tuple(down), tuple(up), "keep" if keep_mid else "none", variant)


def derive_student_config(teacher: UNetConfig, variant: str) -> UNetConfig:
    """KOALA's layer-wise removal applied to `teacher` (`koala_spec`). Everything else (widths, heads,
    conditioning) is the teacher's."""
    return resolve(koala_spec(teacher, variant), teacher, variant)[0]


def preset(name: str) -> UNetConfig:
    """'sdxl-base', 'koala-1b', 'koala-700m' or 'tiny-sdxl'."""
    if name == "sdxl-base":
        return SDXL_BASE
    if name == "tiny-sdxl":
        return TINY_SDXL
    if name not in STUDENT_VARIANTS:
        raise ConfigError(f"unknown preset {name!r}; choose from {', '.join(PRESET_NAMES)}")
    return derive_student_config(SDXL_BASE, name)
