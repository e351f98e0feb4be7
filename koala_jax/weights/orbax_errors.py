"""What orbax and tensorstore say when a checkpoint cannot be written or read, made readable.

- `describe_failure`: one line for the error chain (the operating system's reason where there is one).
- `quiet_closed_loop_noise`: when one array of a save or restore fails, orbax closes its asyncio loop while
  tensorstore still holds a callback per remaining array; each callback then fails with "Event loop is
  closed" and pybind11 prints it as an unraisable exception, and each write coroutine never resumed prints
  another when it is collected at exit: tracebacks by the thousand for a full model, after the real error
  has been raised. The filter drops exactly those two kinds; anything else unraisable is printed as before.
  asyncio's "Task exception was never retrieved" for the tensorstore tasks a failed restore leaves unawaited
  goes too.
- `quiet_save_logging`: a failed save is also logged by orbax, with a traceback per thread it ran in; the
  caller raises the failure as one error, so those records are dropped during the save.
- `uninterrupted`: Ctrl-C and SIGTERM wait until a save is complete. Raised inside orbax's event loop, the
  KeyboardInterrupt left its writer threads running while the output folder was deleted and the interpreter
  shut down: orbax tracebacks, a temporary folder written again after its removal, and now and then an abort
  (`FATAL: exception not rethrown`). A save too long to wait for is ended by the commands' signal watchdog
  (`cli.runner`), which removes the temporary output and exits at once.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import signal
import sys
import threading
import warnings
from collections.abc import Iterator

_CLOSED_LOOP = "Event loop is closed"


def describe_failure(error: BaseException) -> str:
    """Why a checkpoint could not be written or read, in one line: the operating system's reason where the
    chain of errors has one (tensorstore reports it as os_error_code), else the first line of the innermost
    error (orbax's outer ones only say which array it was reading), without tensorstore's spec dump."""
    chain: list[BaseException] = []
    seen: BaseException | None = error
    while seen is not None and seen not in chain:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    for link in chain:
        if isinstance(link, OSError) and link.strerror:
            return f"{link.strerror}: {link.filename}" if link.filename else link.strerror
        code = re.search(r"os_error_code='?(\d+)", str(link))
        if code:
            return f"{os.strerror(int(code.group(1)))} (errno {code.group(1)})"
    lines = str(chain[-1]).strip().splitlines()
    text = lines[0] if lines else type(chain[-1]).__name__
    return re.split(r" \[tensorstore_spec=| See full TensorStore", text)[0][:300]


def _is_noise(unraisable) -> bool:
    """A closed-loop callback failure, or an orbax coroutine abandoned by a failed save."""
    if isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == _CLOSED_LOOP:
        return True
    code = getattr(unraisable.object, "cr_code", None)
    return code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename


def _drop_noise(unraisable, forward) -> None:
    if not _is_noise(unraisable):
        forward(unraisable)


_installed = False


def quiet_closed_loop_noise() -> None:
    """Install the filter (once per process; it forwards everything else to the hook it replaces)."""
    global _installed
    if not _installed:
        sys.unraisablehook = functools.partial(_drop_noise, forward=sys.unraisablehook)
        warnings.filterwarnings("ignore", r"coroutine 'async_serialize\w*\.<locals>", RuntimeWarning)
        logging.getLogger("absl").addFilter(_not_a_partial_restore_notice)
        logging.getLogger("asyncio").addFilter(_not_an_abandoned_array_read)
        _installed = True


def _not_a_partial_restore_notice(record: logging.LogRecord) -> bool:
    """Drop orbax's warning for each checkpoint item a partial restore leaves out on purpose (the data iterator
    when only the params are read): it is printed per restore and tells the user nothing."""
    return "was found in the checkpoint, but could not be restored" not in record.getMessage()


def _not_an_abandoned_array_read(record: logging.LogRecord) -> bool:
    """Drop asyncio's "Task exception was never retrieved" for a tensorstore read or write: when one array of a
    restore fails, orbax raises that failure and leaves the tasks of the other arrays unawaited; each one that
    failed too is logged with its own traceback when collected (pages of them for a damaged checkpoint, after
    its one-line error)."""
    error = record.exc_info[1] if record.exc_info else None
    return not (
        record.getMessage().startswith("Task exception was never retrieved") and "tensorstore_spec" in str(error)
    )


def _drop_all(record: logging.LogRecord) -> bool:
    return False


@contextlib.contextmanager
def quiet_save_logging() -> Iterator[None]:
    """Within the block, orbax's log records (it logs through absl) are dropped: see the module's docstring."""
    logger = logging.getLogger("absl")
    logger.addFilter(_drop_all)
    try:
        yield
    finally:
        logger.removeFilter(_drop_all)


@contextlib.contextmanager
def uninterrupted() -> Iterator[None]:
    """SIGINT and SIGTERM received within the block take effect once it has completed (their previous handlers
    run then, in the order received; the first raises); if the block fails, its error is raised instead. A
    no-op outside the main thread, where Python cannot install handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    watched = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, lambda signum, frame: received.append(signum)) for s in watched}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    for signum in received:
        handler = previous[signum]
        if callable(handler):
            handler(signum, None)
        elif handler == signal.SIG_DFL:
            signal.raise_signal(signum)
