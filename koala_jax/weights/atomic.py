"""Outputs that appear whole or not at all: a folder is written under a temporary name beside its
destination and renamed when complete, so a crash never leaves a folder that looks like a finished
model, and an existing output is only replaced (with --overwrite) once the new one is complete."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from koala_jax.errors import KoalaError


def check_output_free(out: str | os.PathLike, overwrite: bool = False) -> None:
    """Refuse an existing output unless `overwrite` (call it before expensive work)."""
    if Path(out).exists() and not overwrite:
        raise KoalaError(f"{Path(out).absolute()} already exists (pass --overwrite to replace it)")


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `out`; rename it to `out` if the block succeeds, delete it if not.

    An existing `out` is refused up front (before any expensive work) unless `overwrite`; with it the
    old folder is only removed after the new one is complete.
    """
    out = Path(out).absolute()
    check_output_free(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    done = False
    try:
        yield tmp
        done = True
    finally:
        if not done:
            shutil.rmtree(tmp, ignore_errors=True)
    if out.exists():
        old = out.with_name(f"{out.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(out, old)
        os.rename(tmp, out)
        if old.is_dir():
            shutil.rmtree(old)
        else:
            old.unlink()
    else:
        os.rename(tmp, out)
