"""The device mesh and how arrays are laid out on it.

Mesh axes: 'data' (pure data parallelism: replicas of the parameters) and 'fsdp' (fully sharded:
parameters, optimizer state and teacher split along their largest divisible dimension, gathered by
XLA per layer as needed). The batch is split over both axes, so every device gets distinct samples.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data", "fsdp")
BATCH_AXES = AXES  # the leading batch dimension is split over every device


def make_mesh(data: int = -1, fsdp: int = 1, devices: list | None = None) -> Mesh:
    """A (data, fsdp) mesh over all devices; -1 on one axis takes the rest."""
    devices = list(devices if devices is not None else jax.devices())
    n = len(devices)
    if data == -1 and fsdp == -1:
        raise ValueError("mesh: at most one of data and fsdp may be -1")
    data = n // fsdp if data == -1 else data
    fsdp = n // data if fsdp == -1 else fsdp
    if data * fsdp != n:
        raise ValueError(f"mesh data={data} x fsdp={fsdp} does not cover the {n} devices")
    return Mesh(np.asarray(devices).reshape(data, fsdp), AXES)


MIN_SHARDED_SIZE = 2**12  # smaller arrays (biases, norms, RNG keys) are cheaper replicated


def fsdp_spec(shape: tuple[int, ...], fsdp_size: int) -> P:
    """Shard the largest dimension that `fsdp_size` divides; replicate small or indivisible arrays."""
    if fsdp_size == 1 or int(np.prod(shape)) < MIN_SHARDED_SIZE:
        return P()
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
        if shape[axis] % fsdp_size == 0 and shape[axis] >= fsdp_size:
            spec = [None] * len(shape)
            spec[axis] = "fsdp"
            return P(*spec)
    return P()


def tree_shardings(tree, mesh: Mesh):
    """NamedShardings for a pytree of arrays or ShapeDtypeStructs (FSDP rule, replicated over 'data')."""
    return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(tuple(x.shape), mesh.shape["fsdp"])), tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
