"""One mapping between a PyTorch state dict (diffusers U-Net or VAE, transformers CLIP text encoder) and
our Flax parameter tree, both ways.

Layouts: Conv2d weight (O, I, kh, kw) <-> Flax Conv kernel (kh, kw, I, O); Linear weight (O, I) <->
Dense kernel (I, O); Embedding weight (N, D) <-> Embed embedding (N, D); norm weight <-> scale; biases
unchanged. Conversions are pure transposes, so a state dict survives the round trip bit for bit. Arrays
are numpy (any dtype, bf16 via ml_dtypes). `naming` (default: diffusers') says which names are lists and
which modules are embedding tables.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from koala_jax.errors import KoalaError
from koala_jax.models.naming import DIFFUSERS, Naming, flax_path_to_torch_module, torch_module_to_flax_path

_TO_FLAX = {4: (2, 3, 1, 0), 2: (1, 0)}
_TO_TORCH = {4: (3, 2, 0, 1), 2: (1, 0)}


class StateDictError(KoalaError, KeyError):
    """Missing, unexpected or mis-shaped keys between a checkpoint and the model."""


def torch_key_to_flax(key: str, ndim: int, naming: Naming = DIFFUSERS) -> tuple[str, ...]:
    """'conv_in.weight' (4-D) -> ('conv_in', 'kernel'); 'conv_norm_out.weight' (1-D) -> (..., 'scale');
    an embedding table's 'token_embedding.weight' -> (..., 'embedding')."""
    module, _, leaf = key.rpartition(".")
    try:
        path = torch_module_to_flax_path(module, naming)
    except KeyError as e:  # Not a name of this model family at all (e.g. an index after a field name).
        raise StateDictError(f"unexpected parameter name {key!r}: {e.args[0]}") from e
    if leaf == "bias":
        return path + ("bias",)
    if leaf != "weight":
        raise StateDictError(f"unexpected parameter name {key!r} (expected '.weight' or '.bias')")
    if path and path[-1] in naming.embeddings:
        return path + ("embedding",)
    return path + ("kernel" if ndim in _TO_FLAX else "scale",)


def flax_path_to_torch_key(path: tuple[str, ...], naming: Naming = DIFFUSERS) -> str:
    """('conv_in', 'kernel') -> 'conv_in.weight'."""
    leaf = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}[path[-1]]
    return f"{flax_path_to_torch_module(path[:-1], naming)}.{leaf}"


def torch_shape(path: tuple[str, ...], flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The PyTorch-layout shape of the Flax leaf at `path` (no array needed: works on ShapeDtypeStructs)."""
    perm = _TO_TORCH.get(len(flax_shape)) if path[-1] == "kernel" else None
    return tuple(flax_shape[i] for i in perm) if perm else tuple(flax_shape)


def torch_to_flax(state_dict: Mapping[str, Any], expected: Mapping | None = None, naming: Naming = DIFFUSERS) -> dict:
    """Convert a PyTorch state dict (a diffusers U-Net's by default) to a nested Flax params dict.

    `expected` (a params tree of arrays or ShapeDtypeStructs, e.g. from `jax.eval_shape`) turns on
    validation: every missing, unexpected or mis-shaped key is reported at once, with both shapes.
    """
    flat = {}
    for key, value in state_dict.items():
        value = np.asarray(value)
        path = torch_key_to_flax(key, value.ndim, naming)
        perm = _TO_FLAX.get(value.ndim) if path[-1] == "kernel" else None
        flat[path] = np.transpose(value, perm) if perm else value
    if expected is not None:
        check_against(flat, flatten_dict(dict(expected)), naming)
    return unflatten_dict(flat)


def flax_to_torch(params: Mapping, naming: Naming = DIFFUSERS) -> dict[str, np.ndarray]:
    """Convert a nested Flax params dict back to a PyTorch state dict (contiguous numpy arrays)."""
    out = {}
    for path, value in flatten_dict(dict(params)).items():
        value = np.asarray(value)
        perm = _TO_TORCH.get(value.ndim) if path[-1] == "kernel" else None
        out[flax_path_to_torch_key(path, naming)] = np.ascontiguousarray(np.transpose(value, perm) if perm else value)
    return out


def check_against(
    flat: Mapping[tuple[str, ...], Any], expected: Mapping[tuple[str, ...], Any], naming: Naming = DIFFUSERS
) -> None:
    """Raise StateDictError listing every key that is missing, unexpected or of the wrong shape
    (named as PyTorch keys, shapes in PyTorch layout)."""
    key = lambda path: flax_path_to_torch_key(path, naming)
    problems = []
    for path in sorted(expected.keys() - flat.keys()):
        problems.append(f"missing key {key(path)!r} (model expects shape {torch_shape(path, expected[path].shape)})")
    for path in sorted(flat.keys() - expected.keys()):
        problems.append(f"unexpected key {key(path)!r} (checkpoint shape {torch_shape(path, np.shape(flat[path]))})")
    for path in sorted(flat.keys() & expected.keys()):
        got, want = tuple(np.shape(flat[path])), tuple(expected[path].shape)
        if got != want:
            problems.append(
                f"shape mismatch for {key(path)!r}: checkpoint "
                f"{torch_shape(path, got)} vs model {torch_shape(path, want)}"
            )
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise StateDictError(f"{len(problems)} state dict problem(s):\n  {shown}{more}")


def torch_shapes(params: Mapping, naming: Naming = DIFFUSERS) -> dict[str, tuple[int, ...]]:
    """{PyTorch key: PyTorch shape} of a params tree of arrays or ShapeDtypeStructs, reading no data."""
    return {
        flax_path_to_torch_key(p, naming): torch_shape(p, tuple(x.shape)) for p, x in flatten_dict(dict(params)).items()
    }
