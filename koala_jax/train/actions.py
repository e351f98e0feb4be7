"""What the loop does besides stepping, as periodic actions (Flax examples' `periodic_actions`, big_vision's hooks):
each is called after every step with the step number and what the step produced, acts when its period comes, and
can be built and tested alone. The loop itself (loop.py) reads as the data flow.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import ml_collections

from koala_jax.console import Progress, info
from koala_jax.train import preview
from koala_jax.train.checkpoint import Checkpointer
from koala_jax.train.metrics import Throughput
from koala_jax.train.noise import NoiseSchedule


@dataclasses.dataclass
class StepOutput:
    """What one step produced, handed to every action."""

    step: int  # the number of updates done so far (1 after the first step)
    state: Any
    metrics: dict[str, Any]
    batch: dict[str, Any]
    stop: bool  # a signal asked every process to stop after this step


def log_line(step: int, total: int, record: dict[str, float]) -> str:
    """One log line: the loss terms, the speed and, when the loader skipped records, how many."""
    terms = " ".join(f"{k} {record[k]:.4f}" for k in ("total", "task", "out_kd", "feat_kd", "grad_norm"))
    speed = f"{record['step_time_s']:.3f} s/step {record['images_per_s']:.1f} img/s"
    mfu = f" MFU {100 * record['mfu']:.1f}%" if "mfu" in record else ""
    skipped = ", ".join(f"{k[len('data/') :]} {int(v)}" for k, v in record.items() if k.startswith("data/") and v)
    return f"step {step}/{total} | {terms} | {speed}{mfu}" + (f" | skipped {skipped}" if skipped else "")


class Logger:
    """Every `every` steps (and the last): a log line, TensorBoard scalars, and a history entry; a progress bar on
    a terminal in between."""

    def __init__(self, every: int, total: int, start: int, throughput: Throughput, loader, writer) -> None:
        self.every, self.total, self.throughput, self.loader, self.writer = every, total, throughput, loader, writer
        self.history: list[dict[str, float]] = []
        self.bar = Progress(total, "training", initial=start, unit="step")

    def __call__(self, out: StepOutput) -> None:
        self.throughput.tick()
        self.bar.update()
        if out.step % self.every and out.step != self.total:
            return
        record = {
            "step": out.step,
            **{k: float(v) for k, v in out.metrics.items() if k != "finite"},
            **self.throughput.report(),
            **{f"data/{k}": v for k, v in self.loader.skip_counts.items()},
        }
        self.history.append(record)
        info(log_line(out.step, self.total, record))
        if self.writer:
            for k, v in record.items():
                self.writer.add_scalar(k if "/" in k else f"train/{k}", v, out.step)

    def close(self) -> None:
        self.bar.close()
        if self.writer:
            self.writer.close()


class Previews:
    """Every `sample.every` steps: student (EMA if kept) and teacher samples for the same captions and noise, one
    TensorBoard grid each. `teacher`: (module, params), or None where the step never runs the teacher."""

    def __init__(
        self, sample: ml_collections.ConfigDict, seed: int, student, teacher, schedule: NoiseSchedule, mesh, writer
    ):
        self.sample, self.seed, self.student, self.teacher = sample, seed, student, teacher
        self.schedule, self.mesh, self.writer = schedule, mesh, writer
        self.captions: dict | None = None  # the first batch: the same captions at every preview
        if sample.every and not sample.vae:
            info("samples: no VAE given (sample.vae), TensorBoard shows latent previews")

    def __call__(self, out: StepOutput) -> None:
        self.captions = self.captions or out.batch
        if not self.sample.every or out.step % self.sample.every:
            return
        self.draw(
            "student",
            self.student,
            out.state.params if out.state.ema_params is None else out.state.ema_params,
            out.step,
        )
        if self.teacher:
            self.draw("teacher", *self.teacher, out.step)

    def draw(self, name: str, unet, params, step: int) -> None:
        n, batch = self.sample.count, self.captions
        noise = jax.random.normal(jax.random.key(self.seed), batch["latents"][:n].shape)
        plain = unet.clone(opts=dataclasses.replace(unet.opts, capture=(), remat=()))
        with jax.set_mesh(self.mesh):
            latents = preview.euler_sample(
                plain,
                params,
                noise,
                batch["prompt_embeds"][:n],
                batch["pooled_prompt_embeds"][:n],
                batch["time_ids"][:n],
                self.schedule,
                self.sample.steps,
            )
        if self.writer is None:
            return
        if self.sample.vae:
            from koala_jax.pipelines.vae import decode_latents

            images = decode_latents(jax.device_get(latents), self.sample.vae)
        else:
            images = preview.latent_preview(jax.device_get(latents))
        self.writer.add_image(f"samples/{name}", preview.grid(images, columns=n), step, dataformats="HWC")


class Checkpoints:
    """Every `ckpt.every` steps, when a signal stops the run, and at the last step: save (asynchronously)."""

    def __init__(self, checkpointer: Checkpointer, loader, total: int) -> None:
        self.checkpointer, self.loader, self.total = checkpointer, loader, total

    def __call__(self, out: StepOutput) -> None:
        self.checkpointer.save(out.step, out.state, self.loader, force=out.stop or out.step == self.total)


def make_writer(tensorboard: bool, workdir: str):
    """The TensorBoard writer of process 0 (<workdir>/tensorboard), or None."""
    if not tensorboard or jax.process_index() != 0:
        return None
    from tensorboardX import SummaryWriter

    return SummaryWriter(f"{workdir}/tensorboard")
