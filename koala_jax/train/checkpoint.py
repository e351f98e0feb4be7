"""Training checkpoints with orbax: the train state and the data iterator position, saved together.

Layout: <workdir>/checkpoints/<step>/{state,data}/ and <workdir>/student_config.json. Saves are
asynchronous and atomic (orbax writes to a temporary folder and renames it when complete), so a crash
or kill -9 during a save leaves the previous checkpoint restorable. Restores take the target's
shardings, so a run resumes onto a different mesh or device count. `koala_jax.weights.training_run`
reads the student back for export.
"""

from __future__ import annotations

import json
from pathlib import Path

import grain
import orbax.checkpoint as ocp

from koala_jax.models import UNetConfig
from koala_jax.weights.training_run import CHECKPOINTS_DIR, STUDENT_CONFIG


class Checkpointer:
    """Periodic async saves of (train state, data iterator), keeping the last `keep`."""

    def __init__(self, workdir: str | Path, every: int, keep: int, async_save: bool = True):
        self.directory = Path(workdir).absolute() / CHECKPOINTS_DIR
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=every, create=True, enable_async_checkpointing=async_save
        )
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
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=grain.checkpoint.CheckpointRestore(loader)
        )
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
