"""Defaults of every training option; configs/*.py start from `base_config()` and change what differs.

The base config is locked: a key that is not here is an error, whether a config file sets it
(`load_config_file`: file, line, the closest known key) or the command line does, so a misspelt option never
silently does nothing; a key of an earlier release that moved into a group is refused with its new name
(`RENAMED`).
"""

from __future__ import annotations

import difflib
import re
import traceback
import types
from pathlib import Path

import ml_collections
from ml_collections import config_dict

from koala_jax.errors import ConfigError
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
    "plan": "plan.enabled",
    "plan_hbm_gib": "plan.hbm_gib",
    "plan_teacher": "plan.teacher",
    "ema_decay": "ema.decay",
    "objective": "objective.kind",
    "progressive.steps": "objective.steps",
    "progressive.guidance": "objective.guidance",
    "progressive": "objective",
    "data.synthetic_records": "data.synthetic.records",
    "data.synthetic_latent_size": "data.synthetic.latent_size",
    "data.synthetic_text_len": "data.synthetic.text_len",
}


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.workdir = "runs/default"
    c.seed = 0
    c.total_steps = 1000
    c.log_every = 10
    c.tensorboard = True
    c.peak_tflops_per_device = 0.0  # 0: measure with a matmul at start-up (MFU denominator)
    # Plan instead of training (koala_jax/train/plan.py, docs/scaling.md): `plan.enabled` compiles the step for the
    # mesh from abstract inputs (no weights read) and writes <workdir>/plan.json with its bytes per device and FLOPs.
    # plan.hbm_gib > 0 (implies plan.enabled): search the largest per-device batch, and the cheapest remat for it,
    # that fit that many GiB per device, for every fsdp degree. plan.teacher: the architecture to plan with when
    # teacher.source is not here (the planner downloads nothing), e.g. 'random:sdxl-base'.
    c.plan = ml_collections.ConfigDict({"enabled": False, "hbm_gib": 0.0, "teacher": ""})

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
            # source='synthetic': random records shaped like prepared ones (tests, benchmarks, the planner).
            "synthetic": ml_collections.ConfigDict({"records": 1024, "latent_size": 128, "text_len": 77}),
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
            # Per-pair feature loss scale: 'none' (BK-SDM / KOALA: plain MSE) or 'teacher' (each pair's MSE over the
            # teacher feature's mean square, detached: LAPTOP-Diff's form; our choice, docs/training.md).
            "feat_norm": "none",
        }
    )
    # objective.kind: 'koala' (the KD loss above) or 'progressive': step distillation of the teacher
    # (koala_jax/train/progressive.py; use student.variant='same', kd.out = kd.feat = 0). The student learns in
    # `objective.steps` Euler steps (trailing spacing) what the teacher draws in twice as many, the teacher guided at
    # `objective.guidance` (1: none, for rounds whose teacher is already step-distilled); the result samples without
    # guidance. `steps` and `guidance` are read by the progressive objective only.
    c.objective = ml_collections.ConfigDict({"kind": "koala", "steps": 8, "guidance": 5.0})
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
    c.ema = ml_collections.ConfigDict({"decay": config_dict.placeholder(float)})  # e.g. 0.9999; None: no EMA
    c.ckpt = ml_collections.ConfigDict({"every": 500, "keep": 3, "async_save": True})
    # A resume must train with the teacher and data its checkpoints were trained with (<workdir>/run_identity.json);
    # name here what may change, comma-separated: --config.resume.allow_changes=teacher,data.
    c.resume = ml_collections.ConfigDict({"allow_changes": ""})
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
    c.lock()  # A key a config file sets that is not here is an error (`load_config_file`), as on the command line.
    return c


def cpu_config() -> ml_collections.ConfigDict:
    """`base_config()` for the tiny configs, which run on a CPU in minutes: float32 everywhere (a CPU has no fast
    bf16 matmuls), no remat (small activations), XLA attention (the fastest at these token counts), no weight
    decay, EMA 0.99."""
    c = base_config()
    c.teacher.param_dtype = "float32"
    c.optim.weight_decay = 0.0
    c.ema.decay = 0.99
    c.compute.dtype = "float32"
    c.compute.remat = ()
    c.compute.attention_impl = "xla"
    return c


def load_config_file(path: str | Path) -> ml_collections.ConfigDict:
    """`get_config()` of a configs/*.py file, on the locked base config. Whatever goes wrong there is one
    ConfigError naming the file and line: a syntax error, no get_config, an exception inside it, a key the base
    config does not have (with the closest known key, or an old flat key's new name), a value of the wrong type."""
    path = Path(path)
    try:
        source = path.read_text(encoding="utf-8")
        code = compile(source, str(path), "exec")
    except SyntaxError as e:
        raise ConfigError(f"{path}:{e.lineno}: syntax error: {e.msg}") from e
    module = types.ModuleType(path.stem)
    module.__file__ = str(path)
    try:
        exec(code, module.__dict__)  # the user's own config file, run as ml_collections runs it
        get_config = module.__dict__.get("get_config")
        if not callable(get_config):
            raise ConfigError(f"{path}: no get_config() function (a config file returns its config from get_config())")
        cfg = get_config()
    except ConfigError:
        raise
    except Exception as e:  # The user's own code may raise anything: one line naming its file and line.
        raise ConfigError(f"{config_error_place(path, e)}: {config_error_message(e)}") from e
    if not isinstance(cfg, ml_collections.ConfigDict):
        raise ConfigError(
            f"{path}: get_config() returned {type(cfg).__name__}, not a ConfigDict (start from base_config())"
        )
    return cfg


def config_error_place(path: Path, error: BaseException) -> str:
    """`file:line` of the innermost frame of `error` in the config file (where the user should look)."""
    line = None
    for frame, lineno in traceback.walk_tb(error.__traceback__):
        if Path(frame.f_code.co_filename) == path:
            line = lineno
    return f"{path}:{line}" if line else str(path)


def config_error_message(error: BaseException) -> str:
    """The message of an error raised while building a config: an unknown key gets its closest known key (or its
    new name, for a flat key of an earlier release)."""
    unknown = re.search(r'Key "(\w+)" does not exist', str(error))
    if unknown:
        key = unknown.group(1)
        if key in RENAMED:
            return f"{key} is now {RENAMED[key]}"
        close = difflib.get_close_matches(key, sorted(leaf_names(base_config())), n=1)
        return (
            f"unknown config key {key}"
            + (f" (did you mean {close[0]}?)" if close else "")
            + "; see koala_jax/train/config.py"
        )
    overridden = re.search(r"Could not override field '(\w+)'", str(error))
    if overridden and overridden.group(1) in RENAMED:
        return f"{overridden.group(1)} is now {RENAMED[overridden.group(1)]}"
    return f"{type(error).__name__}: {error}".splitlines()[0]


def leaf_names(cfg: ml_collections.ConfigDict, prefix: str = "") -> set[str]:
    """Every key of `cfg`, as its leaf name and as its dotted path."""
    names = set()
    for key, value in cfg.items():
        names |= {key, prefix + key}
        if isinstance(value, ml_collections.ConfigDict):
            names |= leaf_names(value, f"{prefix}{key}.")
    return names
