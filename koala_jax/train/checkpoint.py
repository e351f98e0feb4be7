"""Training checkpoints with orbax: the train state and the data iterator position, saved together.

Layout: <workdir>/checkpoints/<step>/{state,data}/ and <workdir>/student_config.json. Saves are
asynchronous and atomic (orbax writes to a temporary folder and renames it when complete), so a crash
or kill -9 during a save leaves the previous checkpoint restorable. Restores take the target's
shardings, so a run resumes onto a different mesh or device count.
"""

from __future__ import annotations

import json
from pathlib import Path

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from koala_jax.models import UNetConfig

STUDENT_CONFIG = "student_config.json"


class Checkpointer:
    """Periodic async saves of (train state, data iterator), keeping the last `keep`."""

    def __init__(self, workdir: str | Path, every: int, keep: int, async_save: bool = True):
        self.directory = Path(workdir).absolute() / "checkpoints"
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=every, create=True,
                                               enable_async_checkpointing=async_save)
        handlers = {"state": ocp.StandardCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler()}
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, loader, force: bool = False) -> bool:
        """Save if `step` is on the interval (or `force`); returns whether a save started."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(loader))
        return self.manager.save(step, args=args, force=force)

    def restore(self, step: int, abstract_state, loader):
        """The train state at `step`, laid out as `abstract_state` (ShapeDtypeStructs with shardings);
        `loader` is moved to the saved position."""
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                  data=grain.checkpoint.CheckpointRestore(loader))
        return self.manager.restore(step, args=args)["state"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def write_student_config(workdir: str | Path, config: UNetConfig) -> None:
    path = Path(workdir) / STUDENT_CONFIG
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(config.to_diffusers(), indent=2))
    tmp.replace(path)


def restore_params(workdir: str | Path, ema: bool, step: int | None = None) -> tuple[UNetConfig, dict]:
    """The student's (EMA) params of a training run as host numpy arrays, without the optimizer state
    (a partial restore: exporting a 1B student does not need its 2x-sized Adam moments in memory)."""
    workdir = Path(workdir).absolute()
    config_path = workdir / STUDENT_CONFIG
    if not config_path.is_file():
        raise FileNotFoundError(f"{workdir}: no {STUDENT_CONFIG}; not a train.py working directory")
    config = UNetConfig.from_diffusers(json.loads(config_path.read_text()))
    with ocp.CheckpointManager(workdir / "checkpoints", item_handlers={"state": ocp.PyTreeCheckpointHandler()}) as m:
        step = m.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{workdir / 'checkpoints'}: no checkpoint")
        key = "ema_params" if ema else "params"
        meta = m.item_metadata(step)["state"]
        tree = meta.tree if hasattr(meta, "tree") else meta
        if key not in tree or tree[key] is None:
            raise KeyError(f"{workdir} step {step}: the checkpoint has no {key} (was EMA off?)")
        item = {key: jax.tree.map(lambda _: 0, tree[key])}
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
        args = ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True)
        restored = m.restore(step, args=ocp.args.Composite(state=args))["state"]
    return config, restored[key]
