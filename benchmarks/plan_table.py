"""Which layout of the full-size KOALA step fits which accelerator: docs/scaling.md's table, from the planner.

    nice -n 19 python benchmarks/plan_table.py                   # ~1 hour of CPU on the 2-core machine
    nice -n 19 python benchmarks/plan_table.py --verify all      # every setup searched (hours)
    python benchmarks/plan_table.py --report                     # the markdown table of the JSON written

For each setup (student, teacher, resolution) the step is compiled for `--devices` fake CPU devices with fsdp
over all of them (the most memory-saving mesh of that many devices) from abstract inputs, with the most
memory-saving remat (`resnet+attention_block`), as `train.py --config.plan.hbm_gib=...` compiles it.
Verified setups (`--verify`, default the KOALA-700M 1024 px one) run `koala_jax.train.plan.search` for every
accelerator memory: the largest per-device batch, backed by a compile of it that fits and of the next that
does not; one planner serves every budget, so no layout is compiled twice, and one more compile gives
train.py's default remat at the 80 GB batch. The other setups are predicted from two compiles (batch 1 and 2)
on the line memory follows in the batch; the verified setup shows how far that prediction is from the search.
Budgets are 90% of the nominal HBM (runtime reservations, fragmentation, and the distance between this CPU
estimate and the accelerator's own compile).

Settings are train.py's defaults (base_config) with the shipped configs' student and resolution: SDXL-Base
teacher architecture in bf16, fp32 student params and AdamW moments, no EMA, bf16 compute, self-attention
feature KD, `attention_impl='auto'` (which is `chunked` on CPU: like cuDNN's and the TPU kernels, no score
matrices). Writes benchmarks/results/plan_table.json after every compile; a rerun reuses the compiles saved.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import time
from pathlib import Path

from koala_jax.files import write_json

RESULTS = Path(__file__).resolve().parent / "results" / "plan_table.json"
GB = 10**9
HEADROOM = 0.9  # the share of an accelerator's HBM that a step may plan for
# LLVM's optimisations off: XLA's buffer assignment and cost analysis come before them, so every byte and FLOP
# is the same (checked on a small step: identical memory and cost analyses), and compiles take less time.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
# The remat the batch is searched with: koala_jax.train.plan.REMAT_LADDER's most memory-saving rung (the cheaper
# rungs fit at the largest batch only when remat saves little: one compile at 80 GB shows train.py's default).
SAVING = ("resnet", "attention_block")
DEFAULT_REMAT = ("resnet", "transformer_block")
# (name, nominal HBM in GB): docs/scaling.md's rows; equal budgets share one search.
ACCELERATORS = (
    ("TPU v5e", 16),
    ("TPU v4 / v6e", 32),
    ("A100 40GB", 40),
    ("H100 / A100 80GB", 80),
    ("TPU v5p", 95),
)


@dataclasses.dataclass(frozen=True)
class Setup:
    label: str
    student: str
    teacher: str  # the planned teacher architecture (a random: source: no weights are read)
    latent_size: int  # 1024 px = 128, 512 px = 64

    @property
    def resolution(self) -> int:
        return self.latent_size * 8


SETUPS = {
    "700m-1024": Setup("KOALA-700M, SDXL-Base, 1024 px", "koala-700m", "random:sdxl-base", 128),
    "1b-1024": Setup("KOALA-1B, SDXL-Base, 1024 px", "koala-1b", "random:sdxl-base", 128),
    # SDXL-Turbo's U-Net has SDXL-Base's architecture: only the resolution changes.
    "700m-turbo-512": Setup("KOALA-700M, SDXL-Turbo, 512 px", "koala-700m", "random:sdxl-base", 64),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--setups", default=",".join(SETUPS), help=f"comma-separated, of {', '.join(SETUPS)}")
    p.add_argument("--devices", type=int, default=8, help="fake CPU devices, all in fsdp")
    p.add_argument("--verify", default="700m-1024", help="setups searched for every budget ('all': every one)")
    p.add_argument("--gb", default=",".join(str(gb) for _, gb in ACCELERATORS), help="HBM sizes to plan for, GB")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--report", action="store_true", help="print the markdown table of --out and stop")
    return p.parse_args(argv)


def load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def run_setup(name: str, setup: Setup, budgets_gb: list[int], args: argparse.Namespace, results: dict) -> None:
    """Search (verified setups) or predict every budget of one setup with one planner, saving after each
    compile and reusing the compiles a previous run saved."""
    import jax

    from koala_jax.train.config import base_config
    from koala_jax.train.plan import Measurement, Planner, affine_guess, describe, search

    cfg = base_config()
    cfg.teacher.source = setup.teacher
    cfg.student.variant = setup.student
    cfg.data.synthetic.latent_size = setup.latent_size
    cfg.data.synthetic.text_len = 77
    entry = results.setdefault("setups", {}).setdefault(name, {})
    saved = entry.get("tried", [])
    entry.update(dataclasses.asdict(setup), resolution=setup.resolution, searches={}, predictions={})
    tried = entry["tried"] = []

    def log(line: str) -> None:
        print(line, flush=True)
        tried[:] = [m.row() for m in planner.tried]
        write_json(args.out, results)

    planner = Planner(describe(cfg), jax.devices()[: args.devices], log)
    for row in saved:  # a previous run's compiles
        m = Measurement(
            row["fsdp"],
            row["data"],
            row["batch_per_device"],
            tuple(row["remat"].split("+")) if row["remat"] != "none" else (),
            row["grad_accum"],
            row["per_device_bytes"],
            row["flops_per_device"],
            row["compile_s"],
            {},
        )
        planner.measured[(m.fsdp, m.remat, m.batch_per_device)] = m
        planner.tried.append(m)
    n = args.devices
    line = {b: planner.measure(n, SAVING, b).total for b in (1, 2)}
    for gb in sorted(budgets_gb, reverse=True):  # large budgets first: their brackets narrow the small ones'
        budget = int(gb * GB * HEADROOM)
        guess = affine_guess(line, (1, 2), budget)
        entry["predictions"][str(gb)] = {"budget_bytes": budget, "batch_per_device": max(guess or 0, 0)}
        if args.verify == "all" or name in args.verify.split(","):
            print(f"{name}: {gb} GB x {HEADROOM} = {budget / 2**30:.1f} GiB per device", flush=True)
            start = time.perf_counter()
            found = search(planner, budget, fsdp_degrees=(n,), ladder=(SAVING,))
            entry["searches"][str(gb)] = {**found.json(), "seconds": round(time.perf_counter() - start)}
        write_json(args.out, results)
    at_80 = entry["searches"].get("80", {}).get("choice")
    if at_80:  # what train.py's default remat needs at that batch
        planner.measure(n, DEFAULT_REMAT, at_80["batch_per_device"])
        write_json(args.out, results)


def gib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**30:.1f}"


def report(results: dict) -> str:
    """The markdown table: per setup and accelerator, the batch found (compiled) or predicted, the remat, and
    the estimated bytes per device."""
    lines = [
        "| setup | accelerator (HBM) | budget GiB | fsdp | batch / device | how | est. GiB / device "
        "| of which temporaries | next batch GiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for entry in results.get("setups", {}).values():
        tried = {
            (r["remat"], r["batch_per_device"]): r for r in entry.get("tried", []) if r["fsdp"] == results["devices"]
        }
        remat = results["remat"]
        one, two = tried.get((remat, 1)), tried.get((remat, 2))
        for accelerator, gb in ACCELERATORS:
            found, predicted = entry["searches"].get(str(gb)), entry["predictions"].get(str(gb))
            if predicted is None:
                continue
            budget = gib(predicted["budget_bytes"])
            head = f"| {entry['label']} | {accelerator} ({gb} GB) | {budget} | {results['devices']} |"
            if found:
                batch, how = (found["choice"] or {}).get("batch_per_device", 0), "compiled: fits, next does not"
                how += f" (line: {predicted['batch_per_device']})"
            else:
                batch, how = predicted["batch_per_device"], "predicted: line through batch 1 and 2"
            if batch == 0:
                lines.append(
                    f"{head} does not fit: batch 1 needs {gib(one['per_device_bytes']['total'])} | - | - | - | - |"
                )
                continue
            row, above = tried.get((remat, batch)), tried.get((remat, batch + 1))
            if row:
                total, temp = row["per_device_bytes"]["total"], row["per_device_bytes"]["activations"]
            else:  # on the line through batch 1 and 2
                step = {k: two["per_device_bytes"][k] - one["per_device_bytes"][k] for k in ("total", "activations")}
                total = one["per_device_bytes"]["total"] + (batch - 1) * step["total"]
                temp = one["per_device_bytes"]["activations"] + (batch - 1) * step["activations"]
            next_total = gib(above["per_device_bytes"]["total"]) if above else "-"
            lines.append(f"{head} {batch} | {how} | {gib(total)} | {gib(temp)} | {next_total} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.report:
        print(report(load(args.out)))
        return
    flags = f"--xla_force_host_platform_device_count={args.devices} {FAST_COMPILE}"
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip()  # before jax starts
    import jax

    results = load(args.out)
    results.update(
        date=datetime.date.today().isoformat(),
        machine=f"{platform.machine()}, {os.cpu_count()} CPUs",
        jax=jax.__version__,
        devices=args.devices,
        headroom=HEADROOM,
        remat="+".join(SAVING),
        xla_flags=os.environ["XLA_FLAGS"],
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    budgets = [int(gb) for gb in args.gb.split(",")]
    for name in args.setups.split(","):
        run_setup(name, SETUPS[name], budgets, args, results)
    print(report(results))


if __name__ == "__main__":
    main()
