"""Building the frozen teacher and the student from a config: where weights come from, and how
they are laid out on the mesh."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from koala_jax.loading import load_unet, random_params
from koala_jax.models import UNetConfig
from koala_jax.presets import derive_student_config, preset
from koala_jax.student_init import init_student_from_teacher

RANDOM_PREFIX = "random:"


def load_teacher(source: str, seed: int = 0) -> tuple[UNetConfig, dict]:
    """Teacher (config, host params) from 'random:<preset or config.json path>' (random weights, for the
    tiny default, tests and benchmarks), a JAX params dir from convert_weights.py, or a diffusers
    U-Net/pipeline folder."""
    if source.startswith(RANDOM_PREFIX):
        name = source[len(RANDOM_PREFIX):]
        config = UNetConfig.from_diffusers(json.loads(Path(name).read_text())) if name.endswith(".json") else preset(name)
        return config, random_params(config, seed)
    if (Path(source) / "params").is_dir():
        from koala_jax.params_io import load_params

        return load_params(source)
    unet, params = load_unet(source)
    return unet.config, params


def build_student(cfg: ml_collections.ConfigDict, teacher_config: UNetConfig, teacher_params: dict,
                  seed: int) -> tuple[UNetConfig, dict, list[str]]:
    """Student (config, host params, fresh param paths): the KOALA variant of the teacher, initialised
    from the teacher blocks it replaces (cfg.init == 'teacher') or randomly ('random')."""
    config = derive_student_config(teacher_config, cfg.variant)
    fresh_params = random_params(config, seed + 1)
    if cfg.init == "random":
        return config, fresh_params, ["(all)"]
    if cfg.init != "teacher":
        raise ValueError(f"student.init {cfg.init!r}: choose 'teacher' or 'random'")
    params, _, fresh = init_student_from_teacher(teacher_params, teacher_config, config, fresh_params)
    return config, params, fresh


def place(tree, shardings, dtype=None):
    """Host arrays -> global jax arrays with the given shardings; each device reads only its slice
    (memory-mapped checkpoints are never fully loaded on a host)."""
    def put(x, sharding):
        x = np.asarray(x) if dtype is None else np.asarray(x).astype(dtype)
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])
    return jax.tree.map(put, tree, shardings)


def param_dtype(name: str) -> jnp.dtype:
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]
