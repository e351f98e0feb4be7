"""The end of a training run: its student (EMA if kept) beside its teacher on the run's evaluation prompts, written
to <workdir>/eval/ and summarised for the console (train.py's last lines)."""

from __future__ import annotations

import os
from pathlib import Path

import ml_collections

from koala_jax.errors import ConfigError
from koala_jax.evaluation.generators import evaluate_beside_teacher
from koala_jax.evaluation.world_eval import WorldEvaluation
from koala_jax.pipelines.sampling import Settings
from koala_jax.weights.pipeline_dir import default_image_size, is_pipeline_dir

SUMMARY_KEYS = ("colour", "shape", "colour_shape", "count", "position", "size", "relation", "all")


def check_evaluation(cfg: ml_collections.ConfigDict) -> None:
    """Refuse, before training, an evaluation that could not run at its end (`eval.prompts` needs the VAE and text
    encoders of a pipeline folder)."""
    pipeline = cfg.eval.pipeline or cfg.teacher.source
    if cfg.eval.prompts and not is_pipeline_dir(pipeline):
        raise ConfigError(
            f"eval.prompts needs a pipeline folder for the VAE and text encoders: eval.pipeline (default "
            f"teacher.source) {pipeline!r} is not one"
        )


def evaluate_run(cfg: ml_collections.ConfigDict) -> WorldEvaluation:
    """The run's student beside its teacher on `eval.*`'s prompts and seeds (report.json, report.md, grid.png in
    <workdir>/eval/)."""
    check_evaluation(cfg)
    evaluation = cfg.eval
    pipeline = evaluation.pipeline or cfg.teacher.source
    size = default_image_size(pipeline)
    settings = Settings(evaluation.steps, evaluation.guidance, evaluation.scheduler, size, size)
    teacher_unet = None if os.path.samefile(pipeline, cfg.teacher.source) else cfg.teacher.source
    ema = cfg.ema.decay is not None
    result = evaluate_beside_teacher(
        pipeline,
        teacher_unet,
        {"student": cfg.workdir},
        settings,
        evaluation.prompts,
        list(evaluation.seeds),
        ema,
        evaluation.batch_size,
    )
    result.report().write(Path(cfg.workdir) / "eval", {**evaluation.to_dict(), "size": size})
    return result


def evaluation_summary(evaluation: ml_collections.ConfigDict, workdir: str, result: WorldEvaluation) -> list[str]:
    """The student's accuracy next to the teacher's, and how close its images are."""
    teacher, student = result.accuracy["teacher"], result.accuracy["student"]
    agreement = result.agreement["student"]
    keys = [k for k in SUMMARY_KEYS if teacher[k] == teacher[k]]  # NaN: the prompts do not state it

    def share(key: str) -> str:
        return f"{100 * student[key] / teacher[key]:.0f}%" if teacher[key] else "n/a"

    return [
        f"evaluation ({evaluation.prompts}: {len(result.prompts)} prompts x {len(result.seeds)} seeds, "
        f"{evaluation.steps} Euler steps, guidance {evaluation.guidance}; the detector's accuracy; colour_shape: the "
        "named object's colour and shape; all: every stated attribute right, with exactly the objects named):",
        "  teacher: " + ", ".join(f"{k} {teacher[k]:.2f}" for k in keys),
        "  student: " + ", ".join(f"{k} {student[k]:.2f}" for k in keys),
        f"  the student has {share('colour_shape')} of the teacher's colour_shape and {share('all')} of its all",
        f"  student vs teacher from the same noise: PSNR {agreement['psnr_db']:.1f} dB, latent MSE "
        f"{agreement['latent_mse']:.4f}; grid and report in {Path(workdir) / 'eval'}",
    ]
