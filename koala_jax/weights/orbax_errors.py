"""What orbax and tensorstore say when a checkpoint cannot be written or read, made readable.

- `describe_failure`: one line for the error chain (the operating system's reason where there is one).
- `quiet_closed_loop_noise`: when one array of a save or restore fails, orbax closes its asyncio loop while
  tensorstore still holds a callback per remaining array; each callback then fails with "Event loop is
  closed" and pybind11 prints it as an unraisable exception, and each write coroutine never resumed prints
  another when it is collected at exit: tracebacks by the thousand for a full model, after the real error
  has been raised. The filter drops exactly those two kinds; anything else unraisable is printed as before.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import sys
import warnings

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
        _installed = True


def _not_a_partial_restore_notice(record: logging.LogRecord) -> bool:
    """Drop orbax's warning for each checkpoint item a partial restore leaves out on purpose (the data iterator
    when only the params are read): it is printed per restore and tells the user nothing."""
    return "was found in the checkpoint, but could not be restored" not in record.getMessage()
