"""KOALA distillation: `python train.py --config configs/<name>.py [--config.key=value ...]`.

The data flow of one run, in order: data -> frozen teacher & student -> KOALA losses -> AdamW update
(+ EMA) -> checkpoint. Everything is laid out on a (data, fsdp) device mesh; the same script runs on
one CPU, N local devices, or every host of a TPU pod / GPU cluster.
"""

from __future__ import annotations

import dataclasses
import signal
import sys
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, logging
from ml_collections import config_flags

from koala_jax.data import SyntheticSource, make_train_loader, open_source, to_global_batch
from koala_jax.loading import abstract_params, dummy_inputs
from koala_jax.models import ForwardOptions, UNet2DConditionModel, UNetConfig
from koala_jax.train import preview, sharding
from koala_jax.train.checkpoint import Checkpointer, write_student_config
from koala_jax.train.losses import LossWeights, feature_pairs
from koala_jax.train.metrics import Throughput, compiled_flops, measure_peak_flops
from koala_jax.train.models import build_student, load_teacher, param_dtype, place
from koala_jax.train.noise import NoiseSchedule
from koala_jax.train.state import init_state, make_optimizer
from koala_jax.train.step import StepConfig, jit_train_step

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py).", lock_config=True)


class Preemption:
    """Set by SIGTERM (TPU preemption, scheduler kill): the loop saves a checkpoint and exits."""

    def __init__(self) -> None:
        self.requested = False
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        logging.warning("SIGTERM received: saving a checkpoint and stopping")
        self.requested = True

    def agreed(self) -> bool:
        """All processes stop at the same step if any of them was signalled."""
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils

        return bool(np.any(multihost_utils.process_allgather(np.array(self.requested))))


def setup_distributed(cfg: ml_collections.ConfigDict) -> None:
    if cfg.auto:
        jax.distributed.initialize()
    elif cfg.coordinator:
        if jax.config.jax_platforms in (None, "", "cpu"):
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(cfg.coordinator, num_processes=cfg.num_processes, process_id=cfg.process_id)


def make_source(cfg: ml_collections.ConfigDict, teacher: UNetConfig):
    """The record source: a prepared dataset folder, or synthetic records shaped for `teacher`."""
    if cfg.source != "synthetic":
        return open_source(cfg.source)
    pooled = teacher.projection_class_embeddings_input_dim - 6 * teacher.addition_time_embed_dim
    size = cfg.synthetic_latent_size
    return SyntheticSource(cfg.synthetic_records, (teacher.in_channels, size, size), cfg.synthetic_text_len,
                           teacher.cross_attention_dim[0], pooled)


def make_models(cfg: ml_collections.ConfigDict, teacher_config: UNetConfig, student_config: UNetConfig
                ) -> tuple[UNet2DConditionModel, UNet2DConditionModel, dict[str, str]]:
    """(teacher, student, feature pairs). The teacher needs no remat: it is never differentiated."""
    c = cfg.compute
    capture = tuple(cfg.kd.features) if cfg.kd.feat else ()
    opts = ForwardOptions(dtype=param_dtype(c.dtype), remat=tuple(c.remat), remat_policy=c.remat_policy,
                          attention_impl=c.attention_impl, capture=capture)
    teacher = UNet2DConditionModel(teacher_config, dataclasses.replace(opts, remat=()))
    student = UNet2DConditionModel(student_config, opts)

    def feature_shapes(model: UNet2DConditionModel) -> dict[str, tuple]:
        variables = {"params": abstract_params(model.config, model.opts)}
        _, feats = jax.eval_shape(lambda v: model.apply_with_features(v, *dummy_inputs(model.config, size=16)), variables)
        return {k: v.shape for k, v in feats.items()}

    pairs = feature_pairs(feature_shapes(student), feature_shapes(teacher), teacher_config, student_config,
                          cfg.kd.feature_regex) if capture else {}
    return teacher, student, pairs


def info(message: str) -> None:
    """A progress message from process 0 (stdout, so it shows without absl's log setup)."""
    if jax.process_index() == 0:
        print(message, flush=True)


def log_line(step: int, total: int, metrics: dict[str, float]) -> str:
    terms = " ".join(f"{k} {metrics[k]:.4f}" for k in ("total", "task", "out_kd", "feat_kd", "grad_norm"))
    speed = f"{metrics['step_time_s']:.3f} s/step {metrics['images_per_s']:.1f} img/s"
    mfu = f" MFU {100 * metrics['mfu']:.1f}%" if "mfu" in metrics else ""
    return f"step {step}/{total} | {terms} | {speed}{mfu}"


def train(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    """Run (or resume) a distillation; returns the history of logged metrics."""
    setup_distributed(cfg.distributed)
    mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp)
    info(f"mesh {dict(mesh.shape)} over {jax.process_count()} process(es), {jax.device_count()} device(s)")

    # Models: frozen teacher, student derived from it (KOALA layer-wise removal) and initialised from it.
    teacher_config, teacher_host = load_teacher(cfg.teacher, cfg.seed)
    student_config, student_host, fresh = build_student(cfg.student, teacher_config, teacher_host, cfg.seed)
    info(f"student {cfg.student.variant} from teacher {cfg.teacher}; fresh params: {fresh or 'none'}")
    if jax.process_index() == 0:
        write_student_config(cfg.workdir, student_config)
    teacher, student, pairs = make_models(cfg, teacher_config, student_config)
    info(f"feature KD pairs (student <- teacher): {len(pairs)}")

    # Data: per-process shards of the records, assembled into global batches on the mesh.
    source = make_source(cfg.data, teacher_config)
    loader = make_train_loader(source, global_batch_size=cfg.data.global_batch_size, seed=cfg.seed,
                               process_index=jax.process_index(), process_count=jax.process_count(),
                               num_workers=cfg.data.num_workers)
    null = jax.device_put({k: jnp.asarray(v, jnp.float32) for k, v in source.null_embeddings().items()},
                          sharding.replicated(mesh))

    # State: fresh (student on the mesh, optimizer initialised there) or restored from the latest checkpoint.
    optimizer = make_optimizer(ml_collections.ConfigDict({**cfg.optim.to_dict(), "total_steps": cfg.total_steps}))
    use_ema = cfg.ema_decay is not None
    abstract = jax.eval_shape(lambda p: init_state(p, optimizer, cfg.seed, use_ema), student_host)
    state_shardings = sharding.tree_shardings(abstract, mesh)
    checkpointer = Checkpointer(cfg.workdir, cfg.ckpt_every, cfg.keep_checkpoints, cfg.async_checkpoint)
    start = checkpointer.latest_step()
    if start is not None:
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_shardings)
        state = checkpointer.restore(start, target, loader)
        info(f"resumed from step {start}")
    else:
        start = 0
        params = place(student_host, sharding.tree_shardings(student_host, mesh))
        state = jax.jit(lambda p: init_state(p, optimizer, cfg.seed, use_ema), out_shardings=state_shardings)(params)
    teacher_params = place(teacher_host, sharding.tree_shardings(teacher_host, mesh), param_dtype(cfg.teacher_param_dtype))
    del teacher_host, student_host

    step_cfg = StepConfig(student=student, teacher=teacher,
                          schedule=NoiseSchedule(cfg.noise.num_train_timesteps, cfg.noise.beta_start, cfg.noise.beta_end,
                                                 cfg.noise.prediction_type,
                                                 tuple(cfg.noise.timesteps) if cfg.noise.timesteps else None),
                          weights=LossWeights(cfg.kd.task, cfg.kd.out, cfg.kd.feat), pairs=pairs,
                          optimizer=optimizer, ema_decay=cfg.ema_decay, caption_dropout=cfg.data.caption_dropout,
                          grad_accum=cfg.optim.grad_accum)
    step_fn = jit_train_step(step_cfg, state_shardings, jax.tree.map(lambda x: x.sharding, teacher_params),
                             sharding.batch_sharding(mesh), sharding.replicated(mesh))

    preemption = Preemption()
    writer = make_writer(cfg)
    peak = cfg.peak_tflops_per_device * 1e12 or measure_peak_flops(param_dtype(cfg.compute.dtype))
    if cfg.sample_every and not cfg.sample_vae:
        info("samples: no VAE given (sample_vae), TensorBoard shows latent previews")
    throughput, history, compiled, val_batch = None, [], None, None
    for step in range(start, cfg.total_steps):
        batch = to_global_batch(next(loader), mesh, sharding.BATCH_AXES)
        val_batch = val_batch or batch
        if compiled is None:
            compiled = step_fn.lower(state, teacher_params, batch, null).compile()
            throughput = Throughput(cfg.data.global_batch_size, compiled_flops(compiled), peak)
        state, metrics = compiled(state, teacher_params, batch, null)
        if not bool(metrics["finite"]):
            checkpointer.wait()
            raise FloatingPointError(
                f"non-finite loss or gradient at step {step + 1} ({ {k: float(v) for k, v in metrics.items()} }); "
                f"the update was not applied and nothing was saved; last good checkpoint: "
                f"step {checkpointer.latest_step()} in {checkpointer.directory}")
        throughput.tick()
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.total_steps:
            record = {"step": step + 1, **{k: float(v) for k, v in metrics.items() if k != "finite"},
                      **throughput.report(), **{f"data/{k}": v for k, v in loader.skip_counts.items()}}
            history.append(record)
            if jax.process_index() == 0:
                print(log_line(step + 1, cfg.total_steps, record), flush=True)
                if writer:
                    for k, v in record.items():
                        writer.add_scalar(k if "/" in k else f"train/{k}", v, step + 1)
        if cfg.sample_every and (step + 1) % cfg.sample_every == 0:
            student_params = state.params if state.ema_params is None else state.ema_params
            log_samples(writer, step + 1, cfg, {"student": (student, student_params), "teacher": (teacher, teacher_params)},
                        step_cfg.schedule, val_batch)
        stop = preemption.agreed()
        checkpointer.save(step + 1, state, loader, force=stop or step + 1 == cfg.total_steps)
        if stop:
            break
    checkpointer.wait()
    checkpointer.close()
    loader.close()
    if writer:
        writer.close()
    return {"history": history, "state": state, "pairs": pairs}


def log_samples(writer, step: int, cfg: ml_collections.ConfigDict, models: dict, noise_schedule: NoiseSchedule,
                val_batch: dict) -> None:
    """Student and teacher samples for the same captions and noise, as one grid each."""
    n = cfg.sample_count
    noise = jax.random.normal(jax.random.key(cfg.seed), val_batch["latents"][:n].shape)
    for name, (unet, params) in models.items():
        plain = unet.clone(opts=dataclasses.replace(unet.opts, capture=(), remat=()))
        latents = jax.device_get(preview.euler_sample(
            plain, params, noise, val_batch["prompt_embeds"][:n], val_batch["pooled_prompt_embeds"][:n],
            val_batch["time_ids"][:n], noise_schedule, cfg.sample_steps))
        if writer is None:
            continue
        images = preview.decode_with_vae(latents, cfg.sample_vae) if cfg.sample_vae else preview.latent_preview(latents)
        writer.add_image(f"samples/{name}", preview.grid(images, columns=n), step, dataformats="HWC")


def make_writer(cfg: ml_collections.ConfigDict):
    if not cfg.tensorboard or jax.process_index() != 0:
        return None
    from tensorboardX import SummaryWriter

    return SummaryWriter(f"{cfg.workdir}/tensorboard")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _CONFIG.value is None:
        raise app.UsageError("--config is required, e.g. --config configs/tiny.py")
    try:
        train(_CONFIG.value)
    except FloatingPointError as e:
        logging.error("%s", e)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
