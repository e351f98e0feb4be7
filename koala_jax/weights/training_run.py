"""Reading the student of a train.py working directory: `<workdir>/student_config.json` beside
`<workdir>/checkpoints/<step>/state` (orbax). `koala_jax.train.checkpoint` writes this layout."""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from koala_jax.errors import ConvertError, MissingPathError
from koala_jax.models import UNetConfig

STUDENT_CONFIG = "student_config.json"
CHECKPOINTS_DIR = "checkpoints"


def is_training_dir(path: str | os.PathLike) -> bool:
    """A train.py working directory: checkpoints/ beside student_config.json."""
    path = Path(path)
    return (path / CHECKPOINTS_DIR).is_dir() and (path / STUDENT_CONFIG).is_file()


def read_student_config(workdir: str | os.PathLike) -> UNetConfig:
    path = Path(workdir) / STUDENT_CONFIG
    if not path.is_file():
        raise MissingPathError(f"{workdir}: no {STUDENT_CONFIG}; not a train.py working directory")
    return UNetConfig.from_diffusers(json.loads(path.read_text()))


def restore_params(workdir: str | os.PathLike, ema: bool, step: int | None = None) -> tuple[UNetConfig, dict]:
    """The student's (EMA) params of a training run as host numpy arrays, without the optimizer state
    (a partial restore: exporting a 1B student does not need its 2x-sized Adam moments in memory)."""
    workdir = Path(workdir).absolute()
    config = read_student_config(workdir)
    with ocp.CheckpointManager(workdir / CHECKPOINTS_DIR, item_handlers={"state": ocp.PyTreeCheckpointHandler()}) as m:
        step = m.latest_step() if step is None else step
        if step is None:
            raise MissingPathError(f"{workdir / CHECKPOINTS_DIR}: no checkpoint")
        if step not in m.all_steps():
            raise ConvertError(f"{workdir}: no checkpoint of step {step} (saved: {sorted(m.all_steps())})")
        key = "ema_params" if ema else "params"
        meta = m.item_metadata(step)["state"]
        tree = meta.tree if hasattr(meta, "tree") else meta
        if key not in tree or tree[key] is None:
            raise ConvertError(f"{workdir} step {step}: the checkpoint has no {key} (was EMA off?)")
        item = {key: jax.tree.map(lambda _: 0, tree[key])}
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
        args = ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True)
        restored = m.restore(step, args=ocp.args.Composite(state=args))["state"]
    return config, restored[key]
