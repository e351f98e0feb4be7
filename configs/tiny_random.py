"""A tiny random SDXL-shaped teacher, its KOALA-700M student, synthetic data: the random-teacher path of tests and
benchmarks (the embedded default is configs/tiny.py, the tiny world).

    python train.py --config configs/tiny_random.py

Hardware: any CPU, no download. Expected: ~0.2 s/step on a 2-core CPU, 100 steps in about a minute
after ~40 s of compilation; the total loss falls from ~7 to ~3.5 (feature KD dominates: the teacher
is random, so there is nothing to draw, only a function to copy).
"""

from koala_jax.train.config import cpu_config


def get_config():
    c = cpu_config()
    c.workdir = "runs/tiny_random"
    c.total_steps = 100
    c.log_every = 10
    c.ckpt.every = 50
    c.sample.every = 50
    c.sample.steps = 8
    c.teacher.source = "random:tiny-sdxl"
    c.data.global_batch_size = 8
    c.data.synthetic.records = 256
    c.data.synthetic.latent_size = 16
    c.data.synthetic.text_len = 8
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 10
    return c
