"""The one place a training step is assembled. From a config, the models' architectures and the data's shape, it
returns the Flax modules, the feature pairs, the optimizer, the jitted step, its shardings and the abstract
inputs it compiles for. The training loop, the planner (plan.py), preflight and the benchmarks all take their step
from `build_step`, so a change to the step is made once.

Everything here is pure: configs and shapes in, no weights read, nothing allocated on a device.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from koala_jax.dtypes import dtype
from koala_jax.models import ForwardOptions, UNet2DConditionModel, UNetConfig, abstract_params, dummy_inputs
from koala_jax.train import sharding
from koala_jax.train.losses import LossWeights, feature_pairs
from koala_jax.train.noise import NoiseSchedule
from koala_jax.train.preview import euler_schedule
from koala_jax.train.progressive import PROGRESSIVE, ProgressiveDistillation
from koala_jax.train.state import init_state, make_optimizer
from koala_jax.train.step import StepConfig, jit_train_step
from koala_jax.weights.pipeline_dir import default_image_size, is_pipeline_dir, vae_factor

# SDXL's VAE (8 pixels per latent): the factor planned with when the encoders' pipeline folder is not here.
SDXL_VAE_FACTOR = 8


@dataclasses.dataclass(frozen=True)
class Models:
    """What is trained, from configs alone: the teacher's and the student's architectures, the teacher blocks a
    student spec lists (`selection`), and where the teacher's architecture came from."""

    teacher: UNetConfig
    student: UNetConfig
    selection: dict[str, tuple[int, ...]]
    note: str = ""


@dataclasses.dataclass(frozen=True)
class DataShape:
    """One record's latent shape (channels, height, width) and text tokens, the VAE factor (pixels per latent),
    and where they come from."""

    latent_shape: tuple[int, int, int]
    text_len: int
    vae_factor: int
    note: str

    @property
    def pixels(self) -> int:
        return self.latent_shape[1] * self.vae_factor


@dataclasses.dataclass(frozen=True)
class StepInputs:
    """The step's arguments as the loop passes them: (state, teacher params, batch, null embeddings)."""

    state: Any
    teacher_params: Any
    batch: Any
    null: Any

    def __iter__(self):
        return iter((self.state, self.teacher_params, self.batch, self.null))


@dataclasses.dataclass(frozen=True)
class TrainStep:
    """A built step: its modules and settings, the jitted function and its abstract inputs (ShapeDtypeStructs with
    the shardings the function takes)."""

    teacher: UNet2DConditionModel
    student: UNet2DConditionModel
    pairs: dict[str, str]
    optimizer: optax.GradientTransformation
    config: StepConfig
    mesh: jax.sharding.Mesh
    inputs: StepInputs
    fn: Any
    teacher_dtype: Any  # the frozen teacher's parameter dtype (`teacher.param_dtype`)

    def shardings(self, tree) -> Any:
        return jax.tree.map(lambda x: x.sharding, tree)

    def compile(self) -> jax.stages.Compiled:
        """Lower and compile for the abstract inputs, as the loop runs it (Pallas attention kernels shard_map over
        the mesh)."""
        with jax.set_mesh(self.mesh):
            return self.fn.lower(*self.inputs).compile()


# ---------------------------------------------------------------- pure pieces (preflight checks through these)


@dataclasses.dataclass(frozen=True)
class StepSettings:
    """The step's settings from the config, built by pure functions: what preflight validates and `build_step`
    uses (one place, so a check and the code it guards cannot drift)."""

    opts: ForwardOptions  # how the student computes and which features it captures
    weights: LossWeights
    schedule: NoiseSchedule
    progressive: ProgressiveDistillation | None  # None: KOALA's objective
    teacher_dtype: Any  # the frozen teacher's parameter dtype


def step_settings(cfg: ml_collections.ConfigDict) -> StepSettings:
    """`compute.*` and `kd.features` (ForwardOptions), the loss weights (`kd.*`), the noise schedule (`noise.*`),
    the progressive distillation round of `objective.kind='progressive'` and `teacher.param_dtype`; raises a
    ValueError or KoalaError naming the first setting that is wrong."""
    compute, kd = cfg.compute, cfg.kd
    compute_dtype, teacher_dtype = (dtype(name) for name in (compute.dtype, cfg.teacher.param_dtype))
    opts = ForwardOptions(
        dtype=compute_dtype,
        remat=tuple(compute.remat),
        remat_policy=compute.remat_policy,
        attention_impl=compute.attention_impl,
        attention_block_q=compute.attention_block_q,
        attention_block_kv=compute.attention_block_kv,
        capture=tuple(kd.features) if kd.feat else (),
    )
    schedule = noise_schedule(cfg.noise)
    weights = LossWeights(kd.task, kd.out, kd.feat, kd.feat_norm)
    return StepSettings(opts, weights, schedule, progressive_round(cfg.objective, schedule), teacher_dtype)


def noise_schedule(noise: ml_collections.ConfigDict) -> NoiseSchedule:
    """The training noise schedule of `noise.*`."""
    timesteps = tuple(noise.timesteps) if noise.timesteps else None
    return NoiseSchedule(noise.num_train_timesteps, noise.beta_start, noise.beta_end, noise.prediction_type, timesteps)


def progressive_round(objective: ml_collections.ConfigDict, schedule: NoiseSchedule) -> ProgressiveDistillation | None:
    """The progressive distillation round of `objective.kind='progressive'` (None for KOALA's objective): Euler on
    the training schedule with trailing spacing, as the step-distilled model is sampled."""
    if objective.kind != PROGRESSIVE:
        return None
    return ProgressiveDistillation(euler_schedule(schedule), objective.steps, objective.guidance)


def data_shape(data: ml_collections.ConfigDict, teacher: UNetConfig, teacher_source: str) -> DataShape:
    """The records' shape, from configs and metadata only (no record read): a prepared dataset's metadata; for a
    raw input encoded on the fly (`world:`, an image folder...), the resolution it will be encoded at
    (`data.resolution`, else the encoders' native size) over their VAE's factor; synthetic records as configured.
    The loop checks the records it gets against this."""
    from koala_jax.data import schema  # tfds metadata: only where a dataset is named

    synthetic = data.synthetic
    if data.source == "synthetic":
        size = synthetic.latent_size
        return DataShape((teacher.in_channels, size, size), synthetic.text_len, SDXL_VAE_FACTOR, "synthetic")
    if os.path.exists(os.path.join(data.source, schema.DATASET_INFO_FILE)):
        features, _ = schema.read_tfds_info(data.source)
        latents = tuple(features["latents"].shape)
        settings = os.path.join(data.source, schema.PREPARE_CONFIG_FILE)
        resolution = json.loads(Path(settings).read_text()).get("resolution") if os.path.isfile(settings) else None
        factor = resolution // latents[1] if resolution else SDXL_VAE_FACTOR
        return DataShape(latents, features["prompt_embeds"].shape[0], factor, f"prepared dataset {data.source}")
    encoders = data.encoders or teacher_source
    if is_pipeline_dir(encoders):
        factor = vae_factor(encoders)
        resolution = data.resolution or default_image_size(encoders)
        why = f"encoded at {resolution} px by {encoders} (VAE factor {factor})"
    else:
        factor, resolution = SDXL_VAE_FACTOR, data.resolution or synthetic.latent_size * SDXL_VAE_FACTOR
        why = f"planned at {resolution} px, SDXL's VAE factor ({encoders} is not here)"
    size = resolution // factor
    return DataShape((teacher.in_channels, size, size), schema.TEXT_LENGTH, factor, f"{data.source}: {why}")


def make_models(
    opts: ForwardOptions, feature_regex: str, models: Models
) -> tuple[UNet2DConditionModel, UNet2DConditionModel, dict[str, str]]:
    """(teacher, student, feature pairs). The teacher needs no remat: it is never differentiated."""
    teacher = UNet2DConditionModel(models.teacher, dataclasses.replace(opts, remat=()))
    student = UNet2DConditionModel(models.student, opts)
    if not opts.capture:
        return teacher, student, {}

    def feature_shapes(model: UNet2DConditionModel) -> dict[str, tuple]:
        variables = {"params": abstract_params(model.config, model.opts)}
        _, feats = jax.eval_shape(
            lambda v: model.apply_with_features(v, *dummy_inputs(model.config, size=16)), variables
        )
        return {k: v.shape for k, v in feats.items()}

    pairs = feature_pairs(
        feature_shapes(student),
        feature_shapes(teacher),
        models.teacher,
        models.student,
        feature_regex,
        models.selection,
    )
    return teacher, student, pairs


# ---------------------------------------------------------------- the step


def with_sharding(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def abstract_inputs(
    state, models: Models, data: DataShape, teacher_dtype: Any, mesh: jax.sharding.Mesh, global_batch: int
) -> StepInputs:
    """(state, teacher params, batch, null embeddings) as the loop passes them, shapes and shardings only, from the
    abstract train state. Plain diffusion training (task loss only) never runs the teacher: with `teacher_dtype`
    None it takes no memory."""
    f32 = np.dtype(np.float32)
    teacher = {}
    if teacher_dtype is not None:
        teacher = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, teacher_dtype), abstract_params(models.teacher))
    width, pooled = models.teacher.cross_attention_dim[0], models.teacher.pooled_text_dim
    batch = {
        "latents": jax.ShapeDtypeStruct((global_batch, *data.latent_shape), f32),
        "prompt_embeds": jax.ShapeDtypeStruct((global_batch, data.text_len, width), f32),
        "pooled_prompt_embeds": jax.ShapeDtypeStruct((global_batch, pooled), f32),
        "time_ids": jax.ShapeDtypeStruct((global_batch, 6), f32),
    }
    null = {
        "prompt_embeds": jax.ShapeDtypeStruct((data.text_len, width), f32),
        "pooled_prompt_embeds": jax.ShapeDtypeStruct((pooled,), f32),
    }
    return StepInputs(
        with_sharding(state, sharding.tree_shardings(state, mesh)),
        with_sharding(teacher, sharding.tree_shardings(teacher, mesh)),
        with_sharding(batch, jax.tree.map(lambda _: sharding.batch_sharding(mesh), batch)),
        with_sharding(null, jax.tree.map(lambda _: sharding.replicated(mesh), null)),
    )


def build_step(
    cfg: ml_collections.ConfigDict, models: Models, data: DataShape, mesh: jax.sharding.Mesh, global_batch: int
) -> TrainStep:
    """The training step of `cfg` for `models` on `data` records, `global_batch` per step over `mesh`."""
    settings = step_settings(cfg)
    teacher, student, pairs = make_models(settings.opts, cfg.kd.feature_regex, models)
    optimizer = make_optimizer(cfg.optim, cfg.total_steps)
    use_ema = cfg.ema.decay is not None
    state = jax.eval_shape(lambda p: init_state(p, optimizer, cfg.seed, use_ema), abstract_params(models.student))
    config = StepConfig(
        student=student,
        teacher=teacher,
        schedule=settings.schedule,
        progressive=settings.progressive,
        weights=settings.weights,
        pairs=pairs,
        optimizer=optimizer,
        ema_decay=cfg.ema.decay,
        caption_dropout=cfg.data.caption_dropout,
        grad_accum=cfg.optim.grad_accum,
    )
    teacher_dtype = settings.teacher_dtype if config.uses_teacher else None
    inputs = abstract_inputs(state, models, data, teacher_dtype, mesh, global_batch)
    fn = jit_train_step(
        config,
        jax.tree.map(lambda x: x.sharding, inputs.state),
        jax.tree.map(lambda x: x.sharding, inputs.teacher_params),
        sharding.batch_sharding(mesh),
        sharding.replicated(mesh),
    )
    return TrainStep(teacher, student, pairs, optimizer, config, mesh, inputs, fn, teacher_dtype)


def synthetic_shape(teacher: UNetConfig, resolution: int, text_len: int = 77) -> DataShape:
    """SDXL-shaped records of `resolution` px for `teacher` (benchmarks: random data, SDXL's VAE factor)."""
    latent = resolution // SDXL_VAE_FACTOR
    return DataShape((teacher.in_channels, latent, latent), text_len, SDXL_VAE_FACTOR, f"random, {resolution} px")


def random_inputs(tree, seed: int):
    """Device arrays shaped, typed and sharded like the ShapeDtypeStructs of `tree` (e.g. `TrainStep.inputs`), made
    on the devices: kernels, embeddings and data ~ N(0, 0.02^2), norm scales 1, biases 0. For benchmarks: values do
    not change time or memory, and finite ones keep the step's updates applied."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)

    def value(path, x, key):
        name = getattr(path[-1], "key", "") if path else ""
        if name == "scale":
            return jnp.ones(x.shape, x.dtype)
        if name == "bias" or not jnp.issubdtype(x.dtype, jnp.floating):
            return jnp.zeros(x.shape, x.dtype)
        return (0.02 * jax.random.normal(key, x.shape, jnp.float32)).astype(x.dtype)

    keys = jax.random.split(jax.random.key(seed), max(len(leaves), 1))
    make = jax.jit(
        lambda ks: treedef.unflatten([value(p, x, k) for (p, x), k in zip(leaves, ks)]),
        out_shardings=treedef.unflatten([x.sharding for _, x in leaves]),
    )
    return make(keys)
