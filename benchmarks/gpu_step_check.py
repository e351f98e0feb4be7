"""Plan the full-size step on one GPU, then run it, and put the measured peak memory beside the plan.

    python benchmarks/gpu_step_check.py --out results/                   # KOALA-700M <- SDXL-Base, 1024 px
    python benchmarks/gpu_step_check.py --variant koala-1b --out results/
    python benchmarks/gpu_step_check.py --batch 4 --remat resnet+transformer_block --out results/
    python benchmarks/gpu_step_check.py --smoke --out /tmp/check         # CPU: tiny teacher, checks the script

The layout (per-device batch, remat) is, unless given, the one benchmarks/plan_table.py found for an 80 GB
accelerator on CPU devices (benchmarks/results/plan_table.json). The script compiles that layout on the GPU
with the planner (`koala_jax.train.plan.compile_layout`: XLA:GPU's own memory analysis this time), fills the
state, the teacher and a batch with random values on the device (no weights read, no data pipeline), runs
`--steps` training steps with the compiled step, and writes, to <out>/gpu_step_check.json: the CPU plan's
bytes, the GPU compile's bytes, and the allocator's measured peak (`device.memory_stats()['peak_bytes_in_use']`)
with step times. XLA_PYTHON_CLIENT_MEM_FRACTION defaults to 0.95 here, so a plan for 80 GB is not refused by
JAX's default 75% pool.

Imports only jax, flax, optax, numpy, ml_collections and koala_jax's models/students/weights/train (not grain,
tensorflow-datasets, diffusers or tensorboardX). On the project's device tool (which has jax, flax, optax,
orbax, transformers and torch, but not ml_collections) carry ml_collections, a pure-Python package:

    run(command="mkdir -p /tmp/deps && cp -r .venv/lib/python3.11/site-packages/ml_collections /tmp/deps/ && "
                "PYTHONPATH=/tmp/deps:. python benchmarks/gpu_step_check.py --out $OUT",
        carry=[".venv/lib/python3.11/site-packages/ml_collections"], timeout_s=540)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")  # before jax starts

import jax  # noqa: E402

from koala_jax.files import write_json  # noqa: E402
from koala_jax.train.config import base_config  # noqa: E402
from koala_jax.train.plan import GIB, compile_layout, describe, remat_name  # noqa: E402
from koala_jax.train.state import init_state, make_optimizer  # noqa: E402
from koala_jax.train.step_builder import SDXL_VAE_FACTOR, random_inputs  # noqa: E402

PLAN_TABLE = Path(__file__).resolve().parent / "results" / "plan_table.json"
PLANNED_GB = 80  # the plan_table.json search this script checks (H100 / A100 80GB)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", default="koala-700m", choices=("koala-700m", "koala-1b"))
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--batch", type=int, default=0, help="per-device batch (0: plan_table.json's, else 1)")
    p.add_argument("--remat", default="", help="e.g. resnet+transformer_block, none (empty: plan_table.json's)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--smoke", action="store_true", help="tiny teacher at 128 px: a check of this script on CPU")
    p.add_argument("--out", type=Path, required=True)
    return p.parse_args(argv)


def cpu_plan(variant: str, resolution: int) -> dict | None:
    """plan_table.json's choice for an 80 GB device for this setup, with the CPU-estimated bytes."""
    if not PLAN_TABLE.exists():
        return None
    for entry in json.loads(PLAN_TABLE.read_text()).get("setups", {}).values():
        if entry["student"] == variant and entry["resolution"] == resolution:
            return entry.get("searches", {}).get(str(PLANNED_GB), {}).get("choice")
    return None


def config(args: argparse.Namespace, remat: tuple[str, ...]):
    cfg = base_config()  # train.py's defaults: bf16 teacher, fp32 student, bf16 compute, attn1 feature KD, no EMA
    cfg.teacher.source = "random:tiny-sdxl" if args.smoke else "random:sdxl-base"
    cfg.student.variant = args.variant
    cfg.data.synthetic.latent_size = args.resolution // SDXL_VAE_FACTOR
    cfg.data.synthetic.text_len = 8 if args.smoke else 77
    cfg.compute.remat = remat
    return cfg


def memory_stats(device) -> dict:
    stats = device.memory_stats() or {}
    return {k: stats[k] for k in ("peak_bytes_in_use", "bytes_in_use", "bytes_limit") if k in stats}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.smoke:
        args.resolution = 128
    planned = None if args.smoke else cpu_plan(args.variant, args.resolution)
    batch = args.batch or (planned["batch_per_device"] if planned else 1)
    remat_text = args.remat or (planned["remat"] if planned else "resnet+transformer_block")
    remat = () if remat_text == "none" else tuple(remat_text.split("+"))
    cfg = config(args, remat)
    device = jax.devices()[0]
    print(f"{args.variant} at {args.resolution} px, batch {batch}, remat {remat_name(remat)} on {device.device_kind}")

    measurement, inputs, compiled = compile_layout(describe(cfg), [device], 1, batch, remat)
    print(f"compiled in {measurement.compile_s:.0f} s: {measurement.total / GIB:.2f} GiB planned by XLA", flush=True)
    state_abstract, teacher_abstract, batch_abstract, null_abstract = inputs
    params = random_inputs(state_abstract.params, 0)
    state = jax.jit(
        lambda p: init_state(p, make_optimizer(cfg.optim, cfg.total_steps), cfg.seed, cfg.ema.decay is not None),
        out_shardings=jax.tree.map(lambda x: x.sharding, state_abstract),
    )(params)
    teacher = random_inputs(teacher_abstract, 1)
    batch_arrays, null = random_inputs(batch_abstract, 2), random_inputs(null_abstract, 3)
    del params
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        state, metrics = compiled(state, teacher, batch_arrays, null)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    measured = memory_stats(device)
    result = {
        "date": datetime.date.today().isoformat(),
        "device": device.device_kind,
        "jax": jax.__version__,
        "variant": args.variant,
        "resolution": args.resolution,
        "batch_per_device": batch,
        "remat": remat_name(remat),
        "cpu_plan": planned,
        "gpu_plan": measurement.row(),
        "measured": measured,
        "step_s": times,
        "loss": float(metrics["total"]),
        "finite": bool(metrics["finite"]),
    }
    if measured.get("peak_bytes_in_use"):
        peak = measured["peak_bytes_in_use"]
        result["peak_over_gpu_plan"] = peak / measurement.total
        if planned:
            result["peak_over_cpu_plan"] = peak / planned["per_device_bytes"]["total"]
        print(f"measured peak {peak / GIB:.2f} GiB ({result['peak_over_gpu_plan']:.2f} x the GPU plan)")
    print(f"step times (s): {', '.join(f'{t:.2f}' for t in times)}; loss {result['loss']:.4f}")
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "gpu_step_check.json", result)


if __name__ == "__main__":
    main()
