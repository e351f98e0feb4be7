"""Reading and writing .safetensors with numpy, memory-mapped, bfloat16 included.

The `safetensors` package's numpy API has no bfloat16, and its torch/flax APIs would pull a framework
in or copy every tensor onto a device. The format is simple (8-byte little-endian header length, a JSON
header of dtype/shape/offsets, then raw little-endian bytes), so we read it through `np.memmap`:
tensors stay on disk until used, which keeps a full SDXL conversion at about one copy in memory.
Writes go through `files.atomic_write` (a temporary file renamed into place), so a crash or a full disk never
leaves a file that looks complete.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from collections.abc import Mapping
from pathlib import Path

import ml_dtypes
import numpy as np
from numpy.lib.array_utils import byte_bounds

from koala_jax.errors import KoalaError
from koala_jax.files import atomic_write, check_free_space
from koala_jax.weights.progress import Progress

_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}


class SafetensorsError(KoalaError, ValueError):
    """A file that is not a readable safetensors file."""


def read_header(path: str | os.PathLike) -> tuple[dict, int]:
    """(header dict without '__metadata__', byte offset of the data section)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise SafetensorsError(f"{path}: too short to be a safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise SafetensorsError(f"{path}: header length {n} exceeds the file size {size} (truncated file?)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SafetensorsError(f"{path}: unreadable safetensors header ({e})") from e
    header.pop("__metadata__", None)
    data_size = max((v["data_offsets"][1] for v in header.values()), default=0)
    if 8 + n + data_size > size:
        raise SafetensorsError(f"{path}: data section needs {data_size} bytes, file has {size - 8 - n} (truncated?)")
    return header, 8 + n


def load_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a safetensors file as read-only memory-mapped numpy arrays."""
    header, start = read_header(path)
    out = {}
    for name, info in header.items():
        if info["dtype"] not in _DTYPES:
            raise SafetensorsError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        dtype = np.dtype(_DTYPES[info["dtype"]])
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        if (end - begin) != dtype.itemsize * int(np.prod(shape, dtype=np.int64)):
            raise SafetensorsError(f"{path}: tensor {name!r} byte range does not match shape {shape} {dtype}")
        if end == begin:
            out[name] = np.zeros(shape, dtype)
        else:
            out[name] = np.memmap(path, dtype=dtype, mode="r", offset=start + begin, shape=shape)
    return out


def save_file(
    tensors: Mapping[str, np.ndarray], path: str | os.PathLike, metadata: Mapping[str, str] | None = None
) -> None:
    """Write `tensors` to `path` whole or not at all (`files.atomic_write`), one tensor at a time, showing
    progress on stderr for long writes (`weights.progress`). A disk that cannot hold the file is refused before
    anything is written; one that fills up meanwhile is a `DiskFullError` naming `path`."""
    if sys.byteorder != "little":
        raise SafetensorsError("safetensors is little-endian; writing from a big-endian host is not supported")
    path = Path(path)
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    arrays = {}
    for name in sorted(tensors):
        a = np.asarray(tensors[name])
        if a.dtype not in _NAMES:
            raise SafetensorsError(f"cannot write tensor {name!r} of dtype {a.dtype} to safetensors")
        header[name] = {"dtype": _NAMES[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        arrays[name] = a
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # Align the data section to 8 bytes, as the reference writer does.
    size = 8 + len(blob) + offset
    check_free_space(path.parent, size, path.name)  # Before gigabytes are written, not when they no longer fit.
    progress = Progress(f"writing {path.name}", offset, len(arrays))
    try:
        with atomic_write(path, "wb", needed=size) as f:
            f.write(struct.pack("<Q", len(blob)) + blob)
            for name in sorted(arrays):
                f.write(np.ascontiguousarray(arrays[name]).tobytes())  # Native order: little-endian hosts only.
                progress.update(arrays[name].nbytes)
    finally:
        progress.close()


def read_slice(array: np.ndarray, index: tuple) -> np.ndarray:
    """`array[index]`, where `array` may be a memory-mapped tensor of `load_file` or a view of one (a transpose),
    read with one explicit read of the bytes the slice spans. Page faults on the map would read around each
    fault (megabytes per tensor), which costs a host holding 1/N of every tensor far more than 1/N of the file;
    a slice that is contiguous in the file (a run of its outermost axis) reads exactly its own bytes."""
    part = array[index]
    source = part
    while isinstance(source.base, np.ndarray):
        source = source.base
    if not isinstance(source, np.memmap) or not part.size:
        return part
    lo, hi = byte_bounds(part)
    buffer = np.empty(hi - lo, np.uint8)
    with open(source.filename, "rb") as f:
        f.seek(source.offset + lo - byte_bounds(source)[0])
        f.readinto(buffer)
    start = part.__array_interface__["data"][0] - lo
    return np.ndarray(part.shape, part.dtype, buffer=buffer, offset=start, strides=part.strides)
