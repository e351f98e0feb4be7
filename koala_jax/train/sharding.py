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

from koala_jax.errors import ConfigError

AXES = ("data", "fsdp")
BATCH_AXES = AXES  # the leading batch dimension is split over every device


def mesh_shape(data: int, fsdp: int, devices: int) -> tuple[int, int]:
    """(data, fsdp) of a mesh over `devices` devices; -1 on one axis takes the rest. A shape that does not
    cover the devices exactly is a ConfigError naming the settings as given."""
    given = f"mesh.data={data} x mesh.fsdp={fsdp}"
    if data == -1 and fsdp == -1:
        raise ConfigError(f"{given}: at most one of mesh.data and mesh.fsdp may be -1")
    if min(data, fsdp) < -1 or 0 in (data, fsdp):
        raise ConfigError(f"{given}: each must be a positive number of devices, or -1 for the rest")
    rest = fsdp if data == -1 else data if fsdp == -1 else None
    if rest is not None and devices % rest:
        raise ConfigError(f"{given}: {rest} does not divide the {devices} device(s)")
    shape = (devices // fsdp if data == -1 else data, devices // data if fsdp == -1 else fsdp)
    if shape[0] * shape[1] != devices:
        raise ConfigError(f"{given} is {shape[0] * shape[1]} devices: does not cover the {devices} device(s) here")
    return shape


def make_mesh(data: int = -1, fsdp: int = 1, devices: list | None = None) -> Mesh:
    """A (data, fsdp) mesh over all devices; -1 on one axis takes the rest."""
    devices = list(devices if devices is not None else jax.devices())
    return Mesh(np.asarray(devices).reshape(mesh_shape(data, fsdp, len(devices))), AXES)


MIN_SHARDED_SIZE = 2**12  # smaller arrays (biases, norms, RNG keys) are cheaper replicated


def fsdp_spec(shape: tuple[int, ...], fsdp_size: int, prefer: int | None = None) -> P:
    """Shard axis `prefer` when `fsdp_size` divides it, else the largest dimension it divides; replicate small
    or indivisible arrays."""
    if fsdp_size == 1 or int(np.prod(shape)) < MIN_SHARDED_SIZE:
        return P()
    axes = sorted(range(len(shape)), key=lambda a: -shape[a])
    if prefer is not None:
        axes.insert(0, axes.pop(axes.index(prefer % len(shape))))
    for axis in axes:
        if shape[axis] % fsdp_size == 0 and shape[axis] >= fsdp_size:
            spec = [None] * len(shape)
            spec[axis] = "fsdp"
            return P(*spec)
    return P()


def tree_shardings(tree, mesh: Mesh):
    """NamedShardings for a pytree of arrays or ShapeDtypeStructs (FSDP rule, replicated over 'data')."""
    return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(tuple(x.shape), mesh.shape["fsdp"])), tree)


def checkpoint_major_axis(path: tuple) -> int:
    """The axis of a Flax parameter that checkpoints store outermost: a kernel's last (PyTorch stores Linear and
    Conv weights output-first, Flax kernels output-last), the first of anything else."""
    return -1 if path and getattr(path[-1], "key", None) == "kernel" else 0


def reading_sharding(path: tuple, shape: tuple[int, ...], sharding: NamedSharding) -> NamedSharding:
    """How to read the checkpoint tensor at Flax `path` before laying it out as `sharding`: over the same fsdp
    devices, split along the axis the checkpoint stores outermost, so each device's slice is one contiguous run
    of the file. The compute layout's axis (the largest) may instead interleave every device's slice in every
    page of the tensor, so that a host holding 1/N of it would read all of it."""
    if "fsdp" not in jax.tree.leaves(tuple(sharding.spec)):
        return sharding
    return NamedSharding(sharding.mesh, fsdp_spec(shape, sharding.mesh.shape["fsdp"], checkpoint_major_axis(path)))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
