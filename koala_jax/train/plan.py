"""Will the step fit? Compile it, from abstract inputs, for any mesh, and read what XLA says.

`python train.py --config <cfg> --config.plan.enabled=True` builds the training step exactly as `loop.train` does, but
from `jax.ShapeDtypeStruct`s with shardings instead of arrays (no weights read, no device memory taken), lowers
and compiles it for the configured mesh (real devices, or N fake CPU devices with
XLA_FLAGS=--xla_force_host_platform_device_count=N), and reports per device the bytes of parameters, optimizer
state, EMA, teacher, batch and XLA's temporaries (`compiled.memory_analysis()`), the step's FLOPs
(`compiled.cost_analysis()`) and how the arrays are sharded; it writes `<workdir>/plan.json` and trains nothing.

`--config.plan.hbm_gib=16` searches instead: for every fsdp degree that divides the device count, the largest
per-device batch that fits 16 GiB per device, then the cheapest remat (`REMAT_LADDER`) that fits that batch.

What the numbers are worth (docs/scaling.md): a compile for CPU devices estimates an accelerator's memory, it
does not measure it; XLA:CPU fuses and schedules differently from XLA:GPU/TPU, and `attention_impl='auto'`
picks a different kernel per backend (chunked on CPU, cuDNN on GPU, splash on TPU).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from koala_jax.errors import ConfigError, DataError, MissingPathError
from koala_jax.files import write_json
from koala_jax.students.presets import PRESET_NAMES
from koala_jax.train import sharding
from koala_jax.train.metrics import compiled_flops
from koala_jax.train.setup import describe_models, setup_distributed
from koala_jax.train.step_builder import DataShape, Models, StepInputs, build_step, data_shape
from koala_jax.weights.sources import RANDOM_PREFIX

PLAN_FILE = "plan.json"
GIB = 2**30
# Remat choices, cheapest first (the least recomputation, the most memory) to the most memory-saving:
# - nothing recomputed;
# - transformer blocks (attention and feed-forward: most of the U-Net's FLOPs and of its activations);
# - resnets too (train.py's default): only block inputs are kept, the whole forward is recomputed once;
# - whole attention blocks (Transformer2DModel: proj_in, every transformer block, proj_out) and resnets: only
#   their inputs are kept, so a depth-10 stage keeps one activation instead of ten; its inner blocks are then
#   recomputed whole during the backward pass, which holds one stage's activations at a time.
# The same forward is recomputed by the last three; what they trade is how much is kept between passes.
REMAT_LADDER: tuple[tuple[str, ...], ...] = (
    (),
    ("transformer_block",),
    ("resnet", "transformer_block"),
    ("resnet", "attention_block"),
)
MAX_BATCH_PER_DEVICE = 4096  # where the search stops doubling
ESTIMATE_NOTE = (
    "XLA's memory analysis of the step compiled for these devices (nothing allocated); on CPU devices an "
    "estimate of an accelerator's, as XLA:CPU fuses and schedules differently from XLA:GPU/TPU (docs/scaling.md)"
)


@dataclasses.dataclass(frozen=True)
class Problem:
    """What is planned, everything but the layout (batch per device, fsdp degree, remat)."""

    cfg: ml_collections.ConfigDict
    models: Models
    data: DataShape


@dataclasses.dataclass(frozen=True)
class Measurement:
    """One compiled layout: bytes per device by kind, FLOPs and how the arrays are sharded."""

    fsdp: int
    data: int
    batch_per_device: int
    remat: tuple[str, ...]
    grad_accum: int
    bytes: dict[str, int]
    flops_per_device: float | None
    compile_s: float
    sharding: dict

    @property
    def total(self) -> int:
        return self.bytes["total"]

    def row(self) -> dict:
        devices = self.fsdp * self.data
        flops = self.flops_per_device * devices if self.flops_per_device else None
        return {
            "fsdp": self.fsdp,
            "data": self.data,
            "batch_per_device": self.batch_per_device,
            "global_batch": self.batch_per_device * devices,
            "grad_accum": self.grad_accum,
            "remat": remat_name(self.remat),
            "per_device_bytes": self.bytes,
            "flops_per_step": flops,
            "flops_per_device": self.flops_per_device,
            "compile_s": round(self.compile_s, 1),
        }


def remat_name(remat: Sequence[str]) -> str:
    return "+".join(remat) or "none"


# ---------------------------------------------------------------- what is planned (no weights read)


def plan_models(cfg: ml_collections.ConfigDict) -> Models:
    """The architectures from their sources' configs alone. The planner downloads nothing and reads no weights: a
    teacher source that is not here (weights not yet converted, a hub id) is planned with `plan.teacher`, the
    architecture a config names for that case (the shipped SDXL configs: random:sdxl-base), and says so."""
    source = cfg.teacher.source
    if source.startswith(RANDOM_PREFIX) or source in PRESET_NAMES or Path(source).exists():
        return describe_models(source, cfg.student.variant)
    if not cfg.plan.teacher:
        raise MissingPathError(
            f"teacher.source {source}: not here, and the planner reads no weights and downloads nothing; plan "
            f"with an architecture instead: --config.plan.teacher=random:sdxl-base (or a config.json)"
        )
    models = describe_models(cfg.plan.teacher, cfg.student.variant)
    return dataclasses.replace(models, note=f"{models.note} (plan.teacher; teacher.source {source} is not here)")


def describe(cfg: ml_collections.ConfigDict) -> Problem:
    """Models and data shapes of `cfg`, from configs and metadata only (`step_builder.data_shape`: the loop checks
    its records against the same)."""
    models = plan_models(cfg)
    return Problem(cfg, models, data_shape(cfg.data, models.teacher, cfg.teacher.source))


# ---------------------------------------------------------------- one layout, compiled


def device_bytes(tree) -> int:
    """Bytes of `tree` on each device (the fsdp rule and the batch split give every device equal shards)."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def path_name(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def sharding_summary(tree) -> dict:
    """How the arrays of `tree` are laid out: the share of their bytes sharded over 'fsdp', bytes per partition
    spec, and the largest replicated arrays."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    total = sharded = 0
    specs: dict[str, dict[str, int]] = {}
    replicated = []
    for path, x in leaves:
        nbytes = math.prod(x.shape) * np.dtype(x.dtype).itemsize
        spec = str(x.sharding.spec)
        entry = specs.setdefault(spec, {"arrays": 0, "bytes": 0})
        entry["arrays"] += 1
        entry["bytes"] += nbytes
        total += nbytes
        if "fsdp" in jax.tree.leaves(tuple(x.sharding.spec)):
            sharded += nbytes
        else:
            replicated.append((nbytes, path_name(path)))
    largest = [{"array": name, "bytes": n} for n, name in sorted(replicated, reverse=True)[:3]]
    return {
        "arrays": len(leaves),
        "bytes": total,
        "fsdp_sharded_share": sharded / total if total else 0.0,
        "specs": specs,
        "largest_replicated": largest,
    }


def layout_config(cfg: ml_collections.ConfigDict, remat: Sequence[str], grad_accum: int) -> ml_collections.ConfigDict:
    out = copy.deepcopy(cfg)
    out.compute.remat = tuple(remat)
    out.optim.grad_accum = grad_accum
    return out


def compile_layout(
    problem: Problem,
    devices: Sequence,
    fsdp: int,
    batch_per_device: int,
    remat: Sequence[str],
    grad_accum: int = 1,
) -> tuple[Measurement, StepInputs, jax.stages.Compiled]:
    """Build the step of `problem` for one layout on `devices` as the training loop does, compile it from
    abstract inputs, and measure it; returns the measurement, the abstract inputs (state, teacher params,
    batch, null embeddings, with their shardings) and the compiled step, which runs on arrays like them."""
    cfg = layout_config(problem.cfg, remat, grad_accum)
    mesh = sharding.make_mesh(-1, fsdp, list(devices))
    step = build_step(cfg, problem.models, problem.data, mesh, batch_per_device * len(devices))
    state, teacher_params, batch, null = inputs = step.inputs
    start = time.perf_counter()
    compiled = step.compile()
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    outputs = memory.output_size_in_bytes - memory.alias_size_in_bytes  # the donated state is updated in place
    by_kind = {
        "params": device_bytes(state.params),
        "optimizer": device_bytes(state.opt_state),
        "ema": device_bytes(state.ema_params),
        "teacher": device_bytes(teacher_params),
        "batch": device_bytes(batch),
        "other": device_bytes((state.step, state.rng, null)),
        "arguments": memory.argument_size_in_bytes,
        "activations": memory.temp_size_in_bytes,
        "outputs": outputs,
        "code": memory.generated_code_size_in_bytes,
        "total": memory.argument_size_in_bytes + memory.temp_size_in_bytes + outputs,
    }
    groups = {
        "params": state.params,
        "optimizer": state.opt_state,
        "ema": state.ema_params,
        "teacher": teacher_params,
        "batch": batch,
    }
    summary = {name: sharding_summary(tree) for name, tree in groups.items() if jax.tree.leaves(tree)}
    measurement = Measurement(
        fsdp,
        len(devices) // fsdp,
        batch_per_device,
        tuple(remat),
        grad_accum,
        by_kind,
        flops_per_device(compiled, grad_accum),
        seconds,
        summary,
    )
    return measurement, inputs, compiled


def flops_per_device(compiled: jax.stages.Compiled, grad_accum: int) -> float | None:
    """FLOPs of one device's step: XLA's cost analysis of the per-device program, whose loops it counts once, so
    the accumulation loop's body is counted grad_accum times here (loops inside the model, such as `chunked`
    attention's blocks, stay counted once: docs/scaling.md)."""
    flops = compiled_flops(compiled)
    return flops * grad_accum if flops else None


class Planner:
    """Compiles layouts of one problem on one set of devices, each at most once (searches for several budgets
    share what was compiled), and keeps the rows it tried in order."""

    def __init__(self, problem: Problem, devices: Sequence, log: Callable[[str], None] = print):
        self.problem, self.devices, self.log = problem, list(devices), log
        self.measured: dict[tuple, Measurement] = {}
        self.tried: list[Measurement] = []

    def measure(self, fsdp: int, remat: Sequence[str], batch_per_device: int) -> Measurement:
        key = (fsdp, tuple(remat), batch_per_device)
        if key not in self.measured:
            self.measured[key] = compile_layout(self.problem, self.devices, fsdp, batch_per_device, remat)[0]
            self.tried.append(self.measured[key])
            self.log(table_line(self.measured[key]))
        return self.measured[key]


# ---------------------------------------------------------------- the search


def largest_batch(
    total: Callable[[int], int], budget: int, known: dict[int, int] | None = None, limit: int = MAX_BATCH_PER_DEVICE
) -> int:
    """The largest b <= limit with total(b) <= budget (0 if b = 1 does not fit), for totals that grow with b;
    `known` holds totals already measured (another budget's search), which narrow the first bracket.

    Doubling finds a batch that does not fit, jumping further when the line through the two largest batches
    measured (memory is fixed bytes + bytes per sample) says so, so a near-affine total is bracketed in a step
    or two; inside the bracket, interpolation on that line (and a check of lo + 1 when the line says lo), with
    halving whenever a probe did not halve the bracket. Every answer b is backed by a compile of b that fits
    and one of b + 1 that does not (or b = limit).
    """
    seen = dict(known or {})

    def fits(b: int) -> bool:
        if b not in seen:
            seen[b] = total(b)
        return seen[b] <= budget

    if not fits(1):
        return 0
    lo = max(b for b, t in seen.items() if t <= budget)
    hi = min((b for b, t in seen.items() if t > budget and b > lo), default=None)
    width, crept = None, False  # the bracket's width before the last probe; whether that probe was lo + 1 and fit
    while (hi is None or hi - lo > 1) and lo < limit:
        if hi is None:
            guess = affine_guess(seen, sorted(seen)[-2:], budget)
            b = min(limit, max(2 * lo, 0 if guess is None else guess + 1))
        else:
            guess = affine_guess(seen, (lo, hi), budget)
            confirm = guess is not None and guess <= lo and not crept  # the line says lo: does lo + 1 fit?
            halved = width is None or 2 * (hi - lo) <= width
            b = lo + 1 if confirm else min(max(guess, lo + 1), hi - 1) if halved and guess else (lo + hi) // 2
            width = hi - lo
        fit = fits(b)
        crept = fit and b == lo + 1
        lo, hi = (b, hi) if fit else (lo, b)
    return lo


def affine_guess(seen: dict[int, int], points: Sequence[int], budget: int) -> int | None:
    """The largest batch within `budget` on the line through two measured (batch, bytes) points, if it rises."""
    if len(points) < 2:
        return None
    (b1, b2), (t1, t2) = points, (seen[points[0]], seen[points[1]])
    if t2 <= t1:
        return None
    return b1 + math.floor((budget - t1) * (b2 - b1) / (t2 - t1))


def cheapest_remat(fits: Callable[[tuple[str, ...]], bool], ladder: Sequence[tuple[str, ...]]) -> tuple[str, ...]:
    """The first remat of `ladder` that fits, given that the last one does (memory falls along the ladder):
    bisection, log2(len) compiles."""
    lo, hi = 0, len(ladder) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(ladder[mid]):
            hi = mid
        else:
            lo = mid + 1
    return ladder[hi]


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclasses.dataclass(frozen=True)
class SearchResult:
    budget: int
    fsdp_degrees: list[int]
    ladder: list[tuple[str, ...]]
    fits: list[Measurement]  # per fsdp degree that fits: its largest batch with the cheapest remat for it
    choice: Measurement | None
    compiles: int

    def json(self) -> dict:
        return {
            "budget_bytes": self.budget,
            "fsdp_degrees": self.fsdp_degrees,
            "remat_ladder": [remat_name(r) for r in self.ladder],
            "fits": [m.row() for m in self.fits],
            "choice": self.choice.row() if self.choice else None,
            "compiles": self.compiles,
        }


def search_degree(planner: Planner, fsdp: int, budget: int, ladder: Sequence[tuple[str, ...]]) -> Measurement | None:
    """The largest per-device batch that fits at one fsdp degree, with the cheapest remat that fits it."""
    saving = tuple(ladder[-1])
    known = {b: m.total for (f, r, b), m in planner.measured.items() if (f, r) == (fsdp, saving)}
    batch = largest_batch(lambda b: planner.measure(fsdp, saving, b).total, budget, known)
    if batch == 0:
        return None
    remat = cheapest_remat(lambda r: planner.measure(fsdp, r, batch).total <= budget, ladder)
    above = planner.measured.get((fsdp, saving, batch + 1))
    planner.log(
        f"fsdp={fsdp}: batch {batch} per device fits with remat {remat_name(remat)}"
        + (f"; batch {batch + 1} needs {above.total / GIB:.2f} GiB" if above else "")
    )
    return planner.measure(fsdp, remat, batch)


def search(
    planner: Planner,
    budget: int,
    fsdp_degrees: Sequence[int] | None = None,
    ladder: Sequence[tuple[str, ...]] = REMAT_LADDER,
) -> SearchResult:
    """For each fsdp degree (largest first): the largest per-device batch that fits `budget` bytes per device
    with the most memory-saving remat, then the cheapest remat that fits that batch. A degree whose batch 1
    does not fit ends the search (smaller degrees hold more per device). The choice: the largest batch, then
    the cheapest remat, then the smallest fsdp degree (the least communication)."""
    degrees = sorted(fsdp_degrees or divisors(len(planner.devices)), reverse=True)
    found = []
    for fsdp in degrees:
        best = search_degree(planner, fsdp, budget, ladder)
        if best is None:
            planner.log(f"fsdp={fsdp}: batch 1 does not fit with any remat; smaller fsdp degrees hold more")
            break
        found.append(best)
    rank = {tuple(r): i for i, r in enumerate(ladder)}
    choice = min(found, key=lambda m: (-m.batch_per_device, rank[m.remat], m.fsdp)) if found else None
    return SearchResult(budget, degrees, list(ladder), found, choice, len(planner.tried))


# ---------------------------------------------------------------- train.py --config.plan.enabled=True


def table_header() -> str:
    return f"{'fsdp':>4} {'data':>4} {'batch/dev':>9} {'remat':<26} {'total GiB':>9} {'temp GiB':>8} {'compile s':>9}"


def table_line(m: Measurement) -> str:
    return (
        f"{m.fsdp:>4} {m.data:>4} {m.batch_per_device:>9} {remat_name(m.remat):<26} "
        f"{m.total / GIB:>9.2f} {m.bytes['activations'] / GIB:>8.2f} {m.compile_s:>9.1f}"
    )


def describe_lines(problem: Problem, devices: Sequence) -> list[str]:
    cfg, data = problem.cfg, problem.data
    c, h, w = data.latent_shape
    return [
        f"plan: student {cfg.student.variant} of teacher {cfg.teacher.source}",
        f"  teacher architecture: {problem.models.note} (params {cfg.teacher.param_dtype})",
        f"  data: {data.note}: latents {c}x{h}x{w} ({data.pixels} px), {data.text_len} text tokens",
        f"  devices: {len(devices)} {devices[0].platform} ({devices[0].device_kind}) over {jax.process_count()} "
        f"process(es); compute {cfg.compute.dtype}, attention {cfg.compute.attention_impl}, "
        f"EMA {'on' if cfg.ema.decay is not None else 'off'}",
    ]


def human(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"


BYTES_ROWS = (
    ("params", "the student's fp32 master weights"),
    ("optimizer", "AdamW moments"),
    ("ema", "the student's EMA copy"),
    ("teacher", "frozen teacher weights"),
    ("batch", "latents and text embeddings"),
    ("other", "step, RNG, null embeddings"),
    ("activations", "XLA's temporaries: activations, gradients, gathered weights, update"),
    ("outputs", "outputs not donated"),
    ("total", "arguments + temporaries + outputs"),
)


def bytes_lines(m: Measurement) -> list[str]:
    layout = f"fsdp={m.fsdp} x data={m.data}, batch {m.batch_per_device} per device, remat {remat_name(m.remat)}"
    lines = [f"per device, {layout}:"]
    for key, what in BYTES_ROWS:
        share = m.sharding.get(key)
        sharded = f" ({100 * share['fsdp_sharded_share']:.1f}% of its bytes sharded over fsdp)" if share else ""
        lines.append(f"  {key:<12}{human(m.bytes[key]):>12}  {what}{sharded}")
    if m.flops_per_device:
        devices = m.fsdp * m.data
        lines.append(
            f"FLOPs per step {m.flops_per_device * devices:.4g} ({m.flops_per_device:.4g} per device, "
            f"{m.flops_per_device / m.batch_per_device:.4g} per sample); compiled in {m.compile_s:.0f} s"
        )
    return lines


def check_global_batch(batch: dict) -> str:
    """Every process builds its own rows (filled with its process index + 1) and assembles them into the global
    batch the compiled step takes, as the loader's batches are; checks shapes, shardings and the global sum."""
    from koala_jax.data import to_global_batch  # the loader's assembly (grain): only on multi-process plans

    mesh = jax.tree.leaves(batch)[0].sharding.mesh
    processes, me = jax.process_count(), jax.process_index()
    rows = batch["latents"].shape[0] // processes
    local = {k: np.full((rows, *x.shape[1:]), me + 1, np.float32) for k, x in batch.items()}
    built = to_global_batch(local, mesh, sharding.BATCH_AXES)
    for key, want in batch.items():
        got = built[key]
        if got.shape != want.shape or not got.sharding.is_equivalent_to(want.sharding, len(want.shape)):
            raise DataError(f"global {key} {got.shape} {got.sharding} is not the step's {want.shape} {want.sharding}")
    total = float(jax.jit(jnp.sum)(built["latents"]))
    expected = rows * math.prod(batch["latents"].shape[1:]) * processes * (processes + 1) / 2
    if not math.isclose(total, expected, rel_tol=1e-4):
        raise DataError(f"global batch sum {total} != {expected}")
    return f"global batch {batch['latents'].shape[0]} assembled from {processes} processes ({rows} rows each): ok"


def compile_configured(problem: Problem, devices: Sequence) -> tuple[Measurement, StepInputs, jax.stages.Compiled]:
    """The layout the config asks for: its mesh, remat, grad_accum and global batch."""
    cfg = problem.cfg
    fsdp = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, list(devices)).shape["fsdp"]
    global_batch, accum, n = cfg.data.global_batch_size, cfg.optim.grad_accum, len(devices)
    if global_batch % (n * accum):
        raise ConfigError(
            f"data.global_batch_size {global_batch} is not a multiple of devices x optim.grad_accum ({n} x {accum})"
        )
    return compile_layout(problem, devices, fsdp, global_batch // n, tuple(cfg.compute.remat), accum)


def plan(cfg: ml_collections.ConfigDict) -> dict:
    """`train.py --config.plan.enabled=True`: compile the configured step (or search, with `plan.hbm_gib`), print
    what it needs per device, write `<workdir>/plan.json` (process 0) and return its contents."""
    setup_distributed(cfg.distributed)
    problem = describe(cfg)
    devices = jax.devices()
    say = print if jax.process_index() == 0 else (lambda *_: None)
    say("\n".join(describe_lines(problem, devices)))
    result = {"mode": "search" if cfg.plan.hbm_gib else "plan", **problem_json(problem, devices)}
    if cfg.plan.hbm_gib:
        planner = Planner(problem, devices, say)
        say(f"search: {cfg.plan.hbm_gib:g} GiB per device, grad_accum 1 (compiles as it goes)\n{table_header()}")
        found = search(planner, int(cfg.plan.hbm_gib * GIB))
        result.update(search=found.json(), tried=[m.row() for m in planner.tried])
        if found.choice is None:
            say(f"nothing fits {cfg.plan.hbm_gib:g} GiB per device on {len(devices)} devices")
        else:
            result.update(layout_json(found.choice))
            say(f"choice after {found.compiles} compiles: " + "\n".join(bytes_lines(found.choice)))
    else:
        measurement, inputs, _ = compile_configured(problem, devices)
        result.update(layout_json(measurement))
        say("\n".join(bytes_lines(measurement)))
        if jax.process_count() > 1:
            result["global_batch_check"] = check_global_batch(inputs.batch)
            say(result["global_batch_check"])
    if jax.process_index() == 0:
        path = Path(cfg.workdir) / PLAN_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, result)
        say(f"written {path}; {ESTIMATE_NOTE}")
    return result


def problem_json(problem: Problem, devices: Sequence) -> dict:
    cfg = problem.cfg
    return {
        "teacher": {
            "source": cfg.teacher.source,
            "architecture": problem.models.note,
            "param_dtype": cfg.teacher.param_dtype,
        },
        "student": cfg.student.variant,
        "data": {
            "source": problem.data.note,
            "latent_shape": list(problem.data.latent_shape),
            "text_len": problem.data.text_len,
            "pixels": problem.data.pixels,
        },
        "devices": {
            "count": len(devices),
            "platform": devices[0].platform,
            "kind": devices[0].device_kind,
            "processes": jax.process_count(),
        },
        "compute": {
            "dtype": cfg.compute.dtype,
            "attention_impl": cfg.compute.attention_impl,
            "remat_policy": cfg.compute.remat_policy,
            "kd_features": list(cfg.kd.features) if cfg.kd.feat else [],
            "ema": cfg.ema.decay is not None,
        },
        "estimate": ESTIMATE_NOTE,
    }


def layout_json(m: Measurement) -> dict:
    return {**m.row(), "sharding": m.sharding}
