"""One error policy for every command: a user mistake is one line, `error: <what and where>`, and exit
status 1; `--debug` shows the traceback (with its chained cause) instead. Errors that are not the
user's (bugs) keep their traceback. Ctrl-C ends with `interrupted` and status 130; commands that hold
work in flight (training) handle it themselves first."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from koala_jax.errors import KoalaError

# What a user can cause: our own errors, and the operating system's (a missing path, a permission, a full
# disk); their messages name the file.
USER_ERRORS = (KoalaError, OSError)
DEBUG_FLAG = "--debug"


def make_parser(doc: str) -> argparse.ArgumentParser:
    """An argparse parser whose description is the first paragraph of `doc` and whose epilog is the rest."""
    summary, _, rest = doc.partition("\n\n")
    parser = argparse.ArgumentParser(
        description=summary, epilog=rest or None, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(DEBUG_FLAG, action="store_true", help="show the traceback of an error")
    return parser


def run(main: Callable[[list[str]], int | None], argv: Sequence[str] | None = None) -> int:
    """Call `main(argv)` under the error policy; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in argv
    try:
        return main(argv) or 0
    except USER_ERRORS as e:
        if debug:
            raise
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if debug:
            raise
        print("error: interrupted", file=sys.stderr)
        return 130


def one_line(error: BaseException) -> str:
    """The message of `error`; an OSError without our wording gets its file name and reason."""
    if isinstance(error, OSError) and not isinstance(error, KoalaError) and error.filename:
        return f"{error.filename}: {error.strerror or error}"
    return str(error)
