"""Time and peak memory of convert_weights.py on a full-size (2.6B-parameter) random SDXL U-Net, on CPU.

    python benchmarks/bench_convert.py                   # fp32 teacher file (~10 GB on disk)
    python benchmarks/bench_convert.py --dtype fp16      # half the disk and I/O
    python benchmarks/bench_convert.py --workdir /big/disk --keep

Writes a diffusers U-Net folder with random weights (SDXL-Base's exact keys and shapes, from
`abstract_params(preset("sdxl-base"))` named through `flax_to_torch`), then runs each command of
convert_weights.py in its own process and reads that process's peak RSS with os.wait4. "One copy"
is the size of the weights in the dtype a step holds them. Prints a table and writes JSON.

The random values are windows into one shared random pool (offsets drawn per tensor), so generating
10 GB needs ~256 MB of memory; for timing and memory that is as good as independent noise.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from koala_jax.dtypes import dtype
from koala_jax.files import write_json
from koala_jax.models import abstract_params
from koala_jax.students.presets import preset
from koala_jax.weights.diffusers_dir import CONFIG_NAME, WEIGHTS_NAME
from koala_jax.weights.safetensors import save_file
from koala_jax.weights.state_dict import flax_to_torch

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = ROOT / "benchmarks" / "results" / "bench_convert.json"
GIB = 2**30


def torch_shapes(config) -> dict[str, tuple[int, ...]]:
    """diffusers key -> PyTorch-layout shape of every parameter, named by flax_to_torch itself (fed a
    zero-strided placeholder per leaf, so only one tensor's worth of zeros exists at a time)."""
    shapes = {}
    for path, leaf in flatten_dict(abstract_params(config)).items():
        placeholder = np.broadcast_to(np.float32(0), leaf.shape)
        shapes.update({k: v.shape for k, v in flax_to_torch(unflatten_dict({path: placeholder})).items()})
    return shapes


def write_random_unet(folder: Path, dtype: np.dtype, seed: int = 0) -> int:
    """A diffusers U-Net folder of random SDXL-Base weights; returns the file size in bytes."""
    config = preset("sdxl-base")
    shapes = torch_shapes(config)
    rng = np.random.default_rng(seed)
    pool = (0.02 * rng.standard_normal(64 * 2**20, dtype=np.float32)).astype(dtype)
    tensors = {}
    for key, shape in shapes.items():
        n = math.prod(shape)
        start = int(rng.integers(0, pool.size - n + 1))
        tensors[key] = pool[start : start + n].reshape(shape)
    folder.mkdir(parents=True)
    (folder / CONFIG_NAME).write_text(json.dumps(config.to_diffusers(), indent=2))
    save_file(tensors, folder / WEIGHTS_NAME, metadata={"format": "pt"})
    return (folder / WEIGHTS_NAME).stat().st_size


def run_step(argv: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS in GiB) of `python convert_weights.py *argv` in a fresh process."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "convert_weights.py"), *argv],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"convert_weights.py {' '.join(argv)} failed:\n{proc.stderr.read().decode()[-3000:]}")
    proc.stderr.close()
    return seconds, usage.ru_maxrss * 1024 / GIB


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def bench(work: Path, dtype_name: str) -> list[dict[str, Any]]:
    n_teacher = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_params(preset("sdxl-base"))))
    n_student = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_params(preset("koala-700m"))))
    start = time.perf_counter()
    size = write_random_unet(work / "teacher", dtype(dtype_name))
    rows = [
        {
            "step": f"generate random SDXL U-Net ({dtype_name})",
            "seconds": round(time.perf_counter() - start, 1),
            "peak_rss_gib": None,
            "one_copy_gib": round(size / GIB, 2),
            "output_gib": round(size / GIB, 2),
        }
    ]
    steps = [
        ("to-jax fp32", ["to-jax", "--src", work / "teacher", "--out", work / "jax32"], n_teacher * 4, "jax32"),
        (
            "to-jax bf16",
            ["to-jax", "--src", work / "teacher", "--out", work / "jax16", "--dtype", "bf16"],
            n_teacher * 2,
            "jax16",
        ),
        (
            "student koala-700m (JAX fp32)",
            ["student", "--teacher", work / "teacher", "--variant", "koala-700m", "--out", work / "student"],
            n_student * 4,
            "student",
        ),
        (
            "to-diffusers fp32 JAX -> fp16",
            ["to-diffusers", "--checkpoint", work / "jax32", "--out", work / "export", "--dtype", "fp16"],
            n_teacher * 4,
            "export",
        ),
        ("info sdxl-base", ["info", "sdxl-base"], 0, None),
    ]
    for name, argv, one_copy, out in steps:
        seconds, peak = run_step([str(a) for a in argv])
        rows.append(
            {
                "step": name,
                "seconds": round(seconds, 1),
                "peak_rss_gib": round(peak, 2),
                "one_copy_gib": round(one_copy / GIB, 2),
                "output_gib": round(folder_size(work / out) / GIB, 2) if out else None,
            }
        )
        print(f"  {name}: {seconds:.1f} s, peak RSS {peak:.2f} GiB", flush=True)
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"{'step':<38} {'seconds':>8} {'peak RSS GiB':>13} {'one copy GiB':>13} {'output GiB':>11}")
    for r in rows:
        cells = [r["seconds"], r["peak_rss_gib"], r["one_copy_gib"], r["output_gib"]]
        print(f"{r['step']:<38} " + " ".join(f"{'-' if c is None else c:>{w}}" for c, w in zip(cells, (8, 13, 13, 11))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32", help="dtype of the random teacher file")
    parser.add_argument("--workdir", help="where the ~30 GB of outputs go (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the outputs")
    parser.add_argument("--output", default=str(DEFAULT_OUTPUT), help="JSON results file")
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_convert_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        rows = bench(work, args.dtype)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print_table(rows)
    result = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / GIB:.0f} GiB RAM",
        "args": vars(args),
        "results": rows,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    write_json(args.output, result)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
