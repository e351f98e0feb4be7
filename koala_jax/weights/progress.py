"""Progress of long conversions on stderr: bytes and tensors done, rate and ETA, as one updating line.

On a terminal the line is redrawn in place (at most a few times a second); when stderr is a file or a
pipe (logs, CI, tests) a plain line is printed at most every `LOG_INTERVAL_S`, so short conversions
stay quiet and long ones leave a readable trace.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

TTY_INTERVAL_S = 0.2
LOG_INTERVAL_S = 10.0


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


class Progress:
    """`update(nbytes)` after each tensor; `close()` at the end. Nothing is printed before the first
    interval has passed, so conversions shorter than that print nothing."""

    def __init__(
        self,
        label: str,
        total_bytes: int,
        total_tensors: int,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.label, self.total_bytes, self.total_tensors = label, total_bytes, total_tensors
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = TTY_INTERVAL_S if self.tty else LOG_INTERVAL_S
        self.clock = clock
        self.start = self.last = clock()
        self.bytes = self.tensors = 0
        self.shown = False

    def update(self, nbytes: int) -> None:
        self.bytes += nbytes
        self.tensors += 1
        now = self.clock()
        if now - self.last >= self.interval:
            self.last = now
            self._show(now)

    def line(self, now: float) -> str:
        elapsed = max(now - self.start, 1e-9)
        rate = self.bytes / elapsed
        left = (self.total_bytes - self.bytes) / rate if rate > 0 else float("inf")
        eta = f"ETA {left:.0f} s" if left != float("inf") else "ETA ?"
        return (
            f"{self.label}: {_size(self.bytes)} / {_size(self.total_bytes)}, {self.tensors}/{self.total_tensors} "
            f"tensors, {_size(rate)}/s, {eta}"
        )

    def _show(self, now: float) -> None:
        if self.tty:
            self.stream.write("\r\033[K" + self.line(now))
        else:
            self.stream.write(self.line(now) + "\n")
        self.stream.flush()
        self.shown = True

    def close(self) -> None:
        """Finish the line on a terminal (a final state once anything was shown)."""
        if self.shown and self.tty:
            self._show(self.clock())
            self.stream.write("\n")
            self.stream.flush()
