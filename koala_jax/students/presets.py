"""The paper's three architectures (SDXL-Base teacher, KOALA-1B and KOALA-700M students) and the
layer-wise removal rule that derives a KOALA student from any SDXL-family teacher config."""

from __future__ import annotations

import dataclasses

from koala_jax.errors import ConfigError
from koala_jax.models.config import UNetConfig

SDXL_BASE = UNetConfig()  # The defaults of UNetConfig are SDXL-Base 1.0's U-Net.

# Fraction of the deepest stage's transformer blocks that each student keeps (10 -> 6 and 10 -> 5 in
# SDXL) and whether it keeps the mid block (KOALA paper, Sec. 3 / Table 1; see docs/paper.md).
STUDENT_VARIANTS = {
    "koala-1b": {"deep_keep_fraction": 0.6, "mid_block": True},
    "koala-700m": {"deep_keep_fraction": 0.5, "mid_block": False},
}
# A tiny SDXL-shaped teacher for the embedded default config and tests: 3 stages, two residual blocks
# per encoder stage, depth 4 at the deepest stage, text dims of koala_jax.pipelines.tiny (64 / 32).
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
    """Transformer blocks a student keeps at the deepest stage (at least one)."""
    return max(1, round(teacher_depth * STUDENT_VARIANTS[variant]["deep_keep_fraction"]))


def derive_student_config(teacher: UNetConfig, variant: str) -> UNetConfig:
    """KOALA's layer-wise removal applied to `teacher`: one residual block fewer per stage (encoder
    2 -> 1, decoder 3 -> 2 in SDXL), fewer transformer blocks at the deepest stage, and for KOALA-700M
    no mid block. Everything else (widths, heads, conditioning) is the teacher's."""
    if variant not in STUDENT_VARIANTS:
        raise ConfigError(f"unknown student variant {variant!r}; choose from {', '.join(sorted(STUDENT_VARIANTS))}")
    deepest = len(teacher.block_out_channels) - 1
    encoder_depth = list(teacher.transformer_layers_per_block)
    decoder_depth = list(teacher.reverse_transformer_layers_per_block)
    encoder_depth[deepest] = deep_stage_depth(encoder_depth[deepest], variant)
    decoder_depth[0] = deep_stage_depth(decoder_depth[0], variant)
    return dataclasses.replace(
        teacher,
        layers_per_block=tuple(max(1, n - 1) for n in teacher.layers_per_block),
        transformer_layers_per_block=tuple(encoder_depth),
        reverse_transformer_layers_per_block=tuple(decoder_depth),
        mid_block_type=teacher.mid_block_type if STUDENT_VARIANTS[variant]["mid_block"] else None,
    )


def preset(name: str) -> UNetConfig:
    """'sdxl-base', 'koala-1b', 'koala-700m' or 'tiny-sdxl'."""
    if name == "sdxl-base":
        return SDXL_BASE
    if name == "tiny-sdxl":
        return TINY_SDXL
    if name not in STUDENT_VARIANTS:
        raise ConfigError(f"unknown preset {name!r}; choose from {', '.join(PRESET_NAMES)}")
    return derive_student_config(SDXL_BASE, name)
