"""Defaults of every training option; configs/*.py start from `base_config()` and change what differs.

A key that is not here is an error when given on the command line (ml_collections refuses it), so a
misspelt option never silently does nothing; a key of an earlier release that moved into a group is
refused with its new name (`RENAMED`).
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

# Flat keys of earlier releases -> their place now.
RENAMED = {
    "teacher": "teacher.source",
    "teacher_param_dtype": "teacher.param_dtype",
    "ckpt_every": "ckpt.every",
    "keep_checkpoints": "ckpt.keep",
    "async_checkpoint": "ckpt.async_save",
    "sample_every": "sample.every",
    "sample_count": "sample.count",
    "sample_steps": "sample.steps",
    "sample_vae": "sample.vae",
}


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.workdir = "runs/default"
    c.seed = 0
    c.total_steps = 1000
    c.log_every = 10
    c.tensorboard = True
    c.peak_tflops_per_device = 0.0  # 0: measure with a matmul at start-up (MFU denominator)

    # Teacher source: anything `koala_jax.weights.read_source` reads: 'random:<preset or config.json>',
    # a JAX params dir (convert_weights.py to-jax), a diffusers U-Net/pipeline folder, a single file or
    # a hub id. The frozen teacher needs no fp32 master copy.
    c.teacher = ml_collections.ConfigDict({"source": "random:tiny-sdxl", "param_dtype": "bfloat16"})
    c.student = ml_collections.ConfigDict({"variant": "koala-700m", "init": "teacher"})

    c.data = ml_collections.ConfigDict(
        {
            "source": "synthetic",  # 'synthetic' or the output folder of prepare_data.py
            "global_batch_size": 128,
            "num_workers": 0,
            "caption_dropout": 0.1,  # classifier-free guidance: fraction of empty captions
            "synthetic_records": 1024,
            "synthetic_latent_size": 128,  # 1024 px / 8
            "synthetic_text_len": 77,
        }
    )
    c.kd = ml_collections.ConfigDict(
        {
            "task": 1.0,
            "out": 1.0,
            "feat": 1.0,  # loss weights (lambda)
            # Feature KD kinds: 'attn1' (self-attention, KOALA's choice), 'attn2', 'ff', 'resnet', 'stage'.
            "features": ("attn1",),
            "feature_regex": "",  # only student feature paths matching this (empty: all)
        }
    )
    c.noise = ml_collections.ConfigDict(
        {
            "prediction_type": "epsilon",
            "num_train_timesteps": 1000,
            "beta_start": 0.00085,
            "beta_end": 0.012,
            "timesteps": config_dict.placeholder(tuple),  # restrict training timesteps (None: all)
        }
    )
    c.optim = ml_collections.ConfigDict(
        {
            "lr": 5e-5,
            "warmup_steps": 500,
            "schedule": "constant",
            "b1": 0.9,
            "b2": 0.999,
            "eps": 1e-8,
            "weight_decay": 0.01,
            "grad_clip": 1.0,
            "grad_accum": 1,
        }
    )
    c.ema_decay = config_dict.placeholder(float)  # e.g. 0.9999; None: no EMA (saves a params copy)
    c.ckpt = ml_collections.ConfigDict({"every": 500, "keep": 3, "async_save": True})
    # Sample grids in TensorBoard every `sample.every` steps (0: off): student (EMA if kept) and teacher
    # denoise the same noise for the first `sample.count` captions of the first batch with
    # `sample.steps` Euler steps; decoded by the VAE at `sample.vae` (a diffusers vae/ folder, needs
    # torch) or shown as a latent preview.
    c.sample = ml_collections.ConfigDict({"every": 0, "count": 4, "steps": 25, "vae": ""})
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1})
    c.compute = ml_collections.ConfigDict(
        {
            "dtype": "bfloat16",
            "remat": ("resnet", "transformer_block"),
            "remat_policy": "nothing_saveable",
            "attention_impl": "auto",
        }
    )
    # Multi-host: 'auto' on TPU pods / SLURM (jax.distributed.initialize() finds its peers), or an
    # explicit coordinator address with process count and id (multi-node GPU, CPU tests).
    c.distributed = ml_collections.ConfigDict({"auto": False, "coordinator": "", "num_processes": 1, "process_id": 0})
    return c
