"""One error policy for every command: a user mistake is one line, `error: <what and where>`, and exit
status 1; `--debug` shows the traceback (with its chained cause) instead. Errors that are not the
user's (bugs) keep their traceback. Ctrl-C ends with `error: interrupted` and status 130, SIGTERM with
`error: terminated` and status 143; both arrive as exceptions, so every `finally` runs and temporary
outputs (`weights.atomic`, `files.atomic_write`) are removed on the way out. Commands that hold work in
flight (training) handle both signals themselves first.

Python runs a signal handler only between two lines of Python in the main thread, so a signal that lands
during a long native call (an XLA compile: tens of seconds at full size) used to wait for it to return. A
watchdog thread hears every signal at once (the interpreter's C-level handler writes its number to the
`signal.set_wakeup_fd` pipe, and compiles release the GIL): if the command has not ended `SIGNAL_GRACE_S`
after the signal, or on a second signal, it removes the registered temporary outputs and ends the process
(`files.stop_now`) with the same status (`KOALA_SIGNAL_GRACE_S` sets another grace period). Commands that
save their work on the first signal (training) pass `grace=None`: only a second Ctrl-C stops them at once.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence

from koala_jax.errors import KoalaError
from koala_jax.files import INTERRUPTED_AGAIN, stop_now

# What a user can cause: our own errors, and the operating system's (a missing path, a permission, a full
# disk); their messages name the file.
USER_ERRORS = (KoalaError, OSError)
DEBUG_FLAG = "--debug"
TERMINATED_STATUS = 128 + signal.SIGTERM
INTERRUPTED_STATUS = 128 + signal.SIGINT
GRACE_VARIABLE = "KOALA_SIGNAL_GRACE_S"
# How long the main thread has to end after a signal before the watchdog ends the process (seconds; the
# environment variable sets another: longer lets an orbax save of a full-size model finish first).
SIGNAL_GRACE_S = float(os.environ.get(GRACE_VARIABLE, 3.0))


class Terminated(KeyboardInterrupt):
    """SIGTERM as an exception: it unwinds like Ctrl-C (libraries treat KeyboardInterrupt as "stop now"),
    so the default action (die on the spot) never leaves a half-written temporary output behind."""


def make_parser(doc: str) -> argparse.ArgumentParser:
    """An argparse parser whose description is the first paragraph of `doc` and whose epilog is the rest."""
    summary, _, rest = doc.partition("\n\n")
    parser = argparse.ArgumentParser(
        description=summary, epilog=rest or None, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(DEBUG_FLAG, action="store_true", help="show the traceback of an error")
    return parser


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within the block, SIGTERM raises `Terminated` in the main thread (the previous handler comes back
    after it; a no-op outside the main thread, where Python cannot install handlers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run(
    main: Callable[[list[str]], int | None], argv: Sequence[str] | None = None, grace: float | None = SIGNAL_GRACE_S
) -> int:
    """Call `main(argv)` under the error policy; returns the exit status. `grace`: see the module's docstring.

    Without `argv` the command owns the process (the scripts): a signal then ends it as soon as its `finally`
    blocks have run and the error line is printed (`os._exit`), without the interpreter's shutdown, which runs
    around native threads still at work (an XLA compile on another thread: it crashed with SIGSEGV seconds
    after a SIGTERM, or waited for the compile)."""
    owns_process = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in argv
    with SignalWatchdog(grace) as watchdog:
        try:
            with sigterm_raises():
                return main(argv) or 0
        except USER_ERRORS as e:
            if debug:
                raise
            return watchdog.report(f"error: {one_line(e)}", 1)
        except KeyboardInterrupt as e:
            if debug:
                raise
            status, what = signal_status(signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT)
            watchdog.report(f"error: {what}", status)
            if owns_process:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(status)
            return status


def signal_status(signum: int) -> tuple[int, str]:
    """(exit status, what happened) of a command ended by `signum`."""
    if signum == signal.SIGTERM:
        return TERMINATED_STATUS, "terminated (SIGTERM)"
    return INTERRUPTED_STATUS, "interrupted"


class SignalWatchdog:
    """Ends the process when the main thread cannot (see the module's docstring). A no-op outside the main
    thread. The main thread reports its own ending under `_ending`, so exactly one of the two prints the error
    line: once the watchdog holds it, the process ends there."""

    WATCHED = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, grace: float | None) -> None:
        self.grace = grace
        self._ending = threading.Lock()
        self._ended = False
        self._pipe: tuple[int, int] | None = None
        self._previous_fd = -1

    def __enter__(self) -> SignalWatchdog:
        if threading.current_thread() is threading.main_thread():
            self._pipe = os.pipe()
            os.set_blocking(self._pipe[1], False)  # the C-level handler must never block on it
            self._previous_fd = signal.set_wakeup_fd(self._pipe[1], warn_on_full_buffer=False)
            threading.Thread(target=self._watch, args=(self._pipe[0],), name="signal watchdog", daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        with self._ending:
            self._ended = True
        if self._pipe is not None:
            signal.set_wakeup_fd(self._previous_fd)
            os.close(self._pipe[1])  # the watchdog reads the end of the pipe and stops

    def report(self, line: str, status: int) -> int:
        """Print the main thread's error line (unless the watchdog is ending the process) and return `status`."""
        with self._ending:
            print(line, file=sys.stderr)
            self._ended = True
        return status

    def _watch(self, read_fd: int) -> None:
        try:
            first = _next_signal(read_fd, None)
            if first is None:
                return
            if self.grace is None:  # the command handles the first signal itself; a second Ctrl-C stops it
                while (again := _next_signal(read_fd, None)) is not None:
                    if again == signal.SIGINT:
                        self._stop(again, INTERRUPTED_AGAIN)
                return
            again = _next_signal(read_fd, self.grace)
            if again is not None:
                self._stop(again, f"{signal_status(again)[1]} again: stopped at once")
            else:
                self._stop(
                    first,
                    f"{signal_status(first)[1]}: stopped at once, {self.grace:g} s after the signal (a long native "
                    "call, such as an XLA compile, or a save that cannot be cut short was still running)",
                )
        finally:
            os.close(read_fd)

    def _stop(self, signum: int, message: str) -> None:
        with self._ending:
            if not self._ended:
                stop_now(signal_status(signum)[0], message)


def _next_signal(read_fd: int, timeout: float | None) -> int | None:
    """The next watched signal written to the wakeup pipe within `timeout` seconds (None: no limit); None when
    there is none by then, or the pipe was closed."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not select.select([read_fd], [], [], left)[0]:
            return None
        data = os.read(read_fd, 1)
        if not data:
            return None
        if data[0] in SignalWatchdog.WATCHED:
            return data[0]


def one_line(error: BaseException) -> str:
    """The message of `error` on one line; an OSError without our wording gets its file name and reason."""
    if isinstance(error, OSError) and not isinstance(error, KoalaError) and error.filename:
        return f"{error.filename}: {error.strerror or error}"
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    for line in lines[1:]:  # Multi-line messages (lists of problems) join into one line.
        text += (" " if text.endswith(":") else "; ") + line
    return text
