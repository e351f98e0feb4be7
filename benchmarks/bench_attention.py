"""Attention implementations: forward+backward time and compiled temporary memory.

    python benchmarks/bench_attention.py                # kernels at SDXL shapes + a tiny U-Net train step
    python benchmarks/bench_attention.py --full-step    # + compile the full-size step (xla vs chunked)

Kernels: jax.grad of sum(attention(q, k, v)^2) (one forward and one backward pass) for batch 1, 10 heads x
64, self-attention over 1,024 and 4,096 tokens (SDXL's two attention stages at 1024 px) and the 4,096-token
stage attending to the 77 text tokens; every implementation that runs on this backend. Train step: the
KOALA distillation step of train.py (tiny random teacher 'tiny-sdxl' -> KOALA-700M student, 512 px = 64 x 64
latents, batch 2, self-attention feature KD, default remat), one per implementation. Full step
(`--full-step`): the same step for the SDXL-Base teacher (bf16) and KOALA-700M (fp32 params, bf16 compute)
at 1024 px, batch 1, one device, compiled from abstract parameters only (no weights, nothing is run):
XLA's temporary bytes and FLOPs per implementation.

Temporaries are `compiled.memory_analysis().temp_size_in_bytes` (the scratch XLA allocates besides
arguments and outputs). Times exclude compilation and warm-up. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections

from koala_jax.models.attention_kernels import DEFAULT_BLOCK_KV, DEFAULT_BLOCK_Q, dot_product_attention
from koala_jax.students.presets import derive_student_config, preset
from koala_jax.train import sharding
from koala_jax.train.config import base_config
from koala_jax.train.metrics import compiled_flops
from koala_jax.train.step_builder import Models, TrainStep, build_step, random_inputs, synthetic_shape

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUTPUT = os.path.join(REPO, "benchmarks", "results", "bench_attention.json")
# What runs where ('cudnn' only for bf16/fp16 inputs; 'auto' joins the train-step rows).
IMPLS = {"cpu": ("xla", "chunked"), "gpu": ("xla", "cudnn", "chunked"), "tpu": ("xla", "chunked", "flash", "splash")}
KERNEL_SHAPES = ((1024, 1024), (4096, 4096), (4096, 77))  # (q tokens, k tokens)
HEADS, HEAD_DIM = 10, 64


def log(message: str) -> None:
    print(f"[bench_attention] {message}", flush=True)


def seconds_per_call(call: Callable[[], object], warmup: int, steps: int) -> float:
    for _ in range(warmup):
        jax.block_until_ready(call())
    start = time.perf_counter()
    for _ in range(steps):
        jax.block_until_ready(call())
    return (time.perf_counter() - start) / steps


def available_impls(dtype: jnp.dtype) -> tuple[str, ...]:
    impls = IMPLS.get(jax.default_backend(), IMPLS["cpu"])
    return tuple(i for i in impls if i != "cudnn" or dtype in (jnp.bfloat16, jnp.float16))


# ---------------------------------------------------------------- kernels


def bench_kernel(impl: str, tq: int, tk: int, dtype: jnp.dtype, args: argparse.Namespace) -> dict:
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (1, tq, HEADS, HEAD_DIM), dtype)
    k, v = (jax.random.normal(key, (1, tk, HEADS, HEAD_DIM), dtype) for key in keys[1:])

    def loss(q, k, v):
        out = dot_product_attention(q, k, v, impl, args.block_q, args.block_kv)
        return jnp.sum(out.astype(jnp.float32) ** 2)

    start = time.perf_counter()
    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile()
    compile_s = time.perf_counter() - start
    step_s = seconds_per_call(lambda: compiled(q, k, v), args.warmup, args.steps)
    return {
        "case": f"attention {tq}x{tk}",
        "impl": impl,
        "seconds": step_s,
        "temp_bytes": compiled.memory_analysis().temp_size_in_bytes,
        "compile_s": compile_s,
    }


# ---------------------------------------------------------------- train steps


def attention_step(cfg: ml_collections.ConfigDict, teacher_name: str, batch: int, resolution: int) -> TrainStep:
    """train.py's step (`step_builder.build_step`) for the teacher preset and its KOALA student
    (`cfg.student.variant`) on one device, `batch` random SDXL-shaped records of `resolution` px."""
    teacher = preset(teacher_name)
    models = Models(teacher, derive_student_config(teacher, cfg.student.variant), {})
    mesh = sharding.make_mesh(1, 1, jax.devices()[:1])
    return build_step(cfg, models, synthetic_shape(teacher, resolution), mesh, batch)


def train_config(impl: str, variant: str, args: argparse.Namespace) -> ml_collections.ConfigDict:
    c = base_config()
    c.student.variant = variant
    c.compute.attention_impl = impl
    c.compute.attention_block_q, c.compute.attention_block_kv = args.block_q, args.block_kv
    c.kd.features = ("attn1",)
    return c


def compile_step(step: TrainStep) -> tuple:
    """Compile as the training loop does (under the mesh); returns (compiled, seconds)."""
    start = time.perf_counter()
    compiled = step.compile()
    return compiled, time.perf_counter() - start


def bench_tiny_step(impl: str, args: argparse.Namespace) -> dict:
    cfg = train_config(impl, "koala-700m", args)
    step = attention_step(cfg, "tiny-sdxl", args.step_batch, args.step_resolution)
    state, teacher, batch, null = (random_inputs(tree, seed) for seed, tree in enumerate(step.inputs))
    compiled, compile_s = compile_step(step)

    def call():
        nonlocal state
        state, metrics = compiled(state, teacher, batch, null)
        return metrics

    return {
        "case": f"tiny step {args.step_resolution}px b{args.step_batch}",
        "impl": impl,
        "seconds": seconds_per_call(call, args.warmup, args.steps),
        "temp_bytes": compiled.memory_analysis().temp_size_in_bytes,
        "compile_s": compile_s,
        "flops": compiled_flops(compiled),
    }


def compile_full_step(impl: str, args: argparse.Namespace) -> dict:
    """Compile-only: SDXL-Base (bf16) -> KOALA-700M at 1024 px, batch 1, from ShapeDtypeStructs."""
    step = attention_step(train_config(impl, "koala-700m", args), "sdxl-base", 1, 1024)
    log(f"full step {impl}: compiling (about a minute, ~3 GiB)")
    compiled, compile_s = compile_step(step)
    return {
        "case": "full step 1024px b1 (compile only)",
        "impl": impl,
        "seconds": None,
        "temp_bytes": compiled.memory_analysis().temp_size_in_bytes,
        "compile_s": compile_s,
        "flops": compiled_flops(compiled),
    }


# ---------------------------------------------------------------- report


def print_table(rows: list[dict], device: str) -> None:
    print(f"\ndevice: {device}")
    print(f"{'case':<36} {'impl':<8} {'fwd+bwd s':>10} {'temp MiB':>10} {'compile s':>10}")
    for r in rows:
        seconds = f"{r['seconds']:.4f}" if r["seconds"] is not None else "-"
        print(f"{r['case']:<36} {r['impl']:<8} {seconds:>10} {r['temp_bytes'] / 2**20:>10.1f} {r['compile_s']:>10.1f}")


def device_description() -> str:
    d = jax.devices()[0]
    return f"jax {jax.__version__}: {d.platform} {d.device_kind} ({platform.machine()}, {os.cpu_count()} CPUs)"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="kernel inputs")
    p.add_argument("--impls", default="", help="comma-separated kernel implementations (default: all that run here)")
    p.add_argument("--block-q", type=int, default=DEFAULT_BLOCK_Q)
    p.add_argument("--block-kv", type=int, default=DEFAULT_BLOCK_KV)
    p.add_argument("--steps", type=int, default=3, help="timed calls")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls after compilation")
    p.add_argument("--step-resolution", type=int, default=512, help="tiny train step: pixels (latents / 8)")
    p.add_argument("--step-batch", type=int, default=2)
    p.add_argument("--skip-kernels", action="store_true")
    p.add_argument("--skip-step", action="store_true", help="no tiny train step")
    p.add_argument("--full-step", action="store_true", help="also compile the full-size step (xla vs chunked)")
    p.add_argument("--out", default=DEFAULT_OUTPUT, help="JSON results file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    dtype = jnp.dtype(args.dtype)
    impls = args.impls.split(",") if args.impls else available_impls(dtype)
    rows = []
    if not args.skip_kernels:
        for tq, tk in KERNEL_SHAPES:
            for impl in impls:
                log(f"attention {tq}x{tk} {impl}")
                rows.append(bench_kernel(impl, tq, tk, dtype, args))
    if not args.skip_step:
        for impl in (*available_impls(jnp.dtype(jnp.bfloat16)), "auto"):
            log(f"tiny train step {impl}")
            rows.append(bench_tiny_step(impl, args))
    if args.full_step:
        rows += [compile_full_step(impl, args) for impl in ("xla", "chunked")]
    device = device_description()
    print_table(rows, device)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(
            {"date": datetime.date.today().isoformat(), "device": device, "args": vars(args), "results": rows},
            f,
            indent=2,
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
