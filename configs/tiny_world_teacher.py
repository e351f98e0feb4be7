"""The tiny world's teacher: plain diffusion training (task loss only) of an SDXL-shaped U-Net from scratch.

    python -m koala_jax.cli.world components --out runs/tiny_world/components
    python prepare_data.py --input world:20000:mixed --teacher runs/tiny_world/components \
        --output-dir runs/tiny_world/data --resolution 64 --records-per-shard 2000
    python train.py --config configs/tiny_world_teacher.py
    python convert_weights.py to-diffusers --checkpoint runs/tiny_world/teacher --ema \
        --pipeline runs/tiny_world/components --out assets/tiny_world/teacher --dtype fp16

"Plain diffusion training" is a student with the teacher's own architecture (`student.variant='same'`),
initialised randomly, and only the task loss (kd.out = kd.feat = 0: the teacher is never run). The same
keys fine-tune any SDXL-family U-Net (teacher.source = its weights, student.init = 'teacher').

Hardware: a 2-core CPU. Architecture: configs/tiny_world_unet.json (4.5M parameters, 16x16x4 latents of
64 px images). Step time, loss and accuracy of the shipped teacher: docs/tiny_world.md.
"""

from koala_jax.train.config import base_config


def get_config():
    c = base_config()
    c.workdir = "runs/tiny_world/teacher"
    c.seed = 0
    c.total_steps = 4000
    c.log_every = 100
    c.ckpt.every = 500
    c.ckpt.keep = 8
    c.teacher.source = "random:configs/tiny_world_unet.json"
    c.teacher.param_dtype = "float32"
    c.student.variant = "same"
    c.student.init = "random"
    c.kd.task, c.kd.out, c.kd.feat = 1.0, 0.0, 0.0
    c.data.source = "runs/tiny_world/data"
    c.data.global_batch_size = 32
    c.data.caption_dropout = 0.1
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 200
    c.optim.schedule = "constant"
    c.optim.weight_decay = 0.0
    c.ema_decay = 0.999
    c.compute.dtype = "float32"
    c.compute.remat = ()
    c.compute.attention_impl = "xla"
    return c
