"""Outputs that appear whole or not at all: a folder is written under a temporary name beside its
destination and renamed when complete, so a crash never leaves a folder that looks like a finished
model, and an existing output is only replaced (with --overwrite) once the new one is complete.

The temporary names carry the writer's process id (`<out>.tmp-<pid>-<random>`, `<out>.old-<pid>-<random>`
for the output being replaced). An exception, Ctrl-C or SIGTERM (which the commands turn into an exception,
`cli.runner`) removes the temporary folder on the way out; what a kill -9 or a power cut leaves behind is
removed by the next write of the same output, once its process is gone (an interrupted replacement is
undone: the old output is put back). Process ids are checked on this host: two machines writing the same
output on a shared file system at once is not supported anyway."""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from koala_jax.errors import KoalaError
from koala_jax.files import temporary_output


def check_output_free(out: str | os.PathLike, overwrite: bool = False) -> None:
    """Refuse an existing output unless `overwrite` (call it before expensive work), once the leftovers of
    writers that died are cleaned up (`remove_stale`)."""
    remove_stale(out, lambda message: print(f"note: {message}", file=sys.stderr))
    if Path(out).exists() and not overwrite:
        raise KoalaError(f"{Path(out).absolute()} already exists (pass --overwrite to replace it)")


def process_alive(pid: int) -> bool:
    """Whether process `pid` runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # It exists, under another user.
        return True
    return True


def _tagged(out: Path, tag: str) -> Path:
    return out.with_name(f"{out.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def remove_stale(out: str | os.PathLike, report: Callable[[str], None] = print) -> None:
    """Clean up after writers of `out` that died (kill -9, a power cut): their temporary outputs are removed and
    an old output they had moved aside to replace it is put back when `out` is missing."""
    out = Path(out).absolute()
    pattern = re.compile(re.escape(out.name) + r"\.(tmp|old)-(\d+)-[0-9a-f]{8}")
    for path in sorted(out.parent.glob(f"{glob.escape(out.name)}.*-*")):
        found = pattern.fullmatch(path.name)
        if not found or process_alive(int(found[2])):
            continue
        if found[1] == "old" and not out.exists():
            os.rename(path, out)
            report(f"restored {out} from {path.name}: process {found[2]} stopped while replacing it")
            continue
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
        report(f"removed {path}: left unfinished by process {found[2]}, which is no longer running")


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `out`; rename it to `out` if the block succeeds, delete it if not.

    An existing `out` is refused up front (before any expensive work) unless `overwrite`; with it the
    old folder is only removed after the new one is complete.
    """
    out = Path(out).absolute()
    check_output_free(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tagged(out, "tmp")
    tmp.mkdir()
    done = False
    try:
        with temporary_output(tmp):  # removed by files.stop_now too
            yield tmp
        done = True
    finally:
        if not done:
            shutil.rmtree(tmp, ignore_errors=True)
    if out.exists():
        old = _tagged(out, "old")
        os.rename(out, old)
        os.rename(tmp, out)
        if old.is_dir():
            shutil.rmtree(old)
        else:
            old.unlink()
    else:
        os.rename(tmp, out)
