"""JAX params directories, the format `convert_weights.py` writes and `train.py` reads.

Layout: `<dir>/config.json` (the diffusers U-Net config, `UNetConfig.to_diffusers()`) beside
`<dir>/params/`, an orbax checkpoint of the Flax params tree that `ocp.StandardCheckpointer().restore`
also reads. Leaves come back as host numpy arrays in the dtype they were saved in.

Why not orbax's default handler settings: they deep-copy every host array before the asynchronous
write and compress it, so saving the 2.6B-parameter SDXL tree peaked at three copies of the weights
in memory. Here numpy leaves are written in place and uncompressed, and restores go in 1 GiB chunks,
so a save or a load holds about one copy. Directories are written under a temporary name and
renamed when complete: a crash never leaves a folder that looks like a finished model.

A save is checked against the free space first (the size of the params is known), a disk that fills up
during it is one `DiskFullError` (orbax's own logging of the failure and its asynchronous aftermath are
silenced), and Ctrl-C or SIGTERM wait until orbax has finished (`orbax_errors.uninterrupted`): an orbax save
that is interrupted keeps writing in its threads while its folder is deleted and the interpreter shuts down.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax.traverse_util import flatten_dict, unflatten_dict
from orbax.checkpoint import type_handlers

from koala_jax.errors import ConvertError, MissingPathError
from koala_jax.files import check_free_space, disk_full_as, fault_point
from koala_jax.models import UNetConfig, abstract_params
from koala_jax.weights.atomic import atomic_output_dir
from koala_jax.weights.diffusers_dir import CONFIG_NAME
from koala_jax.weights.orbax_errors import (
    describe_failure,
    quiet_closed_loop_noise,
    quiet_save_logging,
    uninterrupted,
)
from koala_jax.weights.state_dict import check_against

PARAMS_NAME = "params"
RESTORE_CHUNK_BYTES = 2**30
_TEMPORARY_SUFFIX = re.compile(r"\.tmp-\d+-[0-9a-f]{8}$")
METADATA_BYTES = 2**20  # orbax's metadata files and config.json, on top of the arrays


def is_params_dir(path: str | os.PathLike) -> bool:
    """Whether `path` looks like a JAX params dir (config.json and params/)."""
    path = Path(path)
    return (path / CONFIG_NAME).is_file() and (path / PARAMS_NAME).is_dir()


class _NumpyHandler(type_handlers.NumpyHandler):
    """orbax's numpy handler with the fault points of the tests: `params_dir.save` in the main thread once the
    save has started (its folder exists), `params_dir.write_array` in orbax's writer thread before each array."""

    async def serialize(self, values, infos, args=None):
        fault_point("params_dir.save")
        return await super().serialize(values, infos, args)

    async def _open_and_write(self, value, tspec, ts_context):
        fault_point("params_dir.write_array")
        return await super()._open_and_write(value, tspec, ts_context)


def _checkpointer() -> ocp.Checkpointer:
    registry = type_handlers.create_type_handler_registry(
        (np.ndarray, _NumpyHandler(deepcopy_host_arrays=False)),
        (jax.Array, type_handlers.get_type_handler(jax.Array)),
    )  # Unused (leaves are numpy), but orbax wants one.
    handler = ocp.PyTreeCheckpointHandler(
        save_concurrent_gb=1, restore_concurrent_gb=1, use_compression=False, type_handler_registry=registry
    )
    return ocp.Checkpointer(handler)


def write_params(folder: str | os.PathLike, params: dict, config: UNetConfig) -> None:
    """Write config.json and params/ into `folder`, created if needed (not atomic on its own: use
    `save_params`, or call this inside `atomic_output_dir`). Leaves: numpy or jax arrays."""
    folder = Path(folder).absolute()
    host = jax.tree.map(np.asarray, params)  # No copy for numpy leaves; jax ones are fetched to host.
    needed = sum(leaf.nbytes for leaf in jax.tree.leaves(host)) + METADATA_BYTES
    check_free_space(_output_name(folder), needed, "the JAX params")
    folder.mkdir(parents=True, exist_ok=True)
    quiet_closed_loop_noise()
    with disk_full_as(_output_name(folder), needed):
        (folder / CONFIG_NAME).write_text(json.dumps(config.to_diffusers(), indent=2) + "\n")
        with uninterrupted(), quiet_save_logging():
            _checkpointer().save(folder / PARAMS_NAME, host)


def _output_name(folder: Path) -> Path:
    """`folder` as the user named it: without the `.tmp-<pid>-<random>` of `atomic_output_dir`'s folder."""
    return Path(*(_TEMPORARY_SUFFIX.sub("", part) for part in folder.parts))


def save_params(out: str | os.PathLike, params: dict, config: UNetConfig, overwrite: bool = False) -> Path:
    """Write a JAX params dir atomically; returns its absolute path."""
    with atomic_output_dir(out, overwrite) as tmp:
        write_params(tmp, params, config)
    return Path(out).absolute()


def read_params_config(path: str | os.PathLike) -> UNetConfig:
    """The UNetConfig of a JAX params dir, without reading any weights."""
    path = Path(path)
    if not is_params_dir(path):
        raise MissingPathError(f"{path}: not a JAX params dir (expected {CONFIG_NAME} and {PARAMS_NAME}/)")
    return UNetConfig.from_diffusers(json.loads((path / CONFIG_NAME).read_text()))


def load_params(path: str | os.PathLike) -> tuple[UNetConfig, dict]:
    """(config, params as host numpy arrays) of a JAX params dir.

    Every key and shape is checked against the architecture of config.json before any weight is read
    (a mismatch raises StateDictError naming each bad key). The weights are then restored in chunks of
    about 1 GiB: one restore of the whole tree held ~25% more than the weights in tensorstore's buffers.
    """
    path = Path(path).absolute()
    config = read_params_config(path)
    checkpointer = _checkpointer()
    quiet_closed_loop_noise()
    metadata = checkpointer.metadata(path / PARAMS_NAME)
    if metadata is None or metadata.item_metadata is None:
        raise ConvertError(f"{path}: damaged JAX params dir ({PARAMS_NAME}/ has no readable orbax metadata)")
    saved = flatten_dict(metadata.item_metadata.tree)
    check_against(saved, flatten_dict(abstract_params(config)))
    params = {}
    for chunk in _chunks(saved, RESTORE_CHUNK_BYTES):
        item = unflatten_dict({p: np.empty(0) for p in chunk})  # Only the structure is used.
        restore_args = unflatten_dict({p: ocp.RestoreArgs(restore_type=np.ndarray) for p in chunk})
        args = ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True)
        # orbax wraps a tensorstore read failure (a missing or truncated array file) in a bare Exception.
        try:
            params.update(flatten_dict(checkpointer.restore(path / PARAMS_NAME, args=args)))
        except Exception as e:  # a damaged params dir (see above); the cause is kept for --debug
            raise ConvertError(f"{path}: damaged JAX params dir ({describe_failure(e)})") from e
    return config, unflatten_dict(params)


def _chunks(metadata: dict, limit: int) -> Iterator[list[tuple[str, ...]]]:
    """Consecutive groups of parameter paths of at most `limit` bytes each (or one larger parameter)."""
    chunk, size = [], 0
    for path, meta in metadata.items():
        nbytes = math.prod(meta.shape) * np.dtype(meta.dtype).itemsize
        if chunk and size + nbytes > limit:
            yield chunk
            chunk, size = [], 0
        chunk.append(path)
        size += nbytes
    if chunk:
        yield chunk
