"""Defaults of every training option; configs/*.py start from `base_config()` and change what differs.

A key that is not here is an error when given on the command line (ml_collections refuses it), so a
misspelt option never silently does nothing; a key of an earlier release that moved into a group is
refused with its new name (`RENAMED`).
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from koala_jax.models.attention_kernels import DEFAULT_BLOCK_KV, DEFAULT_BLOCK_Q

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
    # Plan instead of training (koala_jax/train/plan.py, docs/scaling.md): compile the step for the mesh from
    # abstract inputs (no weights read) and write <workdir>/plan.json with its bytes per device and FLOPs.
    # plan_hbm_gib > 0 (implies plan): search the largest per-device batch, and the cheapest remat for it, that
    # fit that many GiB per device, for every fsdp degree. plan_teacher: the architecture to plan with when
    # teacher.source is not here (the planner downloads nothing), e.g. 'random:sdxl-base'.
    c.plan = False
    c.plan_hbm_gib = 0.0
    c.plan_teacher = ""

    # Teacher source: anything `koala_jax.weights.read_source` reads: 'random:<preset or config.json>',
    # a JAX params dir (convert_weights.py to-jax), a diffusers U-Net/pipeline folder, a single file or
    # a hub id. The frozen teacher needs no fp32 master copy.
    c.teacher = ml_collections.ConfigDict({"source": "random:tiny-sdxl", "param_dtype": "bfloat16"})
    # Student: a KOALA preset ('koala-1b', 'koala-700m') or a student spec .json path (docs/convert.md).
    c.student = ml_collections.ConfigDict({"variant": "koala-700m", "init": "teacher"})

    c.data = ml_collections.ConfigDict(
        {
            # 'synthetic', the output folder of prepare_data.py, or any prepare_data.py --input (image folder, table,
            # webdataset, tfds, 'world:<records>[:<captions>]'), then encoded once into <workdir>/data with the JAX
            # encoders of `encoders` (a diffusers pipeline folder; empty: teacher.source) at `resolution` px (0: the
            # size the teacher was trained at).
            "source": "synthetic",
            "encoders": "",
            "resolution": 0,
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
    # 'koala' (the KD loss above) or 'progressive': step distillation of the teacher (koala_jax/train/progressive.py;
    # use student.variant='same', kd.out = kd.feat = 0). The student learns in `steps` Euler steps (trailing
    # spacing) what the teacher draws in twice as many, the teacher guided at `guidance` (1: none, for rounds whose
    # teacher is already step-distilled); the result samples without guidance.
    c.objective = "koala"
    c.progressive = ml_collections.ConfigDict({"steps": 8, "guidance": 5.0})
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
    # `sample.steps` Euler steps; decoded by the VAE at `sample.vae` (a diffusers vae/ folder, decoded in
    # JAX) or shown as a latent preview.
    c.sample = ml_collections.ConfigDict({"every": 0, "count": 4, "steps": 25, "vae": ""})
    # Evaluation when the run ends (printed in the summary, written to <workdir>/eval/): the student (EMA if kept)
    # and the teacher draw every prompt of `prompts` ('world-single', 'world-rich'; empty: off) with each seed,
    # from the same noise, in JAX, with the VAE and text encoders of `pipeline` (empty: teacher.source).
    c.eval = ml_collections.ConfigDict(
        {
            "prompts": "",
            "seeds": (0, 1),
            "steps": 20,
            "guidance": 5.0,
            "scheduler": "euler",
            "pipeline": "",
            "batch_size": 16,
        }
    )
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1})
    c.compute = ml_collections.ConfigDict(
        {
            "dtype": "bfloat16",
            "remat": ("resnet", "transformer_block"),
            "remat_policy": "nothing_saveable",
            # 'auto' (the best for the backend), 'xla', 'cudnn' (GPU), 'chunked' (memory-efficient, any
            # backend), 'flash' / 'splash' (Pallas TPU kernels); see docs/training.md.
            "attention_impl": "auto",
            # Query / key token blocks of 'chunked', 'flash' and 'splash' (memory: block_q x block_kv scores).
            "attention_block_q": DEFAULT_BLOCK_Q,
            "attention_block_kv": DEFAULT_BLOCK_KV,
        }
    )
    # Multi-host: 'auto' on TPU pods / SLURM (jax.distributed.initialize() finds its peers), or an
    # explicit coordinator address with process count and id (multi-node GPU, CPU tests).
    c.distributed = ml_collections.ConfigDict({"auto": False, "coordinator": "", "num_processes": 1, "process_id": 0})
    return c


def cpu_config() -> ml_collections.ConfigDict:
    """`base_config()` for the tiny configs, which run on a CPU in minutes: float32 everywhere (a CPU has no fast
    bf16 matmuls), no remat (small activations), XLA attention (the fastest at these token counts), no weight
    decay, EMA 0.99."""
    c = base_config()
    c.teacher.param_dtype = "float32"
    c.optim.weight_decay = 0.0
    c.ema_decay = 0.99
    c.compute.dtype = "float32"
    c.compute.remat = ()
    c.compute.attention_impl = "xla"
    return c
