"""Value checks on imported weights: NaN/Inf values, and finite values a down-cast would turn into Inf.

A corrupt or badly converted file can hold NaNs with valid names and shapes; without a check they
convert silently and surface as a NaN loss hours later. Checks run where tensors are materialised (the
exporters cast every tensor anyway, so they cost no extra read) or as one streaming pass over memory maps
(`check_finite`, what `read_source` does for the trainer). Problems are collected over all tensors and
reported as one error naming the first few tensors and the file.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import ml_dtypes
import numpy as np

from koala_jax.errors import ConvertError

FLOAT_DTYPES = tuple(np.dtype(d) for d in (np.float16, np.float32, np.float64, ml_dtypes.bfloat16))
CHUNK_ELEMENTS = 1 << 24  # Scan memory maps in 16M-element slices: bounded temporaries, sequential reads.
SHOWN = 5


class BadValuesError(ConvertError):
    """Weights with NaN/Inf values, or values outside the range of the dtype they are cast to."""


def is_float(dtype: np.dtype) -> bool:
    return np.dtype(dtype) in FLOAT_DTYPES


def nonfinite(array: np.ndarray) -> tuple[int, int]:
    """(NaN count, Inf count) of a float array, scanned in slices (works on memory maps without loading
    them whole)."""
    flat = np.asarray(array).reshape(-1)
    nan = inf = 0
    for start in range(0, flat.size, CHUNK_ELEMENTS):
        part = flat[start : start + CHUNK_ELEMENTS]
        bad = ~np.isfinite(part)
        if bad.any():
            n = int(np.isnan(part).sum())
            nan, inf = nan + n, inf + int(bad.sum()) - n
    return nan, inf


class ValueChecker:
    """Collects problems while tensors are cast one at a time, then raises them as one error (`done`)."""

    def __init__(self, where: object) -> None:
        self.where = where
        self.problems: list[str] = []

    def check(self, name: str, array: np.ndarray) -> None:
        """Record NaN/Inf values of `array` (float dtypes only)."""
        if is_float(np.asarray(array).dtype):
            self.record(name, *nonfinite(array))

    def record(self, name: str, nan: int, inf: int) -> None:
        """Record counts of NaN/Inf values found elsewhere (e.g. summed over the slices a host read)."""
        if nan or inf:
            self.problems.append(f"{name!r} has {nan} NaN and {inf} Inf values")

    def cast(self, name: str, array: np.ndarray, dtype: np.dtype) -> np.ndarray:
        """A float `array` as a contiguous `dtype` array, with its NaN/Inf values recorded, and a down-cast
        recorded when a finite value overflows `dtype` (which would silently become Inf). One scan of the
        cast result: NaN and Inf survive any cast, so a finite result means a finite source."""
        array = np.asarray(array)
        if not is_float(array.dtype):  # Integer buffers (position ids) keep their dtype.
            return np.ascontiguousarray(array)
        dtype = np.dtype(dtype)
        with np.errstate(over="ignore", invalid="ignore"):
            out = np.ascontiguousarray(array, dtype=dtype)
        if not sum(nonfinite(out)):
            return out
        problems = len(self.problems)
        self.check(name, array)
        if len(self.problems) == problems:
            peak = float(np.max(np.abs(array.astype(np.float64))))
            limit = float(ml_dtypes.finfo(dtype).max)
            self.problems.append(f"{name!r} overflows {dtype.name}: |value| up to {peak:.4g} > {limit:.4g}")
        return out

    def done(self) -> None:
        """Raise the collected problems, if any, as one BadValuesError."""
        if not self.problems:
            return
        shown = "; ".join(self.problems[:SHOWN])
        more = f"; and {len(self.problems) - SHOWN} more" if len(self.problems) > SHOWN else ""
        raise BadValuesError(f"{self.where}: {len(self.problems)} bad tensor(s): {shown}{more}")


def check_finite(tensors: Mapping[str, np.ndarray] | Iterable[tuple[str, np.ndarray]], where: object) -> None:
    """One streaming pass over `tensors` (name -> array, e.g. memory maps); raises BadValuesError naming
    every tensor with NaN/Inf values (the first few) and `where`."""
    checker = ValueChecker(where)
    for name, array in tensors.items() if isinstance(tensors, Mapping) else tensors:
        checker.check(name, array)
    checker.done()
