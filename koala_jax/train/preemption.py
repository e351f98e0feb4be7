"""Stopping a run cleanly: SIGTERM (TPU preemption, a scheduler's kill) and Ctrl-C finish the step, save a
checkpoint and stop; every process stops at the same step. A second Ctrl-C ends the process on the spot."""

from __future__ import annotations

import signal

from koala_jax.console import info
from koala_jax.files import INTERRUPTED_AGAIN, fault_point, stop_now
from koala_jax.train.checkpoint import any_process


class Preemption:
    """SIGTERM (TPU preemption, a scheduler's kill) and Ctrl-C (SIGINT) alike: the loop finishes its step,
    saves a checkpoint, waits for it and returns. A second Ctrl-C ends the process at once with status 130
    (`files.stop_now`: no save; the run resumes from the last complete checkpoint, and the next start removes
    the unfinished one). Not a KeyboardInterrupt: raised wherever the main thread was, inside orbax's wait for
    a save, it was swallowed there with a fragment of traceback. `close` gives the handlers back."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.requested: str | None = None  # the name of the first signal received
        self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            stop_now(128 + signal.SIGINT, INTERRUPTED_AGAIN)
        if self.requested is None:
            self.requested = signal.Signals(signum).name
            again = " (Ctrl-C again: stop at once, without saving)" if signum == signal.SIGINT else ""
            info(f"{self.requested} received: finishing this step, saving a checkpoint and stopping{again}")

    def agreed(self) -> bool:
        """All processes stop at the same step if any of them was signalled. Called once per step: the tests'
        fault point `train.step`."""
        fault_point("train.step")
        return any_process(self.requested is not None)

    def close(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
