"""The console is for people: progress lines from process 0 only (libraries stay quiet, `cli.train`), and progress
bars on long work (training steps, data encoding, evaluation sampling) when, and only when, the output is a
terminal: logs, CI and pipes get the plain lines alone."""

from __future__ import annotations

import os
import sys
from typing import Any


def is_main_process() -> bool:
    import jax  # Only where a process index means something (the training and encoding paths import jax anyway).

    return jax.process_index() == 0


def info(message: str) -> None:
    """A progress message from process 0 (stdout), printed above any progress bar."""
    if not is_main_process():
        return
    if _ACTIVE:
        _ACTIVE[-1].write(message, file=sys.stdout)  # above the bar, still on stdout
    else:
        print(message, flush=True)


def bars_enabled() -> bool:
    """Bars (on stderr) only on an interactive terminal, never in CI (`CI` set) or with `KOALA_NO_PROGRESS` set."""
    return sys.stderr.isatty() and not os.environ.get("CI") and not os.environ.get("KOALA_NO_PROGRESS")


_ACTIVE: list[Any] = []


class Progress:
    """A tqdm bar on a terminal, nothing elsewhere; `update(n)` and `close()` either way (use as a context)."""

    def __init__(self, total: int | None, description: str, initial: int = 0, unit: str = "it"):
        self._bar = None
        if bars_enabled() and is_main_process():
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=description, unit=unit, dynamic_ncols=True, leave=False)
            _ACTIVE.append(self._bar)

    def update(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            _ACTIVE.remove(self._bar)
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
