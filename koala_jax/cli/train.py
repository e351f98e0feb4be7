"""KOALA distillation: `python train.py --config configs/<name>.py [--config.key=value ...]`.

Any key of the config can be overridden (`--config.optim.lr=1e-5`); an unknown key is an error.
`--verbose` shows the libraries' own logs (orbax, absl), `--debug` the traceback of an error.
"""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path

from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags

from koala_jax.cli.runner import run
from koala_jax.errors import KoalaError, MissingPathError
from koala_jax.train.config import RENAMED

FLAGS = flags.FlagValues()
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file (configs/*.py).", lock_config=True, flag_values=FLAGS
)
_VERBOSE = flags.DEFINE_bool("verbose", False, "Show library logs (orbax, absl, grain).", flag_values=FLAGS)
flags.DEFINE_bool("debug", False, "Show the traceback of an error.", flag_values=FLAGS)
NOISY_LOGGERS = ("absl", "orbax", "jax", "grain", "tensorflow_datasets")


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
        name = str(e).strip("\"'")
        given = [a.split("=")[0] for a in argv if a.startswith("--config.") and name in a.split("=")[0].split(".")]
        raise KoalaError(f"unknown config key {given[0] if given else name} (see koala_jax/train/config.py)") from e
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
    absl_logging.set_verbosity(absl_logging.ERROR)
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def summary(cfg, result: dict) -> list[str]:
    """What a person needs after a run: where the student is and how to take it out."""
    workdir = cfg.workdir
    ema = " --ema" if cfg.ema_decay is not None else ""
    last = result["history"][-1] if result["history"] else None
    lines = [f"done: step {result['step']}/{cfg.total_steps}, checkpoints in {result['checkpoints']}"]
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
    from koala_jax.train.loop import train  # Heavy (jax, orbax): only once the arguments are fine.

    result = train(cfg)
    print("\n".join(summary(cfg, result)), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(train_command, sys.argv[1:] if argv is None else argv)
