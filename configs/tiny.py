"""Embedded default: a tiny random SDXL-shaped teacher, its KOALA-700M student, synthetic data.
Runs on a laptop CPU in a few minutes with no download: `python train.py --config configs/tiny.py`."""

from koala_jax.train.config import base_config


def get_config():
    c = base_config()
    c.workdir = "runs/tiny"
    c.total_steps = 100
    c.log_every = 10
    c.ckpt_every = 50
    c.sample_every = 50
    c.sample_steps = 8
    c.teacher = "random:tiny-sdxl"
    c.teacher_param_dtype = "float32"
    c.data.global_batch_size = 8
    c.data.synthetic_records = 256
    c.data.synthetic_latent_size = 16
    c.data.synthetic_text_len = 8
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 10
    c.ema_decay = 0.99
    c.compute.dtype = "float32"
    c.compute.remat = ()
    c.compute.attention_impl = "xla"
    return c
