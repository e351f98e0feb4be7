"""The one table of dtype names: `fp32`/`float32`, `fp16`/`float16`, `bf16`/`bfloat16`.

numpy dtypes are returned; they are also JAX dtypes (`jnp.bfloat16` is ml_dtypes' bfloat16), so the
converter's safetensors writer and the trainer's compute options read the same table.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from koala_jax.errors import KoalaError

_DTYPES = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
}
_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
NAMES = tuple(_ALIASES) + tuple(_DTYPES)  # What command-line choices accept.


def dtype(name: str) -> np.dtype:
    """The dtype called `name` (short or long form)."""
    key = _ALIASES.get(name, name)
    if key not in _DTYPES:
        raise KoalaError(f"unknown dtype {name!r}; choose from {', '.join(NAMES)}")
    return _DTYPES[key]


def short_name(d: np.dtype) -> str:
    """'fp32', 'fp16' or 'bf16' for a dtype of the table."""
    long = next(k for k, v in _DTYPES.items() if v == np.dtype(d))
    return next(k for k, v in _ALIASES.items() if v == long)
