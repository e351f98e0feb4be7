"""KOALA distillation: `python train.py --config configs/<name>.py [--config.key=value ...]`.

Any key of the config can be overridden (`--config.optim.lr=1e-5`); an unknown key is an error.
`--verbose` shows the libraries' own logs (orbax, absl), `--debug` the traceback of an error.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path

from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags

from koala_jax.cli.runner import run
from koala_jax.errors import ConfigError, KoalaError, MissingPathError
from koala_jax.train.config import RENAMED

FLAGS = flags.FlagValues()
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file (configs/*.py).", lock_config=True, flag_values=FLAGS
)
_VERBOSE = flags.DEFINE_bool("verbose", False, "Show library logs (orbax, absl, grain).", flag_values=FLAGS)
flags.DEFINE_bool("debug", False, "Show the traceback of an error.", flag_values=FLAGS)
NOISY_LOGGERS = ("absl", "orbax", "jax", "grain", "tensorflow_datasets", "asyncio")


def check_renamed(argv: list[str]) -> None:
    """Refuse the flat keys of earlier releases by their new name (before parsing anything)."""
    for arg in argv:
        m = re.match(r"--config\.([\w.]+)", arg)
        if m and m.group(1) in RENAMED:
            raise KoalaError(f"--config.{m.group(1)} is now --config.{RENAMED[m.group(1)]}")


def check_config_file(argv: list[str]) -> None:
    """A missing --config file is one line (ml_collections would print its whole search)."""
    for i, arg in enumerate(argv):
        path = (
            arg.partition("=")[2]
            if arg.startswith("--config=")
            else argv[i + 1]
            if arg == "--config" and i + 1 < len(argv)
            else None
        )
        if path is not None and not Path(path.split(":")[0]).is_file():
            raise MissingPathError(f"--config {path}: no such file (the shipped configs are in configs/)")


def parse(argv: list[str]):
    """The config of `--config` with every override applied; a bad flag or key is one line."""
    check_renamed(argv)
    check_config_file(argv)
    try:
        rest = FLAGS(["train.py", *argv])
    except flags.Error as e:
        raise KoalaError(str(e).splitlines()[0]) from e
    except (AttributeError, KeyError) as e:  # ml_collections' answer to an override of a key that does not exist.
        message = e
        while isinstance(message, BaseException) and message.args:  # AttributeError(KeyError("'lrr'\nDid you..."))
            message = message.args[0]
        name, _, hint = str(message).partition("\n")
        name = name.strip("\"'")
        given = [a.split("=")[0] for a in argv if a.startswith("--config.") and name in a.split("=")[0].split(".")]
        hint = f" ({hint.strip()})" if hint.strip() else ""
        raise KoalaError(
            f"unknown config key {given[0] if given else name}{hint}; see koala_jax/train/config.py"
        ) from e
    if len(rest) > 1:
        raise KoalaError(f"unexpected arguments: {' '.join(rest[1:])}")
    if _CONFIG.value is None:
        raise KoalaError("--config is required, e.g. --config configs/tiny.py")
    return _CONFIG.value


def quiet_libraries(verbose: bool) -> None:
    """Libraries log INFO/WARNING lines by the hundred (orbax per save, absl per flag); keep the console
    for our progress lines unless asked."""
    if verbose:
        return
    # Errors too: a failed checkpoint save logs a traceback per tensor; ours is the one line that says what failed.
    absl_logging.set_verbosity(absl_logging.FATAL)
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.CRITICAL)


def summary(cfg, result: dict) -> list[str]:
    """What a person needs after a run: where the student is and how to take it out."""
    workdir = cfg.workdir
    ema = " --ema" if cfg.ema_decay is not None else ""
    last = result["history"][-1] if result["history"] else None
    step = f"step {result['step']}/{cfg.total_steps}"
    stopped = result.get("stopped")  # a signal: the checkpoint of that step is saved, the run resumes from it
    first = f"stopped by {stopped} at {step}, checkpoint saved; rerun the same command to resume" if stopped else None
    lines = [first or f"done: {step}, checkpoints in {result['checkpoints']}"]
    if last:
        lines.append(
            f"final loss {last['total']:.4f} (task {last['task']:.4f}, output KD {last['out_kd']:.4f}, "
            f"feature KD {last['feat_kd']:.4f})"
        )
    lines.append(f"export: python convert_weights.py to-diffusers --checkpoint {workdir}{ema} --out {workdir}/export")
    return lines


def train_command(argv: list[str]) -> int:
    cfg = parse(argv)
    quiet_libraries(_VERBOSE.value)
    if cfg.plan or cfg.plan_hbm_gib:  # Compile the step and report its memory; trains nothing.
        from koala_jax.train.plan import plan

        plan(cfg)
        return 0
    from koala_jax.train.loop import train  # Heavy (jax, orbax): only once the arguments are fine.

    result = train(cfg)
    lines = summary(cfg, result)
    if cfg.eval.prompts and result["process_index"] == 0 and not result["stopped"]:
        lines += evaluation_summary(cfg, evaluate_run(cfg))
    print("\n".join(lines), flush=True)
    return 0


def evaluate_run(cfg):
    """The run's student (EMA if kept) beside its teacher on `cfg.eval`'s prompts and seeds, written to
    <workdir>/eval/ (report.json, report.md, grid.png); a `world_eval.WorldEvaluation`."""
    from koala_jax.evaluation.generators import evaluate_beside_teacher  # Heavy: only for runs that evaluate.
    from koala_jax.pipelines.sampling import Settings
    from koala_jax.weights.pipeline_dir import default_image_size, is_pipeline_dir

    pipeline = cfg.eval.pipeline or cfg.teacher.source
    if not is_pipeline_dir(pipeline):
        raise ConfigError(
            f"eval needs a pipeline folder for the VAE and text encoders: eval.pipeline (default "
            f"teacher.source) {pipeline!r} is not one"
        )
    size = default_image_size(pipeline)
    settings = Settings(cfg.eval.steps, cfg.eval.guidance, cfg.eval.scheduler, size, size)
    teacher_unet = None if os.path.samefile(pipeline, cfg.teacher.source) else cfg.teacher.source
    students = {"student": cfg.workdir}
    ema = cfg.ema_decay is not None
    result = evaluate_beside_teacher(
        pipeline, teacher_unet, students, settings, cfg.eval.prompts, list(cfg.eval.seeds), ema, cfg.eval.batch_size
    )
    result.report().write(Path(cfg.workdir) / "eval", {**cfg.eval.to_dict(), "size": size})
    return result


def evaluation_summary(cfg, result) -> list[str]:
    """The student's accuracy next to the teacher's, and how close its images are."""
    teacher, student = result.accuracy["teacher"], result.accuracy["student"]
    agreement = result.agreement["student"]
    keys = [
        k
        for k in ("colour", "shape", "colour_shape", "count", "position", "size", "relation", "all")
        if teacher[k] == teacher[k]
    ]

    def share(key: str) -> str:
        return f"{100 * student[key] / teacher[key]:.0f}%" if teacher[key] else "n/a"

    return [
        f"evaluation ({cfg.eval.prompts}: {len(result.prompts)} prompts x {len(result.seeds)} seeds, {cfg.eval.steps} "
        f"Euler steps, guidance {cfg.eval.guidance}; the detector's accuracy; colour_shape: the named object's colour "
        "and shape; all: every stated attribute right, with exactly the objects named):",
        "  teacher: " + ", ".join(f"{k} {teacher[k]:.2f}" for k in keys),
        "  student: " + ", ".join(f"{k} {student[k]:.2f}" for k in keys),
        f"  the student has {share('colour_shape')} of the teacher's colour_shape and {share('all')} of its all",
        f"  student vs teacher from the same noise: PSNR {agreement['psnr_db']:.1f} dB, latent MSE "
        f"{agreement['latent_mse']:.4f}; grid and report in {Path(cfg.workdir) / 'eval'}",
    ]


def main(argv: list[str] | None = None) -> int:
    return run(train_command, sys.argv[1:] if argv is None else argv)
