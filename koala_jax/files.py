"""Small files written whole or not at all, free-space checks, and the prompts-file reader: one home for each,
used by the library, the commands and the benchmarks.

A file is written under a temporary name beside it (`<name>.tmp-<pid>-<random>`) and renamed over the target
once complete and flushed, so a crash, a signal or a full disk never leaves half a file under the real name;
the temporary file is removed on the way out. A full disk is one `DiskFullError` naming the path, the bytes
needed (where known) and the bytes free. Temporary outputs being written are registered (`temporary_output`),
so that a process ended at once by a signal (`stop_now`) removes them too. `fault_point` marks the places where
the tests stop a command deterministically.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, NoReturn

from koala_jax.errors import ConfigError, DiskFullError, MissingPathError


def free_bytes(path: str | os.PathLike) -> int:
    """Bytes free for an unprivileged writer on the file system that holds `path` (or its nearest existing
    parent)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def disk_full(path: str | os.PathLike, needed: int | None = None) -> DiskFullError:
    """The one error of a full disk: which path, how many bytes were needed (if known) and how many are free."""
    need = f"needs {needed:,} bytes, " if needed is not None else ""
    return DiskFullError(f"{path}: no space left on the device ({need}{free_bytes(path):,} bytes free)")


def check_free_space(path: str | os.PathLike, needed: int, what: str) -> None:
    """Refuse to start work whose output (`needed` bytes under `path`) cannot fit, before anything is written."""
    free = free_bytes(path)
    if needed > free:
        raise DiskFullError(
            f"{path}: not enough space for {what} (needs {needed:,} bytes, {free:,} bytes free); free some space "
            "or choose another folder"
        )


def is_disk_full(error: BaseException) -> bool:
    """Whether `error` (or what caused it) is the operating system's "no space left" / "quota exceeded"."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(error):  # Libraries (orbax, tensorstore) re-raise it as their own.
            return True
        error = error.__cause__ or error.__context__
    return False


@contextlib.contextmanager
def disk_full_as(path: str | os.PathLike, needed: int | None = None) -> Iterator[None]:
    """Within the block, running out of space becomes one `DiskFullError` naming `path` (the output the user
    named, not whichever temporary file was being written). Some libraries report it as a RuntimeError
    (array_record's writer) or a ValueError (tensorstore, under orbax), so those are looked at too; every other
    error passes unchanged."""
    try:
        yield
    except (OSError, RuntimeError, ValueError) as e:
        if is_disk_full(e):
            raise disk_full(path, needed) from e
        raise


def temporary_name(path: str | os.PathLike) -> Path:
    """`<path>.tmp-<pid>-<random>`: beside `path` (the same file system, so the final rename is atomic)."""
    path = Path(path)
    return path.with_name(f"{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


_temporary_outputs: set[Path] = set()  # being written now; what `stop_now` removes
_stopping = threading.Lock()  # taken by the one thread that ends the process (`stop_now`), never given back


@contextlib.contextmanager
def temporary_output(path: str | os.PathLike) -> Iterator[Path]:
    """Register `path` (a temporary file or folder being written) while the block runs, so that `stop_now`
    can remove it when the process must end without running `finally` blocks."""
    path = Path(path).absolute()
    _temporary_outputs.add(path)
    try:
        yield path
    finally:
        _temporary_outputs.discard(path)


# A second Ctrl-C while a command saves its work on the first (training): whichever of the training's handler and the
# runner's watchdog hears it first says this one line.
INTERRUPTED_AGAIN = (
    "interrupted again: stopped at once, without saving; rerun the command to resume from the last complete checkpoint"
)


def stop_now(status: int, message: str) -> NoReturn:
    """End the process at once with `status` after removing the registered temporary outputs and printing
    `error: <message>`. For a signal that must take effect although the main thread cannot run Python (a long
    native call such as an XLA compile: the commands' signal watchdog) or must not finish its work (a second
    Ctrl-C): no `finally` runs, and the interpreter does not shut down around library threads still at work,
    which is what printed their tracebacks or aborted with `FATAL: exception not rethrown`. Callable from any
    thread; the first caller wins."""
    _stopping.acquire()
    for path in list(_temporary_outputs):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                path.unlink()
    os.write(2, f"error: {message}\n".encode())
    os._exit(status)


FAULT_POINT_VARIABLE = "KOALA_FAULT_POINT"
_fault_points_reached: dict[str, int] = {}


def fault_point(name: str) -> None:
    """A named place where the tests stop a command, so that a signal or a failure lands at a known moment and
    no test races a timer. Inert unless `KOALA_FAULT_POINT` names it: a comma-separated list of
    `<name>[@<n>][:<action>]` (the n-th time the point is reached, the first by default). Each reached point is
    announced on stderr as `fault point <name> reached`, then the action (none: the announcement only):

    - `SIGINT` / `SIGTERM`: the process signals itself here, as a user or a scheduler would at that moment;
    - `pause`: sleep until a signal ends the process (its handler runs as usual);
    - `stuck` (main thread): block where no signal handler runs, as a long native call (an XLA compile) does;
    - `ENOSPC`: raise the operating system's "no space left on device";
    - `EFBIG`: from here on no file grows past 1,000 bytes (RLIMIT_FSIZE; Python ignores SIGXFSZ, so writes fail
      with "File too large"): a disk that fills up under the threads that write in the background.
    """
    count = _fault_points_reached[name] = _fault_points_reached.get(name, 0) + 1
    for spec in filter(None, os.environ.get(FAULT_POINT_VARIABLE, "").split(",")):
        point, _, action = spec.partition(":")
        point, _, nth = point.partition("@")
        if point == name and count == int(nth or 1):
            if action == "stuck":  # before the announcement: a signal sent upon it must find no Python handler
                for signum in (signal.SIGINT, signal.SIGTERM):  # (the interpreter still hears it: cli.runner)
                    signal.signal(signum, lambda signum, frame: None)
            os.write(2, f"fault point {name} reached\n".encode())
            _FAULT_ACTIONS[action]()


def _stuck() -> None:
    never = threading.Lock()
    never.acquire()
    never.acquire()


def _no_space() -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _files_stop_growing() -> None:
    import resource  # POSIX only, as the rest of the fault points

    resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))


_FAULT_ACTIONS: dict[str, Callable[[], None]] = {
    "": lambda: None,
    "SIGINT": lambda: signal.raise_signal(signal.SIGINT),
    "SIGTERM": lambda: signal.raise_signal(signal.SIGTERM),
    "pause": lambda: time.sleep(3600),
    "stuck": _stuck,
    "ENOSPC": _no_space,
    "EFBIG": _files_stop_growing,
}


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", needed: int | None = None) -> Iterator[IO]:
    """Open a temporary file beside `path` for writing (`mode` "w" or "wb"); on success it is flushed, synced
    and renamed to `path`; on any failure it is removed and `path` is left as it was. A full disk becomes
    `DiskFullError` naming `path`."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        with temporary_output(tmp):
            with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
    except OSError as e:
        if is_disk_full(e):
            raise disk_full(path, needed) from e
        raise
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` atomically (UTF-8)."""
    with atomic_write(path, "w", needed=len(text.encode())) as f:
        f.write(text)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically."""
    with atomic_write(path, "wb", needed=len(data)) as f:
        f.write(data)


def write_json(path: str | os.PathLike, data: object) -> None:
    """Write `data` as indented JSON to `path` atomically (numpy scalars as floats)."""
    write_text(path, json.dumps(data, indent=2, default=float) + "\n")


def read_prompts_file(path: str | os.PathLike, flag: str = "--prompts-file") -> list[str]:
    """The non-empty lines of a UTF-8 text file, stripped; a byte-order mark is dropped (it would otherwise
    become part of the first prompt and change its image). `flag` names the option in errors."""
    path = Path(path)
    if not path.is_file():
        raise MissingPathError(f"{flag} {path}: no such file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{flag} {path}: not UTF-8 text (byte {e.start}: {e.reason})") from e
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ConfigError(f"{flag} {path}: no prompts (one per line)")
    return prompts
