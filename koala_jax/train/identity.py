"""A run's identity: which teacher and which data its checkpoints were trained with. The workdir records both
(`run_identity.json`); a resume that changes either is refused in one line naming both values, unless the user
accepts the change with `--config.resume.allow_changes=teacher,data` (then logged and recorded).

The teacher's fingerprint is cheap at SDXL size: the number of tensors, their bytes, and a hash of a small corner
of a few tensors spread over the network (memory-mapped sources read only those bytes). It tells a different
teacher of the same shape (another checkpoint, a step-distilled one) from the same teacher moved elsewhere.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from flax.traverse_util import flatten_dict

from koala_jax.data.schema import DATASET_INFO_FILE
from koala_jax.errors import ConfigError
from koala_jax.files import write_json
from koala_jax.weights.training_run import checkpoint_steps

IDENTITY_FILE = "run_identity.json"
CHANGEABLE = ("teacher", "data")
_HASHED_TENSORS = 8  # tensors hashed, evenly spread over the sorted names
_CORNER = 4  # a corner of at most 4 entries per axis of each


def teacher_fingerprint(source: str, params: dict) -> dict[str, Any]:
    """{source, tensors, bytes, hash} of the teacher's (host, possibly memory-mapped) params."""
    leaves = sorted(flatten_dict(params).items())
    digest = hashlib.sha256()
    step = max(len(leaves) // _HASHED_TENSORS, 1)
    for path, value in leaves[::step]:
        array = np.asarray(value)
        corner = np.ascontiguousarray(array[tuple(slice(0, _CORNER) for _ in array.shape)], np.float32)
        digest.update("/".join(map(str, path)).encode() + corner.tobytes())
    total = sum(np.asarray(v).size * np.asarray(v).dtype.itemsize for _, v in leaves)
    return {"source": source, "tensors": len(leaves), "bytes": int(total), "hash": digest.hexdigest()[:16]}


def data_identity(source_name: str, kind: str, records: int, latent_shape: tuple[int, ...]) -> dict[str, Any]:
    """{source, kind ('synthetic' or 'prepared'), records, latent_shape} of a run's records."""
    return {"source": source_name, "kind": kind, "records": int(records), "latent_shape": list(latent_shape)}


def compared(part: dict[str, Any] | None) -> dict[str, Any]:
    """What must not change on resume: everything but where it is (a teacher or dataset moved elsewhere is the
    same one)."""
    return {k: v for k, v in (part or {}).items() if k != "source"}


def describe(part: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in part.items())


def check_identity(cfg: ml_collections.ConfigDict, teacher_params: dict, source) -> list[str]:
    """The run's identity now (its teacher's fingerprint, its records), compared with what its workdir recorded
    when it resumes (`compare_identity`); a line for each change `resume.allow_changes` accepts."""
    data = cfg.data.source
    kind = "synthetic" if data == "synthetic" else "prepared" if Path(data, DATASET_INFO_FILE).is_file() else "raw"
    now = {
        "teacher": teacher_fingerprint(cfg.teacher.source, teacher_params),
        "data": data_identity(data, kind, len(source), source[0]["latents"].shape),
    }
    allowed = tuple(part.strip() for part in cfg.resume.allow_changes.split(",") if part.strip())
    resuming = bool(checkpoint_steps(cfg.workdir))
    return compare_identity(cfg.workdir, now, allowed, resuming, jax.process_index() == 0)


def compare_identity(
    workdir: str | Path, now: dict[str, dict], allowed: tuple[str, ...], resuming: bool, record: bool
) -> list[str]:
    """Compare `now` ({'teacher': ..., 'data': ...}) with what the workdir recorded, when resuming; raise
    ConfigError for a change not in `allowed`; return a line for each change accepted. Records `now` (`record`:
    process 0)."""
    path = Path(workdir) / IDENTITY_FILE
    before = json.loads(path.read_text()) if resuming and path.is_file() else None
    accepted = []
    if before is not None:
        changed = [part for part in CHANGEABLE if compared(before.get(part)) != compared(now[part])]
        refused = [part for part in changed if part not in allowed]
        if refused:
            shown = "; ".join(f"{p}: {describe(before.get(p) or {})} then, {describe(now[p])} now" for p in refused)
            raise ConfigError(
                f"{workdir} was trained with another {' and '.join(refused)} ({shown}); resume with the same, use "
                f"another workdir, or accept the change with --config.resume.allow_changes={','.join(refused)}"
            )
        accepted = [
            f"resume accepts a changed {p}: {describe(before.get(p) or {})} -> {describe(now[p])}" for p in changed
        ]
    if record:
        write_json(path, now)
    return accepted
