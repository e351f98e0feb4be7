"""The training loop: data -> frozen teacher & student -> KOALA losses -> AdamW update (+ EMA) ->
checkpoint, on a (data, fsdp) device mesh; the same code runs on one CPU, N local devices, or every
host of a TPU pod / GPU cluster. `python train.py --config configs/<name>.py` calls `train`.
"""

from __future__ import annotations

import dataclasses
import signal
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from koala_jax.data import make_train_loader, to_global_batch
from koala_jax.dtypes import dtype
from koala_jax.errors import KoalaError
from koala_jax.train import preview, sharding
from koala_jax.train.checkpoint import Checkpointer, any_process, remove_unfinished, write_student_config
from koala_jax.train.lock import WorkdirLock
from koala_jax.train.metrics import Throughput, compiled_flops, measure_peak_flops
from koala_jax.train.noise import NoiseSchedule
from koala_jax.train.preflight import check_run
from koala_jax.train.setup import (
    load_models,
    make_models,
    make_source,
    make_step_config,
    place,
    setup_distributed,
    train_optimizer,
)
from koala_jax.train.state import init_state
from koala_jax.train.step import jit_train_step


class NonFiniteLossError(KoalaError):
    """A step whose loss or gradient is NaN/Inf: nothing was applied or saved."""


class Preemption:
    """SIGTERM (TPU preemption, a scheduler's kill) and Ctrl-C (SIGINT) alike: the loop finishes its step,
    saves a checkpoint, waits for it and returns. A second Ctrl-C stops at once (KeyboardInterrupt: no save;
    the run resumes from the last complete checkpoint). `close` gives the handlers back."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.requested: str | None = None  # the name of the first signal received
        self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.requested is None:
            self.requested = signal.Signals(signum).name
            again = " (Ctrl-C again: stop at once, without saving)" if signum == signal.SIGINT else ""
            info(f"{self.requested} received: finishing this step, saving a checkpoint and stopping{again}")

    def agreed(self) -> bool:
        """All processes stop at the same step if any of them was signalled."""
        return any_process(self.requested is not None)

    def close(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def info(message: str) -> None:
    """A progress message from process 0 (stdout: the console is for people, libraries stay quiet)."""
    if jax.process_index() == 0:
        print(message, flush=True)


def log_line(step: int, total: int, metrics: dict[str, float]) -> str:
    terms = " ".join(f"{k} {metrics[k]:.4f}" for k in ("total", "task", "out_kd", "feat_kd", "grad_norm"))
    speed = f"{metrics['step_time_s']:.3f} s/step {metrics['images_per_s']:.1f} img/s"
    mfu = f" MFU {100 * metrics['mfu']:.1f}%" if "mfu" in metrics else ""
    return f"step {step}/{total} | {terms} | {speed}{mfu}"


def train(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    """Run (or resume) a distillation; returns the history of logged metrics, the final state, the
    feature pairs, where the checkpoints are, and the signal that stopped it early (if one did).

    Every setting, input and an existing run in the workdir are checked first, before anything is loaded
    or written (`preflight`); the workdir is then locked for this run (`lock`)."""
    setup_distributed(cfg.distributed)
    check_run(cfg)
    lock = WorkdirLock(cfg.workdir) if jax.process_index() == 0 else None
    if lock:
        lock.acquire(info)
    preemption = Preemption()
    try:
        return run(cfg, preemption)
    finally:
        preemption.close()
        if lock:
            lock.release()


def run(cfg: ml_collections.ConfigDict, preemption: Preemption) -> dict[str, Any]:
    """The run of `train`, once its settings are checked and its workdir locked."""
    mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp)
    info(f"mesh {dict(mesh.shape)} over {jax.process_count()} process(es), {jax.device_count()} device(s)")

    # Models: frozen teacher, student derived from it (KOALA layer-wise removal) and initialised from it.
    teacher_config, teacher_host, built = load_models(cfg)
    teacher, student, pairs = make_models(cfg, teacher_config, built.config, built.selection)
    info(
        f"student {cfg.student.variant} of teacher {cfg.teacher.source}: {len(built.mapping)} tensors from the "
        f"teacher, {len(built.fresh)} fresh; {len(pairs)} feature KD pairs ({', '.join(cfg.kd.features)})"
    )

    # Data: per-process shards of the records, assembled into global batches on the mesh.
    source = make_source(cfg.data, teacher_config, cfg.workdir, cfg.teacher.source)
    loader = make_train_loader(
        source,
        global_batch_size=cfg.data.global_batch_size,
        seed=cfg.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        num_workers=cfg.data.num_workers,
    )
    null = jax.device_put(
        {k: jnp.asarray(v, jnp.float32) for k, v in source.null_embeddings().items()}, sharding.replicated(mesh)
    )

    # State: fresh (student on the mesh, optimizer initialised there) or restored from the latest checkpoint.
    optimizer = train_optimizer(cfg)
    use_ema = cfg.ema_decay is not None
    abstract = jax.eval_shape(lambda p: init_state(p, optimizer, cfg.seed, use_ema), built.params)
    state_shardings = sharding.tree_shardings(abstract, mesh)
    if jax.process_index() == 0:  # We hold the lock: nobody else is writing these.
        for name in remove_unfinished(cfg.workdir):
            info(f"removed {name}: an unfinished checkpoint save of an earlier run")
    checkpointer = Checkpointer(cfg.workdir, cfg.ckpt.every, cfg.ckpt.keep, cfg.ckpt.async_save)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_shardings)
    restored = checkpointer.restore_newest(target, loader, info)
    if restored is not None:
        start, state = restored
        info(f"resumed from step {start}")
    else:
        start = 0
        params = place(built.params, sharding.tree_shardings(built.params, mesh), check=cfg.teacher.source)
        state = jax.jit(lambda p: init_state(p, optimizer, cfg.seed, use_ema), out_shardings=state_shardings)(params)
    if jax.process_index() == 0:  # The run is consistent: its student is what the checkpoints hold.
        write_student_config(cfg.workdir, built.config)
    step_cfg = make_step_config(cfg, teacher, student, pairs, optimizer)
    teacher_params = {}  # Plain diffusion training (task loss only) never runs the teacher: it takes no memory.
    if step_cfg.uses_teacher:
        teacher_params = place(
            teacher_host,
            sharding.tree_shardings(teacher_host, mesh),
            dtype(cfg.teacher.param_dtype),
            check=cfg.teacher.source,
        )
    del teacher_host, built

    step_fn = jit_train_step(
        step_cfg,
        state_shardings,
        jax.tree.map(lambda x: x.sharding, teacher_params),
        sharding.batch_sharding(mesh),
        sharding.replicated(mesh),
    )

    writer = make_writer(cfg)
    peak = cfg.peak_tflops_per_device * 1e12 or measure_peak_flops(dtype(cfg.compute.dtype))
    if cfg.sample.every and not cfg.sample.vae:
        info("samples: no VAE given (sample.vae), TensorBoard shows latent previews")
    throughput, history, compiled, val_batch = None, [], None, None
    for step in range(start, cfg.total_steps):
        batch = to_global_batch(next(loader), mesh, sharding.BATCH_AXES)
        val_batch = val_batch or batch
        if compiled is None:
            with jax.set_mesh(mesh):  # Pallas attention kernels (flash/splash) shard_map over the mesh
                compiled = step_fn.lower(state, teacher_params, batch, null).compile()
            throughput = Throughput(cfg.data.global_batch_size, compiled_flops(compiled), peak)
        state, metrics = compiled(state, teacher_params, batch, null)
        if not bool(metrics["finite"]):
            checkpointer.wait()
            raise NonFiniteLossError(
                f"non-finite loss or gradient at step {step + 1} ({ {k: float(v) for k, v in metrics.items()} }); "
                f"the update was not applied and nothing was saved; last good checkpoint: "
                f"step {checkpointer.latest_step()} in {checkpointer.directory}"
            )
        throughput.tick()
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.total_steps:
            record = {
                "step": step + 1,
                **{k: float(v) for k, v in metrics.items() if k != "finite"},
                **throughput.report(),
                **{f"data/{k}": v for k, v in loader.skip_counts.items()},
            }
            history.append(record)
            info(log_line(step + 1, cfg.total_steps, record))
            if writer:
                for k, v in record.items():
                    writer.add_scalar(k if "/" in k else f"train/{k}", v, step + 1)
        if cfg.sample.every and (step + 1) % cfg.sample.every == 0:
            student_params = state.params if state.ema_params is None else state.ema_params
            with jax.set_mesh(mesh):
                log_samples(
                    writer,
                    step + 1,
                    cfg,
                    {
                        "student": (student, student_params),
                        **({"teacher": (teacher, teacher_params)} if teacher_params else {}),
                    },
                    step_cfg.schedule,
                    val_batch,
                )
        stop = preemption.agreed()
        checkpointer.save(step + 1, state, loader, force=stop or step + 1 == cfg.total_steps)
        if stop:
            break
    checkpointer.wait()
    checkpointer.close()
    loader.close()
    if writer:
        writer.close()
    return {
        "history": history,
        "state": state,
        "pairs": pairs,
        "checkpoints": checkpointer.directory,
        "step": int(state.step),
        "process_index": jax.process_index(),
        "stopped": preemption.requested,
    }


def log_samples(
    writer, step: int, cfg: ml_collections.ConfigDict, models: dict, noise_schedule: NoiseSchedule, val_batch: dict
) -> None:
    """Student and teacher samples for the same captions and noise, as one grid each."""
    n = cfg.sample.count
    noise = jax.random.normal(jax.random.key(cfg.seed), val_batch["latents"][:n].shape)
    for name, (unet, params) in models.items():
        plain = unet.clone(opts=dataclasses.replace(unet.opts, capture=(), remat=()))
        latents = jax.device_get(
            preview.euler_sample(
                plain,
                params,
                noise,
                val_batch["prompt_embeds"][:n],
                val_batch["pooled_prompt_embeds"][:n],
                val_batch["time_ids"][:n],
                noise_schedule,
                cfg.sample.steps,
            )
        )
        if writer is None:
            continue
        if cfg.sample.vae:
            from koala_jax.pipelines.vae import decode_latents

            images = decode_latents(latents, cfg.sample.vae)
        else:
            images = preview.latent_preview(latents)
        writer.add_image(f"samples/{name}", preview.grid(images, columns=n), step, dataformats="HWC")


def make_writer(cfg: ml_collections.ConfigDict):
    if not cfg.tensorboard or jax.process_index() != 0:
        return None
    from tensorboardX import SummaryWriter

    return SummaryWriter(f"{cfg.workdir}/tensorboard")
