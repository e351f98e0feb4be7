"""Training checkpoints with orbax: the train state and the data iterator position, saved together.

Layout: <workdir>/checkpoints/<step>/{state,data}/ and <workdir>/student_config.json. Saves are
asynchronous and atomic (orbax writes to a temporary folder and renames it when complete), so a crash
or kill -9 during a save leaves the previous checkpoint restorable. Restores take the target's
shardings, so a run resumes onto a different mesh or device count. `koala_jax.weights.training_run`
reads the student back for export.

What goes wrong, and what happens then (docs/reliability.md):
- A save that cannot succeed stops training with one `CheckpointError` line (the step, the folder, the
  reason, the space a checkpoint needs): before writing when the disk has less free space than the state's
  size, or at the next step when an asynchronous save failed (its partial folder is removed). Older
  checkpoints are never touched: orbax deletes the oldest only after a new one is complete.
- `<step>.orbax-checkpoint-tmp*` folders of a crashed run are removed at start (`remove_unfinished`).
- A restore first compares the saved parameter names and shapes with the run's student, then reads; a
  checkpoint that cannot be read (missing array files, a missing data-iterator file) is reported and set
  aside in `<workdir>/damaged_checkpoints/`, and the next older one is used. If none can be read, nothing
  is moved and the error lists each step's reason.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from flax.traverse_util import flatten_dict

from koala_jax.errors import ConfigError, KoalaError
from koala_jax.files import fault_point
from koala_jax.models import UNetConfig
from koala_jax.weights.orbax_errors import describe_failure, quiet_closed_loop_noise
from koala_jax.weights.state_dict import StateDictError, check_against
from koala_jax.weights.training_run import CHECKPOINTS_DIR, STUDENT_CONFIG, read_newest, state_metadata

TMP_MARKER = ".orbax-checkpoint-tmp"  # orbax writes <step>.orbax-checkpoint-tmp[-<n>] and renames it when done
DAMAGED_DIR = "damaged_checkpoints"
SPACE_MARGIN = 1.05  # metadata and the data iterator's state on top of the arrays
# What a failed write raises through orbax: tensorstore's errors are ValueErrors, the file system's OSErrors,
# asyncio's RuntimeErrors.
SAVE_ERRORS = (OSError, ValueError, RuntimeError)


class CheckpointError(KoalaError):
    """A checkpoint that cannot be written or read; training stops (older checkpoints are kept)."""


def any_process(flag: bool) -> bool:
    """Whether `flag` is set on any process (the same answer everywhere, so all processes act alike)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.array(flag))))


def size(nbytes: float) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


class Checkpointer:
    """Periodic async saves of (train state, data iterator), keeping the last `keep`."""

    def __init__(self, workdir: str | Path, every: int, keep: int, async_save: bool = True):
        self.workdir = Path(workdir).absolute()
        self.directory = self.workdir / CHECKPOINTS_DIR
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=every, create=True, enable_async_checkpointing=async_save
        )
        handlers = {"state": ocp.StandardCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler()}
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
        self._pending: int | None = None  # the step of a save not yet known to have succeeded
        quiet_closed_loop_noise()
        self._size = 0  # bytes of the last state saved

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, loader, force: bool = False) -> bool:
        """Save if `step` is on the interval (or `force`); returns whether a save started. Raises
        CheckpointError when an earlier save failed or this one cannot be written."""
        self.check()
        if not (force or self.manager.should_save(step)):
            return False
        self.wait()
        self.check_space(state, step)
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(loader))
        fault_point("checkpoint.save")  # the tests' faults: before orbax writes, and once it writes in the background
        try:
            started = self.manager.save(step, args=args, force=force)
        except SAVE_ERRORS as e:
            raise self._failed(step, e) from e
        self._pending = step if started else None
        fault_point("checkpoint.saving")
        return started

    def check_space(self, state, step: int) -> None:
        """Raise CheckpointError if the disk cannot hold a checkpoint of `state` (called before step 1 too, so a run
        that could never save stops before it trains)."""
        self._size = sum(x.nbytes for x in jax.tree.leaves(state))
        free = self._free()
        if any_process(self._size * SPACE_MARGIN > free):
            raise CheckpointError(
                f"not enough disk space for checkpoint step {step}: it needs about {size(self._size * SPACE_MARGIN)}, "
                f"{size(free)} free in {self.directory}; training stopped before writing it. {self._kept()}"
            )

    def check(self) -> None:
        """Raise the CheckpointError of an asynchronous save that has failed (does not wait for one running)."""
        if self._pending is not None and not self.manager.is_saving_in_progress():
            self.wait()

    def wait(self) -> None:
        """Wait for the save in flight; raise CheckpointError if it failed."""
        step, self._pending = self._pending, None
        try:
            self.manager.wait_until_finished()
        except SAVE_ERRORS as e:
            raise self._failed(step, e) from e

    def _failed(self, step: int | None, error: BaseException) -> CheckpointError:
        """The one-line error of a failed save, after removing its partial folder."""
        for partial in self.directory.glob(f"{step}{TMP_MARKER}*"):
            shutil.rmtree(partial, ignore_errors=True)
        space = f"a checkpoint needs about {size(self._size * SPACE_MARGIN)}, {size(self._free())} free now"
        return CheckpointError(
            f"saving checkpoint step {step} to {self.directory} failed: {describe_failure(error)}; training "
            f"stopped ({space}). {self._kept()}"
        )

    def _free(self) -> int:
        return shutil.disk_usage(self.directory).free

    def _kept(self) -> str:
        steps = sorted(self.manager.all_steps())
        if not steps:
            return "There is no earlier checkpoint."
        return (
            f"The newest complete checkpoint is step {steps[-1]} (kept, with {len(steps) - 1} older); rerunning the "
            f"command resumes from it"
        )

    def restore(self, step: int, abstract_state, loader):
        """The train state at `step`, laid out as `abstract_state` (ShapeDtypeStructs with shardings);
        `loader` is moved to the saved position."""
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=grain.checkpoint.CheckpointRestore(loader)
        )
        return self.manager.restore(step, args=args)["state"]

    def restore_newest(self, abstract_state, loader, report: Callable[[str], None]) -> tuple[int, Any] | None:
        """(step, state) of the newest checkpoint that restores, or None when there is none. Damaged newer
        ones are `report`ed and set aside; one that does not fit the run's student is a ConfigError."""

        def read(step: int):
            self._check_fits(step, state_metadata(self.manager, step), abstract_state)
            return self.restore(step, abstract_state, loader)

        step, state, damaged = read_newest(self.manager.all_steps(), read)
        if step is None and damaged:
            raise CheckpointError(
                f"no checkpoint in {self.directory} can be read "
                f"({'; '.join(f'step {s}: {r}' for s, r in damaged)}); nothing was changed"
            )
        if damaged:
            self._set_aside(damaged, step, report)
        return None if step is None else (step, state)

    def _check_fits(self, step: int, saved: dict, abstract_state) -> None:
        """The saved params (and EMA) have the names and shapes of the run's student."""
        where = f"checkpoint step {step} in {self.directory}"
        if (saved.get("ema_params") is None) != (abstract_state.ema_params is None):
            has, now = ("no", "set") if saved.get("ema_params") is None else ("", "None")
            raise ConfigError(
                f"{where} has {has or 'its'} EMA params but ema.decay is {now} now: keep the run's ema.decay"
            )
        try:
            check_against(flatten_dict(saved["params"]), flatten_dict(abstract_state.params))
        except StateDictError as e:
            raise ConfigError(f"{where} does not fit this run's student ({STUDENT_CONFIG}): {e}") from e

    def _set_aside(self, damaged: list[tuple[int, str]], restored: int, report: Callable[[str], None]) -> None:
        """Move the damaged checkpoints (all newer than `restored`) out of orbax's folder, kept for inspection,
        so that the run saves those steps again."""
        aside = self.workdir / DAMAGED_DIR
        if jax.process_index() == 0:
            aside.mkdir(exist_ok=True)
            for step, reason in damaged:
                target = aside / str(step)
                while target.exists():
                    target = target.with_name(target.name + "+")
                (self.directory / str(step)).rename(target)
                report(f"checkpoint step {step} is damaged ({reason}): moved to {target}")
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("koala_jax: damaged checkpoints set aside")
        self.manager.reload()
        report(f"resuming from step {restored}, the newest checkpoint that can be read")

    def close(self) -> None:
        self.manager.close()


def remove_unfinished(workdir: str | Path) -> list[str]:
    """Remove the temporary folders of saves that never finished (a crash or kill during a save); returns
    their names. Call while holding the workdir lock: nobody else may be writing them."""
    folder = Path(workdir) / CHECKPOINTS_DIR
    found = sorted(p for p in folder.glob(f"*{TMP_MARKER}*") if p.is_dir()) if folder.is_dir() else []
    for path in found:
        shutil.rmtree(path)
    return [p.name for p in found]


def write_student_config(workdir: str | Path, config: UNetConfig) -> None:
    path = Path(workdir) / STUDENT_CONFIG
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(config.to_diffusers(), indent=2))
    tmp.replace(path)
