"""KOALA distillation: `python train.py --config configs/<name>.py [--config.key=value ...]`.

Any key of the config can be overridden (`--config.optim.lr=1e-5`); an unknown key is an error.
`--verbose` shows the libraries' own logs (orbax, absl), `--debug` the traceback of an error.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import ml_collections
from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags

from koala_jax.cli.runner import run
from koala_jax.errors import KoalaError, MissingPathError
from koala_jax.train.config import RENAMED, load_config_file

NOISY_LOGGERS = ("absl", "orbax", "jax", "grain", "tensorflow_datasets", "asyncio")


def check_renamed(argv: list[str]) -> None:
    """Refuse the flat keys of earlier releases by their new name (before parsing anything)."""
    for arg in argv:
        m = re.match(r"--config\.([\w.]+)", arg)
        if m and m.group(1) in RENAMED:
            raise KoalaError(f"--config.{m.group(1)} is now --config.{RENAMED[m.group(1)]}")


def split_config_path(argv: list[str]) -> tuple[str, list[str]]:
    """(the --config file, the other arguments); a missing file is one line."""
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            path, rest = arg.partition("=")[2], argv[:i] + argv[i + 1 :]
        elif arg == "--config" and i + 1 < len(argv):
            path, rest = argv[i + 1], argv[:i] + argv[i + 2 :]
        else:
            continue
        if not Path(path).is_file():
            raise MissingPathError(f"--config {path}: no such file (the shipped configs are in configs/)")
        return path, rest
    raise KoalaError("--config is required, e.g. --config configs/tiny.py")


def make_flags(cfg: ml_collections.ConfigDict, argv: list[str]) -> flags.FlagValues:
    """The command line's flags: `--config.<key>=<value>` overrides of `cfg` (those `argv` gives), --verbose and
    --debug."""
    values = flags.FlagValues()
    config_flags.DEFINE_config_dict("config", cfg, "Training config.", flag_values=values, sys_argv=["train.py", *argv])
    flags.DEFINE_bool("verbose", False, "Show library logs (orbax, absl, grain).", flag_values=values)
    flags.DEFINE_bool("debug", False, "Show the traceback of an error.", flag_values=values)
    return values


def parse(argv: list[str]) -> tuple[ml_collections.ConfigDict, bool]:
    """(the config of `--config` with every override applied, --verbose); a bad file, flag or key is one line."""
    check_renamed(argv)
    path, rest = split_config_path(argv)
    cfg = load_config_file(path)
    try:
        values = make_flags(cfg, rest)
        unparsed = values(["train.py", *rest])
    except flags.Error as e:
        raise KoalaError(str(e).splitlines()[0]) from e
    except (AttributeError, KeyError) as e:  # ml_collections' answer to an override of a key that does not exist.
        raise KoalaError(unknown_override(e, rest)) from e
    if len(unparsed) > 1:
        raise KoalaError(f"unexpected arguments: {' '.join(unparsed[1:])}")
    return values.config, values.verbose


def unknown_override(error: BaseException, argv: list[str]) -> str:
    """The line for `--config.<key>=...` naming a key that does not exist (with ml_collections' closest key)."""
    message = error
    while isinstance(message, BaseException) and message.args:  # AttributeError(KeyError("'lrr'\nDid you..."))
        message = message.args[0]
    name, _, hint = str(message).partition("\n")
    name = name.strip("\"'")
    given = [a.split("=")[0] for a in argv if a.startswith("--config.") and name in a.split("=")[0].split(".")]
    hint = f" ({hint.strip()})" if hint.strip() else ""
    return f"unknown config key {given[0] if given else name}{hint}; see koala_jax/train/config.py"


def quiet_libraries(verbose: bool) -> None:
    """Libraries log INFO/WARNING lines by the hundred (orbax per save, absl per flag); keep the console
    for our progress lines unless asked."""
    if verbose:
        return
    # Errors too: a failed checkpoint save logs a traceback per tensor; ours is the one line that says what failed.
    absl_logging.set_verbosity(absl_logging.FATAL)
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.CRITICAL)


def summary(cfg: ml_collections.ConfigDict, result) -> list[str]:
    """What a person needs after a run: where the student is and how to take it out."""
    ema = " --ema" if cfg.ema.decay is not None else ""
    last = result.history[-1] if result.history else None
    step = f"step {result.step}/{result.total_steps}"
    if result.stopped:  # a signal: the checkpoint of that step is saved, the run resumes from it
        first = f"stopped by {result.stopped} at {step}, checkpoint saved; rerun the same command to resume"
    elif result.step > result.total_steps:
        first = (
            f"done: the run was already at step {result.step}, past total_steps {result.total_steps}; nothing trained"
        )
    else:
        first = f"done: {step}, checkpoints in {result.checkpoints}"
    lines = [first]
    if last:
        lines.append(
            f"final loss {last['total']:.4f} (task {last['task']:.4f}, output KD {last['out_kd']:.4f}, "
            f"feature KD {last['feat_kd']:.4f})"
        )
    lines.append(
        f"export: python convert_weights.py to-diffusers --checkpoint {cfg.workdir}{ema} --out {cfg.workdir}/export"
    )
    return lines


def train_command(argv: list[str]) -> int:
    cfg, verbose = parse(argv)
    quiet_libraries(verbose)
    if cfg.plan.enabled or cfg.plan.hbm_gib:  # Compile the step and report its memory; trains nothing.
        from koala_jax.train.plan import plan

        plan(cfg)
        return 0
    # Heavy (jax, orbax): only once the arguments are fine.
    from koala_jax.evaluation.after_training import check_evaluation, evaluate_run, evaluation_summary
    from koala_jax.train.data_stage import prepare_raw_input
    from koala_jax.train.loop import train

    check_evaluation(cfg)  # before training, as every other setting
    result = train(prepare_raw_input(cfg))  # a raw data.source is checked, then encoded into <workdir>/data
    lines = summary(cfg, result)
    if cfg.eval.prompts and result.main_process and not result.stopped:
        lines += evaluation_summary(cfg.eval, cfg.workdir, evaluate_run(cfg))
    print("\n".join(lines), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(train_command, argv, grace=None)  # the loop saves a checkpoint on the first signal
