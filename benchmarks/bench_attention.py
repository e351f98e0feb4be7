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
import dataclasses
import datetime
import json
import os
import platform
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from koala_jax.models import UNetConfig, abstract_params, random_params
from koala_jax.models.attention_kernels import DEFAULT_BLOCK_KV, DEFAULT_BLOCK_Q, dot_product_attention
from koala_jax.students.presets import derive_student_config, preset
from koala_jax.train import sharding
from koala_jax.train.config import base_config
from koala_jax.train.losses import LossWeights
from koala_jax.train.metrics import compiled_flops
from koala_jax.train.noise import NoiseSchedule
from koala_jax.train.setup import make_models, place
from koala_jax.train.state import init_state, make_optimizer
from koala_jax.train.step import StepConfig, jit_train_step

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


@dataclasses.dataclass(frozen=True)
class Step:
    """train.py's step for one config on one device, with the abstract inputs it compiles for."""

    fn: Callable
    state: Any  # abstract TrainState (ShapeDtypeStructs)
    teacher_params: Any  # abstract, bf16
    teacher_config: UNetConfig
    student_config: UNetConfig
    optimizer: optax.GradientTransformation
    mesh: jax.sharding.Mesh


def build_step(cfg: ml_collections.ConfigDict, teacher_name: str) -> Step:
    """The teacher preset, its KOALA student (`cfg.student.variant`), the models, optimizer, noise and
    loss as train.py builds them, and the jitted step with one-device shardings."""
    teacher_config = preset(teacher_name)
    student_config = derive_student_config(teacher_config, cfg.student.variant)
    teacher, student, pairs = make_models(cfg, teacher_config, student_config)
    mesh = sharding.make_mesh(1, 1, jax.devices()[:1])
    optimizer = make_optimizer(ml_collections.ConfigDict({**cfg.optim.to_dict(), "total_steps": cfg.total_steps}))
    state = jax.eval_shape(lambda p: init_state(p, optimizer, cfg.seed, False), abstract_params(student_config))
    teacher_params = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16), abstract_params(teacher_config)
    )
    n = cfg.noise
    step_cfg = StepConfig(
        student=student,
        teacher=teacher,
        schedule=NoiseSchedule(n.num_train_timesteps, n.beta_start, n.beta_end, n.prediction_type),
        weights=LossWeights(cfg.kd.task, cfg.kd.out, cfg.kd.feat),
        pairs=pairs,
        optimizer=optimizer,
        ema_decay=None,
        caption_dropout=cfg.data.caption_dropout,
    )
    fn = jit_train_step(
        step_cfg,
        sharding.tree_shardings(state, mesh),
        sharding.tree_shardings(teacher_params, mesh),
        sharding.batch_sharding(mesh),
        sharding.replicated(mesh),
    )
    return Step(fn, state, teacher_params, teacher_config, student_config, optimizer, mesh)


def train_config(impl: str, variant: str, args: argparse.Namespace) -> ml_collections.ConfigDict:
    c = base_config()
    c.student.variant = variant
    c.compute.attention_impl = impl
    c.compute.attention_block_q, c.compute.attention_block_kv = args.block_q, args.block_kv
    c.kd.features = ("attn1",)
    return c


def random_batch(config, batch: int, latent: int, text_len: int = 77) -> tuple[dict, dict]:
    """Host batch and null embeddings shaped like prepared SDXL records (float32)."""
    rng = np.random.default_rng(0)
    pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    width = config.cross_attention_dim[0]
    data = {
        "latents": rng.standard_normal((batch, config.in_channels, latent, latent), np.float32),
        "prompt_embeds": rng.standard_normal((batch, text_len, width), np.float32),
        "pooled_prompt_embeds": rng.standard_normal((batch, pooled), np.float32),
        "time_ids": np.tile(np.array([8 * latent] * 2 + [0, 0] + [8 * latent] * 2, np.float32), (batch, 1)),
    }
    null = {"prompt_embeds": np.zeros((text_len, width), np.float32), "pooled_prompt_embeds": np.zeros(pooled)}
    return data, null


def compile_step(step: Step, *inputs) -> tuple:
    """Lower and compile as the training loop does (under the mesh); returns (compiled, seconds)."""
    start = time.perf_counter()
    with jax.set_mesh(step.mesh):
        compiled = step.fn.lower(*inputs).compile()
    return compiled, time.perf_counter() - start


def bench_tiny_step(impl: str, args: argparse.Namespace) -> dict:
    cfg = train_config(impl, "koala-700m", args)
    step = build_step(cfg, "tiny-sdxl")
    mesh = step.mesh
    params = place(random_params(step.student_config, 0), sharding.tree_shardings(step.state.params, mesh))
    state = jax.jit(lambda p: init_state(p, step.optimizer, cfg.seed, False))(params)
    teacher_host = random_params(step.teacher_config, 1)
    teacher = place(teacher_host, sharding.tree_shardings(teacher_host, mesh), jnp.bfloat16)
    data, null = random_batch(step.teacher_config, args.step_batch, args.step_resolution // 8)
    batch, null = jax.device_put(data, sharding.batch_sharding(mesh)), jax.device_put(null, sharding.replicated(mesh))
    compiled, compile_s = compile_step(step, state, teacher, batch, null)

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
    step = build_step(train_config(impl, "koala-700m", args), "sdxl-base")
    mesh = step.mesh
    placed = lambda tree, shardings: jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )
    data, null = random_batch(step.teacher_config, 1, 128)
    log(f"full step {impl}: compiling (about a minute, ~3 GiB)")
    compiled, compile_s = compile_step(
        step,
        placed(step.state, sharding.tree_shardings(step.state, mesh)),
        placed(step.teacher_params, sharding.tree_shardings(step.teacher_params, mesh)),
        placed(data, jax.tree.map(lambda _: sharding.batch_sharding(mesh), data)),
        placed(null, jax.tree.map(lambda _: sharding.replicated(mesh), null)),
    )
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
