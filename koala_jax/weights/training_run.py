"""Reading the student of a train.py working directory: `<workdir>/student_config.json` beside
`<workdir>/checkpoints/<step>/state` (orbax). `koala_jax.train.checkpoint` writes this layout."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax.traverse_util import flatten_dict

from koala_jax.errors import ConvertError, KoalaError, MissingPathError
from koala_jax.models import UNetConfig, abstract_params
from koala_jax.weights.orbax_errors import describe_failure, quiet_closed_loop_noise
from koala_jax.weights.state_dict import StateDictError, check_against

STUDENT_CONFIG = "student_config.json"
CHECKPOINTS_DIR = "checkpoints"
T = TypeVar("T")


def is_training_dir(path: str | os.PathLike) -> bool:
    """A train.py working directory: student_config.json, written when the run starts (checkpoints/ follows with
    its first save, so a run stopped before then is still a run, one without a checkpoint yet)."""
    return (Path(path) / STUDENT_CONFIG).is_file()


def read_student_config(workdir: str | os.PathLike) -> UNetConfig:
    path = Path(workdir) / STUDENT_CONFIG
    if not path.is_file():
        raise MissingPathError(f"{workdir}: no {STUDENT_CONFIG}; not a train.py working directory")
    return UNetConfig.from_diffusers(json.loads(path.read_text()))


def checkpoint_steps(workdir: str | os.PathLike) -> list[int]:
    """The steps saved in a training run, oldest first (complete checkpoints only: orbax writes under a
    temporary name and renames the step folder when done). Reads folder names only."""
    folder = Path(workdir) / CHECKPOINTS_DIR
    return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit()) if folder.is_dir() else []


def state_metadata(manager: ocp.CheckpointManager, step: int) -> dict:
    """The saved train state's tree of array metadata (names, shapes, dtypes) at `step`; reads no array."""
    meta = manager.item_metadata(step)["state"]
    return meta.tree if hasattr(meta, "tree") else meta


def restore_params(workdir: str | os.PathLike, ema: bool, step: int | None = None) -> tuple[UNetConfig, dict]:
    """The student's (EMA) params of a training run as host numpy arrays (see `restore_newest_params`)."""
    config, params, _ = restore_newest_params(workdir, ema, step)
    return config, params


def read_newest(steps: Iterable[int], read: Callable[[int], T]) -> tuple[int | None, T | None, list[tuple[int, str]]]:
    """(step, read(step), [(newer step, why it failed)]) for the newest of `steps` that `read` can read; (None,
    None, failures) when none can. A KoalaError of `read` (a checkpoint that does not fit) is raised as is."""
    damaged = []
    for step in sorted(steps, reverse=True):
        # orbax wraps every tensorstore read failure in a bare Exception (serialization.py), so nothing narrower
        # tells a damaged checkpoint; none is swallowed: the caller reports each, or raises them all.
        try:
            return step, read(step), damaged
        except KoalaError:
            raise
        except Exception as e:  # a damaged checkpoint (see above)
            damaged.append((step, describe_failure(e)))
    return None, None, damaged


def restore_newest_params(
    workdir: str | os.PathLike, ema: bool, step: int | None = None
) -> tuple[UNetConfig, dict, int]:
    """(config, params, step): the student's (EMA) params of a training run as host numpy arrays, without the
    optimizer state (a partial restore: exporting a 1B student does not need its 2x-sized Adam moments in
    memory). The saved names and shapes are checked against student_config.json before any array is read.
    Without `step`, the newest checkpoint that can be read: damaged newer ones are named on stderr."""
    workdir = Path(workdir).absolute()
    config = read_student_config(workdir)
    if not checkpoint_steps(workdir):  # Before orbax, which would create the folder of a run without one.
        raise MissingPathError(
            f"{workdir}: this run has no checkpoint yet (train.py stopped before its first save); train it longer "
            "or export another run"
        )
    key = "ema_params" if ema else "params"
    quiet_closed_loop_noise()

    def read(m: ocp.CheckpointManager, candidate: int) -> dict:
        tree = state_metadata(m, candidate)
        _check_saved(tree, key, config, f"{workdir} step {candidate}")
        item = {key: jax.tree.map(lambda _: 0, tree[key])}
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
        args = ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True)
        return m.restore(candidate, args=ocp.args.Composite(state=args))["state"][key]

    with ocp.CheckpointManager(workdir / CHECKPOINTS_DIR, item_handlers={"state": ocp.PyTreeCheckpointHandler()}) as m:
        saved = m.all_steps()
        if not saved:
            raise MissingPathError(f"{workdir / CHECKPOINTS_DIR}: no checkpoint")
        if step is not None and step not in saved:
            raise ConvertError(f"{workdir}: no checkpoint of step {step} (saved: {sorted(saved)})")
        found, params, damaged = read_newest(saved if step is None else [step], lambda s: read(m, s))
    if found is None:
        raise ConvertError(f"{workdir}: no checkpoint can be read ({'; '.join(f'step {s}: {r}' for s, r in damaged)})")
    for bad, reason in damaged:
        print(f"warning: {workdir}: checkpoint step {bad} is damaged ({reason}); using step {found}", file=sys.stderr)
    return config, params, found


def _check_saved(tree: dict, key: str, config: UNetConfig, where: str) -> None:
    """The saved `key` params have every name and shape `config` declares (a run whose student_config.json was
    overwritten by another variant must not export a model whose config does not match its weights)."""
    if key not in tree or tree[key] is None:
        raise ConvertError(f"{where}: the checkpoint has no {key} (was EMA off?)")
    try:
        check_against(flatten_dict(tree[key]), flatten_dict(abstract_params(config)))
    except StateDictError as e:
        raise ConvertError(f"{where} does not match {STUDENT_CONFIG}: {e}") from e
