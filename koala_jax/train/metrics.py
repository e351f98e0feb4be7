"""Throughput and MFU: FLOPs of the compiled step from XLA's cost analysis, divided by the time and
the measured peak of the devices."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp


def compiled_flops(compiled) -> float | None:
    """FLOPs per call of a compiled jax function (XLA cost analysis), or None if the backend has none."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and cost.get("flops") else None


def measure_peak_flops(dtype=jnp.bfloat16, n: int | None = None, repeats: int = 5) -> float:
    """Best matmul FLOP/s of one device (an n x n x n product), the denominator of MFU."""
    n = n or (8192 if jax.default_backend() in ("gpu", "tpu") else 1024)
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


class Throughput:
    """Step time, images/s and MFU over the steps since the last report."""

    def __init__(self, global_batch: int, step_flops: float | None, peak_flops_per_device: float | None):
        self.global_batch = global_batch
        self.step_flops = step_flops
        self.peak = peak_flops_per_device * jax.device_count() if peak_flops_per_device else None
        self.start, self.steps = time.perf_counter(), 0

    def tick(self) -> None:
        self.steps += 1

    def report(self) -> dict[str, float]:
        elapsed = time.perf_counter() - self.start
        step_time = elapsed / max(self.steps, 1)
        out = {"step_time_s": step_time, "images_per_s": self.global_batch / step_time}
        if self.step_flops and self.peak:
            out["mfu"] = self.step_flops / step_time / self.peak
        self.start, self.steps = time.perf_counter(), 0
        return out
