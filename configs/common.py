"""The full-size SDXL recipe shared by configs/koala_*.py: a KOALA student of an SDXL-family teacher.

Batch 128 (8 per GPU x 4 GPUs x 4 accumulation in the released run name; docs/paper.md), AdamW with
BK-SDM's settings (lr 5e-5 constant, no warm-up, weight decay 1e-2, clip 1.0), bf16 compute with
fp32 master weights, per-block remat, teacher in bf16, FSDP over 8 devices.
"""

from __future__ import annotations

import ml_collections

from koala_jax.train.config import base_config


def sdxl_distillation_config(variant: str, teacher: str, data: str, workdir: str) -> ml_collections.ConfigDict:
    c = base_config()
    c.workdir = workdir
    c.teacher.source = teacher
    c.student.variant = variant
    c.data.source = data
    c.data.global_batch_size = 128
    c.data.num_workers = 4
    c.total_steps = 500_000
    c.log_every = 50
    c.ckpt.every = 5_000
    c.optim.warmup_steps = 0
    c.mesh.fsdp = 8
    # --config.plan.enabled=True before the teacher's weights are here: SDXL's U-Net (Base, Lightning, Turbo share it).
    c.plan.teacher = "random:sdxl-base"
    return c
