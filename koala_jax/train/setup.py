"""Everything a run needs before its first step: processes, teacher and student, the Flax modules and
their feature pairs, the record source, and arrays laid out on the mesh."""

from __future__ import annotations

import dataclasses

import jax
import ml_collections
import numpy as np

from koala_jax.data import SyntheticSource, open_source
from koala_jax.dtypes import dtype
from koala_jax.models import ForwardOptions, UNet2DConditionModel, UNetConfig, abstract_params, dummy_inputs
from koala_jax.students import Student, build_student
from koala_jax.train.losses import feature_pairs
from koala_jax.weights import read_source


def setup_distributed(cfg: ml_collections.ConfigDict) -> None:
    """Join the other processes of a multi-host run (a no-op for one process)."""
    if cfg.auto:
        jax.distributed.initialize()
    elif cfg.coordinator:
        if jax.config.jax_platforms in (None, "", "cpu"):
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(cfg.coordinator, num_processes=cfg.num_processes, process_id=cfg.process_id)


def load_models(cfg: ml_collections.ConfigDict) -> tuple[UNetConfig, dict, Student]:
    """(teacher config, teacher host params, student): the teacher from any source `read_source` reads,
    the student its KOALA variant initialised from it (the same builder as `convert_weights.py student`)."""
    teacher_config, teacher_params = read_source(cfg.teacher.source, seed=cfg.seed)
    student = build_student(teacher_config, teacher_params, cfg.student.variant, cfg.student.init, seed=cfg.seed + 1)
    return teacher_config, teacher_params, student


def make_models(
    cfg: ml_collections.ConfigDict, teacher_config: UNetConfig, student_config: UNetConfig
) -> tuple[UNet2DConditionModel, UNet2DConditionModel, dict[str, str]]:
    """(teacher, student, feature pairs). The teacher needs no remat: it is never differentiated."""
    c = cfg.compute
    capture = tuple(cfg.kd.features) if cfg.kd.feat else ()
    opts = ForwardOptions(
        dtype=dtype(c.dtype),
        remat=tuple(c.remat),
        remat_policy=c.remat_policy,
        attention_impl=c.attention_impl,
        capture=capture,
    )
    teacher = UNet2DConditionModel(teacher_config, dataclasses.replace(opts, remat=()))
    student = UNet2DConditionModel(student_config, opts)

    def feature_shapes(model: UNet2DConditionModel) -> dict[str, tuple]:
        variables = {"params": abstract_params(model.config, model.opts)}
        _, feats = jax.eval_shape(
            lambda v: model.apply_with_features(v, *dummy_inputs(model.config, size=16)), variables
        )
        return {k: v.shape for k, v in feats.items()}

    pairs = (
        feature_pairs(
            feature_shapes(student), feature_shapes(teacher), teacher_config, student_config, cfg.kd.feature_regex
        )
        if capture
        else {}
    )
    return teacher, student, pairs


def make_source(cfg: ml_collections.ConfigDict, teacher: UNetConfig):
    """The record source: a prepared dataset folder, or synthetic records shaped for `teacher`."""
    if cfg.source != "synthetic":
        return open_source(cfg.source)
    size = cfg.synthetic_latent_size
    return SyntheticSource(
        cfg.synthetic_records,
        (teacher.in_channels, size, size),
        cfg.synthetic_text_len,
        teacher.cross_attention_dim[0],
        teacher.pooled_text_dim,
    )


def place(tree, shardings, cast=None):
    """Host arrays -> global jax arrays with the given shardings; each device reads only its slice
    (memory-mapped checkpoints are never fully loaded on a host)."""

    def put(x, sharding):
        x = np.asarray(x) if cast is None else np.asarray(x).astype(cast)
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

    return jax.tree.map(put, tree, shardings)
