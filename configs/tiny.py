"""Embedded default: distil the shipped tiny-world teacher into its KOALA-700M-style student, then evaluate both.

    python train.py --config configs/tiny.py

The teacher (assets/tiny_world/teacher, a diffusers SDXL pipeline built and trained by this project,
docs/tiny_world.md) draws coloured shapes from captions. The student drops one residual block per stage, half
the deepest transformer blocks and the mid block (KOALA-700M's rule) and starts from the teacher's blocks; it
is distilled with the task loss, output KD and self-attention feature KD on 4,096 tiny-world images encoded
once into runs/tiny/data with the teacher's own VAE and text encoders (in JAX; no torch, no download). At the
end both models draw every "a <colour> <shape>" prompt with two seeds from the same noise, and the summary
gives the detector's accuracy of each and their agreement (runs/tiny/eval: report and side-by-side grid).

Hardware: any CPU. Expected on a 2-core CPU: about 7.5 minutes in all (1 min to encode the data, 800 steps at
~0.36 s/step, 1 min to evaluate, 2.4 GiB peak RSS); the student ends at ~0.92 colour+shape accuracy against the
teacher's ~0.97 (docs/tiny_world.md).
"""

from koala_jax.train.config import cpu_config


def get_config():
    c = cpu_config()
    c.workdir = "runs/tiny"
    c.total_steps = 800
    c.log_every = 100
    c.ckpt.every = 400
    c.teacher.source = "assets/tiny_world/teacher"
    c.student.variant = "koala-700m"
    c.data.source = "world:4096:mixed"
    c.data.global_batch_size = 16
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 20
    c.eval.prompts = "world-single"
    return c
