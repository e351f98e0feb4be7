"""One error policy for every command: a user mistake is one line, `error: <what and where>`, and exit
status 1; `--debug` shows the traceback (with its chained cause) instead. Errors that are not the
user's (bugs) keep their traceback. Ctrl-C ends with `error: interrupted` and status 130, SIGTERM with
`error: terminated` and status 143; both arrive as exceptions, so every `finally` runs and temporary
outputs (`weights.atomic`) are removed on the way out. Commands that hold work in flight (training)
handle both signals themselves first.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence

from koala_jax.errors import KoalaError

# What a user can cause: our own errors, and the operating system's (a missing path, a permission, a full
# disk); their messages name the file.
USER_ERRORS = (KoalaError, OSError)
DEBUG_FLAG = "--debug"
TERMINATED_STATUS = 128 + signal.SIGTERM
INTERRUPTED_STATUS = 128 + signal.SIGINT


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


def run(main: Callable[[list[str]], int | None], argv: Sequence[str] | None = None) -> int:
    """Call `main(argv)` under the error policy; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in argv
    try:
        with sigterm_raises():
            return main(argv) or 0
    except USER_ERRORS as e:
        if debug:
            raise
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        if debug:
            raise
        terminated = isinstance(e, Terminated)
        print(f"error: {'terminated (SIGTERM)' if terminated else 'interrupted'}", file=sys.stderr)
        return TERMINATED_STATUS if terminated else INTERRUPTED_STATUS


def one_line(error: BaseException) -> str:
    """The message of `error` on one line; an OSError without our wording gets its file name and reason."""
    if isinstance(error, OSError) and not isinstance(error, KoalaError) and error.filename:
        return f"{error.filename}: {error.strerror or error}"
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    for line in lines[1:]:  # Multi-line messages (lists of problems) join into one line.
        text += (" " if text.endswith(":") else "; ") + line
    return text
