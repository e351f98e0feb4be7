"""The training loop: data -> frozen teacher & student -> KOALA losses -> AdamW update (+ EMA) -> periodic actions
(log, previews, checkpoint), on a (data, fsdp) device mesh; the same code runs on one CPU, N local devices, or every
host of a TPU pod / GPU cluster. `python train.py --config configs/<name>.py` calls `train`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from koala_jax.console import info
from koala_jax.data import make_train_loader, to_global_batch
from koala_jax.errors import KoalaError
from koala_jax.train import sharding
from koala_jax.train.actions import Checkpoints, Logger, Previews, StepOutput, make_writer
from koala_jax.train.checkpoint import Checkpointer, remove_unfinished, write_student_config
from koala_jax.train.identity import check_identity
from koala_jax.train.lock import WorkdirLock
from koala_jax.train.metrics import Throughput, compiled_flops, measure_peak_flops
from koala_jax.train.preemption import Preemption
from koala_jax.train.preflight import check_run
from koala_jax.train.setup import load_models, make_source, place, place_teacher, record_shape, setup_distributed
from koala_jax.train.state import init_state
from koala_jax.train.step_builder import Models, TrainStep, build_step


class NonFiniteLossError(KoalaError):
    """A step whose loss or gradient is NaN/Inf: nothing was applied or saved."""


@dataclasses.dataclass
class TrainResult:
    """How a run ended: the last step, the logged metrics, where the checkpoints are, the signal that stopped it
    early (if one did), the final state and the feature pairs."""

    step: int
    total_steps: int
    history: list[dict[str, float]]
    checkpoints: str
    stopped: str | None
    state: Any
    pairs: dict[str, str]

    @property
    def main_process(self) -> bool:
        return jax.process_index() == 0


def train(cfg: ml_collections.ConfigDict) -> TrainResult:
    """Run (or resume) a distillation. Every setting, input and an existing run in the workdir are checked first,
    before anything is loaded or written (`preflight`); the workdir is then locked for this run (`lock`)."""
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


def run(cfg: ml_collections.ConfigDict, preemption: Preemption) -> TrainResult:
    """The run of `train`, once its settings are checked and its workdir locked."""
    mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp)
    info(f"mesh {dict(mesh.shape)} over {jax.process_count()} process(es), {jax.device_count()} device(s)")
    models, teacher_host, built = load_models(cfg.teacher, cfg.student, cfg.seed)
    source = make_source(cfg.data, models)
    step = build_step(cfg, models, record_shape(source), mesh, cfg.data.global_batch_size)
    teacher_params = place_teacher(step, teacher_host, cfg.teacher.source)
    info(
        f"student {cfg.student.variant} of teacher {cfg.teacher.source}: {len(built.mapping)} tensors from the "
        f"teacher, {len(built.fresh)} fresh; {len(step.pairs)} feature KD pairs ({', '.join(cfg.kd.features)})"
    )
    for line in check_identity(cfg, teacher_host, source):  # the teacher and data of the run it resumes
        info(line)
    del teacher_host
    loader = make_train_loader(
        source,
        global_batch_size=cfg.data.global_batch_size,
        seed=cfg.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        num_workers=cfg.data.num_workers,
    )
    checkpointer, restored = open_checkpoints(cfg, models, step, loader)
    start, state = restored or (0, initial_state(cfg.seed, step, built.params, cfg.teacher.source))
    del built
    checkpointer.check_space(state, start + 1)  # a run that could never save stops before it trains
    null = jax.device_put(
        {k: jnp.asarray(v, jnp.float32) for k, v in source.null_embeddings().items()}, sharding.replicated(mesh)
    )

    if start >= cfg.total_steps:
        info(f"nothing to train: the run in {cfg.workdir} is at step {start}, total_steps is {cfg.total_steps}")
    compiled = step.compile() if start < cfg.total_steps else None
    peak = cfg.peak_tflops_per_device * 1e12 or measure_peak_flops(step.student.opts.dtype)
    throughput = Throughput(cfg.data.global_batch_size, compiled and compiled_flops(compiled), peak)
    writer = make_writer(cfg.tensorboard, cfg.workdir)
    logger = Logger(cfg.log_every, cfg.total_steps, start, throughput, loader, writer)
    teacher = (step.teacher, teacher_params) if teacher_params else None
    actions = [
        logger,
        Previews(cfg.sample, cfg.seed, step.student, teacher, step.config.schedule, mesh, writer),
        Checkpoints(checkpointer, loader, cfg.total_steps),
    ]
    try:
        for number in range(start + 1, cfg.total_steps + 1):
            batch = to_global_batch(next(loader), mesh, sharding.BATCH_AXES)
            state, metrics = compiled(state, teacher_params, batch, null)
            check_finite(metrics, number, checkpointer)
            out = StepOutput(number, state, metrics, batch, preemption.agreed())
            for action in actions:
                action(out)
            if out.stop:
                break
        checkpointer.wait()
    finally:
        logger.close()
        checkpointer.close()
        loader.close()
    return TrainResult(
        int(state.step),
        cfg.total_steps,
        logger.history,
        str(checkpointer.directory),
        preemption.requested,
        state,
        step.pairs,
    )


def open_checkpoints(cfg: ml_collections.ConfigDict, models: Models, step: TrainStep, loader):
    """(checkpointer, (step, state) of the newest readable checkpoint or None). Unfinished saves of an earlier run
    are removed first, and the student the checkpoints hold is recorded (preflight checked it is the saved run's)."""
    if jax.process_index() == 0:  # We hold the lock: nobody else is writing these.
        for name in remove_unfinished(cfg.workdir):
            info(f"removed {name}: an unfinished checkpoint save of an earlier run")
        write_student_config(cfg.workdir, models.student)
    checkpointer = Checkpointer(cfg.workdir, cfg.ckpt.every, cfg.ckpt.keep, cfg.ckpt.async_save)
    restored = checkpointer.restore_newest(step.inputs.state, loader, info)
    if restored is not None:
        info(f"resumed from step {restored[0]}")
    return checkpointer, restored


def initial_state(seed: int, step: TrainStep, params, source: str):
    """The student's params placed on the mesh (values checked) with a fresh optimizer state (and EMA)."""
    shardings = step.shardings(step.inputs.state)
    placed = place(params, shardings.params, check=source)
    use_ema = step.inputs.state.ema_params is not None
    return jax.jit(lambda p: init_state(p, step.optimizer, seed, use_ema), out_shardings=shardings)(placed)


def check_finite(metrics: dict, number: int, checkpointer: Checkpointer) -> None:
    """Stop at a non-finite loss or gradient (the step left the state unchanged), naming the last good checkpoint."""
    if bool(metrics["finite"]):
        return
    checkpointer.wait()
    raise NonFiniteLossError(
        f"non-finite loss or gradient at step {number} ({ {k: float(v) for k, v in metrics.items()} }); "
        f"the update was not applied and nothing was saved; last good checkpoint: "
        f"step {checkpointer.latest_step()} in {checkpointer.directory}"
    )
