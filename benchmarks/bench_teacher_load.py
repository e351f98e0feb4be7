"""Host memory of loading the teacher and student, as train.py does, in 1 process vs N processes.

    python benchmarks/bench_teacher_load.py                     # 1 x 4 devices vs 4 processes x 1 device
    python benchmarks/bench_teacher_load.py --processes 1,2,4 --devices 4

A mid-size random SDXL-shaped teacher (SDXL's layout at 2/5 of its widths: 128-512 channels, depths 1/2/10,
~0.4B parameters, float32 like SDXL's own diffusion_pytorch_model.safetensors) is written once as a diffusers
U-Net folder. Each run starts its processes (jax.distributed over gloo when there are several), builds one
(data=1, fsdp=devices) mesh over all of their devices, and loads as `loop.train` does: `setup.load_models`
(the memory-mapped teacher, the KOALA-700M student derived from it) then `setup.place` of the student (fp32)
and of the teacher (cast to bf16). Each process reports its peak resident set (VmHWM: anonymous memory plus
the pages of the memory-mapped file it touched), the bytes it read with read() calls, what it holds on its
devices, and the time; a host that holds 1/N of the shards should read about 1/N of the file (pages touched
plus bytes read). Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from koala_jax.files import write_json

RESULTS = Path(__file__).resolve().parent / "results" / "bench_teacher_load.json"
MiB = 2**20


def mid_teacher_config():
    from koala_jax.students.presets import SDXL_BASE

    return dataclasses.replace(
        SDXL_BASE,
        block_out_channels=(128, 256, 512),
        num_attention_heads=(2, 4, 8),
        cross_attention_dim=(1024, 1024, 1024),
        projection_class_embeddings_input_dim=512 + 6 * 256,
    )


def write_teacher(folder: Path) -> int:
    """The random mid-size teacher as a diffusers U-Net folder (once); returns its weights file's size."""
    from koala_jax.models import random_params
    from koala_jax.weights.diffusers_dir import WEIGHTS_NAME
    from koala_jax.weights.export import write_unet_folder

    weights = folder / WEIGHTS_NAME
    if not weights.exists():
        config = mid_teacher_config()
        print(f"writing a random teacher to {folder}", flush=True)
        write_unet_folder(folder, config, random_params(config, seed=0), "float32")
    return weights.stat().st_size


def read_bytes() -> int:
    """Bytes this process has read with read() calls (/proc/self/io rchar; page faults on a map are not in it)."""
    return next(
        int(line.split()[1]) for line in Path("/proc/self/io").read_text().splitlines() if line.startswith("rchar")
    )


def status_kib(field: str) -> int:
    """A line of /proc/self/status in KiB (VmHWM: peak resident set; RssAnon, RssFile: resident now)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def worker(args: argparse.Namespace) -> None:
    """One process of a run: load as train.py does and print one JSON line."""
    import jax
    import ml_collections
    import numpy as np

    from koala_jax.dtypes import dtype
    from koala_jax.train import sharding
    from koala_jax.train.config import base_config
    from koala_jax.train.setup import load_models, place, setup_distributed

    cfg = base_config()
    cfg.teacher.source = str(args.teacher)
    cfg.distributed = ml_collections.ConfigDict(
        {"auto": False, "coordinator": args.coordinator, "num_processes": args.num_processes, "process_id": args.id}
    )
    setup_distributed(cfg.distributed)
    mesh = sharding.make_mesh(1, -1)
    baseline, read_before = status_kib("VmHWM"), read_bytes()
    start = time.perf_counter()
    # As loop.train loads a fresh run: the student's params, then the teacher's cast to teacher.param_dtype.
    _, teacher_host, built = load_models(cfg.teacher, cfg.student, cfg.seed)
    student = place(built.params, sharding.tree_shardings(built.params, mesh), check=cfg.teacher.source)
    teacher = place(
        teacher_host,
        sharding.tree_shardings(teacher_host, mesh),
        dtype(cfg.teacher.param_dtype),
        check=cfg.teacher.source,
    )
    jax.block_until_ready((student, teacher))
    seconds = time.perf_counter() - start
    held = sum(s.data.nbytes for x in jax.tree.leaves((student, teacher)) for s in x.addressable_shards)
    local = {
        "process": args.id,
        "devices": jax.local_device_count(),
        "peak_rss_mib": status_kib("VmHWM") / 1024,
        "baseline_rss_mib": baseline / 1024,
        "rss_file_mib": status_kib("RssFile") / 1024,
        "rss_anon_mib": status_kib("RssAnon") / 1024,
        "read_mib": (read_bytes() - read_before) / MiB,
        "device_mib": held / MiB,
        "seconds": seconds,
        "global_devices": jax.device_count(),
        "teacher_shards": int(np.prod(mesh.devices.shape)),
    }
    print("RESULT " + json.dumps(local), flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def run(teacher: Path, processes: int, devices: int) -> list[dict]:
    """`devices` devices in all, split over `processes` processes; one result per process."""
    if devices % processes:
        raise SystemExit(f"--devices {devices} does not split over {processes} processes")
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices // processes}"}
    address = f"localhost:{free_port()}" if processes > 1 else ""
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--worker", "--teacher", str(teacher), "--coordinator", address]
            + ["--num-processes", str(processes), "--id", str(i)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(processes)
    ]
    rows = []
    for proc in procs:
        out, _ = proc.communicate(timeout=1800)
        if proc.returncode:
            raise SystemExit(f"worker failed:\n{out[-3000:]}")
        rows.append(json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:]))
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--processes", default="1,4", help="process counts to compare, comma-separated")
    p.add_argument("--devices", type=int, default=4, help="devices in all (fsdp over all of them)")
    p.add_argument("--folder", type=Path, default=Path(tempfile.gettempdir()) / "koala_bench_mid_teacher")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--label", default="", help="a note stored with the results (e.g. the code version)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--teacher", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--coordinator", default="", help=argparse.SUPPRESS)
    p.add_argument("--num-processes", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--id", type=int, default=0, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return
    file_size = write_teacher(args.folder)
    runs = []
    for processes in (int(n) for n in args.processes.split(",")):
        rows = run(args.folder, processes, args.devices)
        runs.append({"processes": processes, "devices": args.devices, "per_process": rows})
    print(f"teacher file {file_size / MiB:.0f} MiB (float32); fsdp over {args.devices} devices")
    columns = ("processes", 9), ("peak RSS MiB", 13), ("- baseline", 11), ("file pages", 11), ("read", 7)
    print(" ".join(f"{name:>{width}}" for name, width in (*columns, ("on devices", 11), ("s", 6))))
    for r in runs:
        worst = max(r["per_process"], key=lambda row: row["peak_rss_mib"])
        print(
            f"{r['processes']:>9} {worst['peak_rss_mib']:>13.0f} "
            f"{worst['peak_rss_mib'] - worst['baseline_rss_mib']:>11.0f} {worst['rss_file_mib']:>11.0f} "
            f"{worst.get('read_mib', 0):>7.0f} "
            f"{worst['device_mib']:>11.0f} {worst['seconds']:>6.1f}"
        )
    result = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "label": args.label,
        "teacher_file_mib": file_size / MiB,
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(args.out.read_text()) if args.out.exists() else {"results": []}
    previous["results"] = [r for r in previous["results"] if r["label"] != args.label] + [result]
    write_json(args.out, previous)


if __name__ == "__main__":
    main()
