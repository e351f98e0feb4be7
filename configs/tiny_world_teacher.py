"""The tiny world's teacher: plain diffusion training (task loss only) of an SDXL-shaped U-Net from scratch.

    python -m koala_jax.cli.world components --out runs/tiny_world/components      # trains the VAE (~25 min)
    python prepare_data.py --input world:20000:mixed --teacher runs/tiny_world/components --backend jax \
        --output-dir runs/tiny_world/data --resolution 64 --records-per-shard 2500 --batch-size 256   # ~2 min
    python train.py --config configs/tiny_world_teacher.py                              # ~65 min
    python convert_weights.py to-diffusers --checkpoint runs/tiny_world/teacher --ema \
        --pipeline runs/tiny_world/components --out assets/tiny_world/teacher

"Plain diffusion training" is a student with the teacher's own architecture (`student.variant='same'`),
initialised randomly, and only the task loss (kd.out = kd.feat = 0: the teacher is never run). The same
keys fine-tune any SDXL-family U-Net (teacher.source = its weights, student.init = 'teacher').

Hardware: a 2-core CPU. Architecture: configs/tiny_world_unet.json (4.5M parameters, 16x16x4 latents of
64 px images). Step time, loss and accuracy of the shipped teacher: docs/tiny_world.md.
"""

from koala_jax.train.config import cpu_config

PHASES = ("scratch", "finetune")


def get_config(phase: str = "scratch"):
    """`scratch`: 4,000 steps from random weights at a constant lr 1e-3; `finetune`: 1,200 more from the scratch
    run's (non-EMA) weights, exported to runs/tiny_world/teacher_scratch, with a cosine decay from 3e-4 and a
    fresh EMA (the scratch run's EMA, from before the trainer's EMA warmup, still held 2% of the random init)."""
    if phase not in PHASES:
        raise ValueError(f"configs/tiny_world_teacher.py:{phase}: choose {' or '.join(PHASES)}")
    c = cpu_config()
    c.workdir = "runs/tiny_world/teacher" if phase == "scratch" else "runs/tiny_world/teacher_finetune"
    c.seed = 0 if phase == "scratch" else 1
    c.total_steps = 4000 if phase == "scratch" else 1200
    c.log_every = 100
    c.ckpt.every = 500 if phase == "scratch" else 400
    c.ckpt.keep = 8
    c.teacher.source = (
        "random:configs/tiny_world_unet.json" if phase == "scratch" else "runs/tiny_world/teacher_scratch"
    )
    c.student.variant = "same"
    c.student.init = "random" if phase == "scratch" else "teacher"
    c.kd.task, c.kd.out, c.kd.feat = 1.0, 0.0, 0.0
    c.data.source = "runs/tiny_world/data"
    c.data.synthetic.latent_size = 16  # what the planner plans with before runs/tiny_world/data exists (64 px / 4)
    c.data.global_batch_size = 32
    c.data.caption_dropout = 0.1
    c.optim.lr = 1e-3 if phase == "scratch" else 3e-4
    c.optim.warmup_steps = 200 if phase == "scratch" else 50
    c.optim.schedule = "constant" if phase == "scratch" else "cosine"
    c.ema.decay = 0.999
    return c
