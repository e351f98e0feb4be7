"""Training-step throughput: the KOALA distillation step in JAX/Flax vs diffusers + PyTorch.

    python benchmarks/bench_train.py                   # on a GPU: SDXL-Base -> KOALA-700M and -1B, 1024 px
    python benchmarks/bench_train.py --variant koala-1b --batch 16 --remat none
    python benchmarks/bench_train.py --smoke           # tiny teacher on CPU: a check, not a number

One step is one optimizer update: the frozen teacher's forward pass (bf16 params) capturing its
self-attention (attn1) outputs, the student's forward and backward pass (fp32 params, bf16 compute)
under the KOALA loss (task + output KD + self-attention feature KD), global-norm clipping and AdamW.

JAX side: `koala_jax.train.step.train_step`, built exactly as train.py builds it (same models,
optimizer, noise schedule and loss weights from the base config). PyTorch side: the same step as
the KOALA paper's stack writes it: diffusers' UNet2DConditionModel (scaled_dot_product_attention
through AttnProcessor2_0), teacher in bf16 under no_grad with forward hooks on its attn1 modules,
student in fp32 under torch.autocast(bf16), torch.optim.AdamW; `--remat` maps to diffusers'
gradient checkpointing. Weights are random (no download); both sides see the same random batch.

MFU = FLOPs of the compiled JAX step (XLA cost analysis; with remat this includes the recomputed
forward) / step time / the measured bf16 matmul peak of the device. The PyTorch side is credited
with the same FLOP count, so the MFU ratio equals the throughput ratio. Warm-up steps (and
compilation) are excluded from the timings. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import os
import platform
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from koala_jax.files import write_json
from koala_jax.models import UNetConfig, param_count, random_params
from koala_jax.models.common import ATTENTION_IMPLS
from koala_jax.students.presets import STUDENT_VARIANTS, derive_student_config, preset
from koala_jax.train import sharding
from koala_jax.train.config import base_config
from koala_jax.train.metrics import compiled_flops, measure_peak_flops
from koala_jax.train.setup import place
from koala_jax.train.state import init_state
from koala_jax.train.step_builder import SDXL_VAE_FACTOR, Models, TrainStep, build_step, synthetic_shape

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DEFAULT_OUTPUT = os.path.join(REPO, "benchmarks", "results", "bench_train.json")
DEFAULT_REMAT = ("resnet", "transformer_block")  # train.py's default (configs: compute.remat)
Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Case:
    """One student variant: its training config, architectures, and train.py's step for them on one device
    (`step_builder.build_step`: Flax modules, feature-KD pairs, optimizer, jitted step)."""

    variant: str
    cfg: ml_collections.ConfigDict
    step: TrainStep

    @property
    def teacher_config(self) -> UNetConfig:
        return self.step.teacher.config

    @property
    def student_config(self) -> UNetConfig:
        return self.step.student.config

    @property
    def pairs(self) -> dict[str, str]:  # student attn1 path -> teacher attn1 path (diffusers module names)
        return self.step.pairs


@dataclasses.dataclass
class Timing:
    """One stack's measurement of one case (peak memory: None where the device reports none)."""

    step_time_s: float
    loss: float
    peak_memory_bytes: int | None
    flops: float | None = None  # per step: the compiled JAX step's, credited to both sides
    compile_s: float | None = None


# ---------------------------------------------------------------- shared


def train_config(args: argparse.Namespace, variant: str) -> ml_collections.ConfigDict:
    """train.py's base config (optimizer, noise, loss weights, caption dropout) with the benchmark's
    student and compute options; the teacher is random and bf16, the student random (timing does not
    depend on the weights)."""
    c = base_config()
    c.student.variant = variant
    c.compute.dtype = "bfloat16"
    c.compute.remat = tuple(args.remat)
    c.compute.attention_impl = args.attention_impl
    c.kd.features = ("attn1",)
    return c


def make_case(args: argparse.Namespace, variant: str) -> Case:
    cfg = train_config(args, variant)
    teacher_config = preset(args.teacher)
    models = Models(teacher_config, derive_student_config(teacher_config, variant), {})
    data = synthetic_shape(teacher_config, args.resolution, args.text_len)
    return Case(variant, cfg, build_step(cfg, models, data, one_device(), args.batch))


def random_batch(config: UNetConfig, batch: int, latent: int, text_len: int, seed: int = 0) -> tuple[Batch, Batch]:
    """(batch, null embeddings) shaped like prepared SDXL records, float32."""
    rng = np.random.default_rng(seed)
    pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    text_dim = config.cross_attention_dim[0]
    size = SDXL_VAE_FACTOR * latent
    data = {
        "latents": rng.standard_normal((batch, config.in_channels, latent, latent), np.float32),
        "prompt_embeds": rng.standard_normal((batch, text_len, text_dim), np.float32),
        "pooled_prompt_embeds": rng.standard_normal((batch, pooled), np.float32),
        "time_ids": np.tile(np.array([size, size, 0, 0, size, size], np.float32), (batch, 1)),
    }
    null = {
        "prompt_embeds": np.zeros((text_len, text_dim), np.float32),
        "pooled_prompt_embeds": np.zeros((pooled,), np.float32),
    }
    return data, null


def log(message: str) -> None:
    print(f"[bench_train] {message}", file=sys.stderr, flush=True)


def time_steps(step: Callable[[], Any], wait: Callable[[Any], Any], warmup: int, steps: int) -> tuple[float, Any]:
    """Seconds per call of `step` over `steps` calls after `warmup` calls; `wait` blocks until a
    call's result is computed (asynchronous dispatch). Returns (seconds per step, last result)."""
    out = None
    for _ in range(warmup):
        out = step()
    wait(out)
    start = time.perf_counter()
    for _ in range(steps):
        out = step()
    wait(out)
    return (time.perf_counter() - start) / steps, out


# ---------------------------------------------------------------- JAX


def one_device() -> jax.sharding.Mesh:
    """The (data, fsdp) mesh of train.py over the first device only."""
    return sharding.make_mesh(1, 1, jax.devices()[:1])


def placed_random_params(config: UNetConfig, seed: int, dtype: jnp.dtype, mesh: jax.sharding.Mesh) -> dict:
    """`koala_jax.models.random_params` (host numpy, no compilation; timing does not depend on the
    values) in `dtype` on `mesh`."""
    host = random_params(config, seed)
    return place(host, sharding.tree_shardings(host, mesh), dtype)


def jax_peak_memory() -> int | None:
    stats = jax.devices()[0].memory_stats()
    return stats.get("peak_bytes_in_use") if stats else None


def bench_jax(case: Case, teacher_params: dict, data: Batch, null: Batch, warmup: int, steps: int) -> Timing:
    """train.py's compiled train_step on the first device (bf16 `teacher_params` on `one_device()`)."""
    log(f"jax {case.variant}: building and compiling")
    cfg, step, mesh = case.cfg, case.step, case.step.mesh
    params = placed_random_params(case.student_config, cfg.seed, jnp.float32, mesh)
    state_shardings = step.shardings(step.inputs.state)
    state = jax.jit(lambda p: init_state(p, step.optimizer, cfg.seed, False), out_shardings=state_shardings)(params)
    del params
    batch = jax.device_put(data, sharding.batch_sharding(mesh))
    null_embeds = jax.device_put(null, sharding.replicated(mesh))

    start = time.perf_counter()
    compiled = step.compile()
    compile_s = time.perf_counter() - start
    log(f"jax {case.variant}: step compiled in {compile_s:.1f} s; timing")

    def one_step() -> dict:
        nonlocal state
        state, metrics = compiled(state, teacher_params, batch, null_embeds)
        return metrics

    step_time, metrics = time_steps(one_step, jax.block_until_ready, warmup, steps)
    if not bool(metrics["finite"]):
        raise FloatingPointError(f"JAX step not finite: { {k: float(v) for k, v in metrics.items()} }")
    return Timing(step_time, float(metrics["total"]), jax_peak_memory(), compiled_flops(compiled), compile_s)


# ---------------------------------------------------------------- PyTorch


def torch_unet(config: UNetConfig, device):
    """diffusers' UNet2DConditionModel for `config`, randomly initialised on `device` (float32)."""
    import torch
    from diffusers import UNet2DConditionModel as TorchUNet

    with torch.device(device):
        return TorchUNet(**config.to_diffusers())


def capture_outputs(model, names: set[str]) -> dict:
    """Forward hooks storing the outputs of the named modules into the returned dict (BK-SDM/KOALA's
    feature capture)."""
    feats: dict = {}
    found = set()
    for name, module in model.named_modules():
        if name in names:
            module.register_forward_hook(lambda _m, _i, out, name=name: feats.__setitem__(name, out))
            found.add(name)
    if found != names:
        raise KeyError(f"modules not in the torch model: {sorted(names - found)}")
    return feats


def torch_step(case: Case, data: Batch, null: Batch, device, compile_models: bool) -> Callable[[], Any]:
    """The KOALA step in diffusers + PyTorch, as a closure returning the (detached) total loss."""
    import torch
    import torch.nn.functional as F

    cfg, kd, o = case.cfg, case.cfg.kd, case.cfg.optim
    if cfg.noise.prediction_type != "epsilon":
        raise ValueError("the PyTorch step implements epsilon prediction only")
    teacher = torch_unet(case.teacher_config, device).bfloat16().eval().requires_grad_(False)
    student = torch_unet(case.student_config, device).train()
    if cfg.compute.remat:
        student.enable_gradient_checkpointing()
    teacher_feats = capture_outputs(teacher, set(case.pairs.values()))
    student_feats = capture_outputs(student, set(case.pairs))
    if compile_models:
        teacher, student = torch.compile(teacher), torch.compile(student)
    optimizer = torch.optim.AdamW(
        student.parameters(),
        lr=o.lr,
        betas=(o.b1, o.b2),
        eps=o.eps,
        weight_decay=o.weight_decay,
        fused=device.type == "cuda",
    )
    alphas = torch.as_tensor(
        case.step.config.schedule.alphas_cumprod,
        device=device,
    )
    x0, ehs_in, pooled_in, time_ids = (
        torch.from_numpy(data[k]).to(device) for k in ("latents", "prompt_embeds", "pooled_prompt_embeds", "time_ids")
    )
    null_ehs, null_pooled = (torch.from_numpy(null[k]).to(device) for k in ("prompt_embeds", "pooled_prompt_embeds"))
    mse = lambda a, b: F.mse_loss(a.float(), b.float())

    def step() -> torch.Tensor:
        b = x0.shape[0]
        t = torch.randint(0, len(alphas), (b,), device=device)
        noise = torch.randn_like(x0)
        abar = alphas[t].view(-1, 1, 1, 1)
        x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
        drop = torch.rand(b, device=device) < cfg.data.caption_dropout
        ehs = torch.where(drop[:, None, None], null_ehs, ehs_in)
        cond = {"text_embeds": torch.where(drop[:, None], null_pooled, pooled_in), "time_ids": time_ids}
        with torch.autocast(device.type, dtype=torch.bfloat16):
            with torch.no_grad():
                teacher_out = teacher(x_t, t, ehs, added_cond_kwargs=cond).sample
            student_out = student(x_t, t, ehs, added_cond_kwargs=cond).sample
        feat = sum(mse(student_feats[s], teacher_feats[p]) for s, p in case.pairs.items())
        loss = kd.task * mse(student_out, noise) + kd.out * mse(student_out, teacher_out) + kd.feat * feat
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), o.grad_clip)
        optimizer.step()
        return loss.detach()

    return step


def bench_torch(
    case: Case,
    data: Batch,
    null: Batch,
    device_name: str,
    warmup: int,
    steps: int,
    compile_models: bool,
    threads: int | None,
) -> Timing:
    import torch

    log(f"torch {case.variant}: building and timing")
    device = torch.device(device_name)
    cuda = device.type == "cuda"
    if threads:
        torch.set_num_threads(threads)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    step = torch_step(case, data, null, device, compile_models)
    wait = (lambda _: torch.cuda.synchronize()) if cuda else (lambda _: None)
    step_time, loss = time_steps(step, wait, warmup, steps)
    timing = Timing(step_time, float(loss), torch.cuda.max_memory_allocated() if cuda else None)
    del step
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()  # hand the memory back for the JAX side
    return timing


# ---------------------------------------------------------------- report


def result_row(variant: str, stack: str, timing: Timing, batch: int, peak: float) -> dict:
    mfu = timing.flops / timing.step_time_s / peak if timing.flops else None
    return {
        "variant": variant,
        "stack": stack,
        **dataclasses.asdict(timing),
        "images_per_s": batch / timing.step_time_s,
        "mfu": mfu,
    }


def ratio_row(variant: str, jax_row: dict, torch_row: dict) -> dict:
    return {
        "variant": variant,
        "stack": "ratio jax/torch",
        "images_per_s": jax_row["images_per_s"] / torch_row["images_per_s"],
    }


def print_table(rows: list[dict], peak: float, device: str) -> None:
    print(f"\ndevice: {device}; measured bf16 matmul peak {peak / 1e12:.2f} TFLOP/s")
    print(f"{'variant':<11} {'stack':<16} {'s/step':>8} {'img/s':>9} {'MFU':>7} {'peak mem':>9} {'loss':>9}")
    for r in rows:
        if r["stack"].startswith("ratio"):
            print(f"{r['variant']:<11} {r['stack']:<16} {'':>8} {r['images_per_s']:>8.2f}x")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        mem = f"{r['peak_memory_bytes'] / 2**30:.1f}G" if r["peak_memory_bytes"] else "-"
        print(
            f"{r['variant']:<11} {r['stack']:<16} {r['step_time_s']:>8.3f} {r['images_per_s']:>9.2f} {mfu:>7} "
            f"{mem:>9} {r['loss']:>9.4f}"
        )


def warn_if_devices_differ(torch_device: str | None) -> None:
    jax_device = {"gpu": "cuda"}.get(jax.default_backend(), jax.default_backend())
    if torch_device and torch_device != jax_device:
        log(f"warning: JAX runs on {jax_device}, PyTorch on {torch_device}: the ratio compares different devices")


def device_description(torch_device: str | None) -> str:
    jax_device = jax.devices()[0]
    text = f"jax: {jax_device.platform} {jax_device.device_kind}"
    if torch_device:
        import torch

        name = torch.cuda.get_device_name() if torch_device == "cuda" else platform.processor() or platform.machine()
        text += f"; torch {torch.__version__}: {torch_device} {name}"
    return f"{text}; {os.cpu_count()} CPUs"


def write_results(path: str, args: argparse.Namespace, rows: list[dict], peak: float, device: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    result = {
        "date": datetime.date.today().isoformat(),
        "device": device,
        "peak_bf16_flops": peak,
        "smoke": args.smoke,
        "args": vars(args),
        "results": rows,
    }
    write_json(path, result)
    print(f"wrote {path}")


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--variant",
        choices=[*STUDENT_VARIANTS, "both"],
        default=None,
        help="student(s) to time (default: both; koala-700m with --smoke)",
    )
    p.add_argument("--teacher", choices=["sdxl-base", "tiny-sdxl"], default="sdxl-base")
    p.add_argument("--batch", type=int, default=8, help="images per step (one device)")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps after compilation")
    p.add_argument("--resolution", type=int, default=1024, help="pixels (latents are resolution / 8)")
    p.add_argument("--text-len", type=int, default=77)
    p.add_argument(
        "--remat",
        default=",".join(DEFAULT_REMAT),
        help="comma-separated module kinds to rematerialise (resnet, transformer_block, "
        "attention_block) or 'none'; torch: any -> diffusers gradient checkpointing",
    )
    p.add_argument("--attention-impl", choices=ATTENTION_IMPLS, default="auto")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda", help="the PyTorch side's device")
    p.add_argument(
        "--torch-compile",
        action="store_true",
        help="torch.compile teacher and student (raise --warmup: dynamo keeps compiling over the "
        "first steps, and recompiles around gradient checkpointing)",
    )
    p.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's; --smoke: 1, OpenMP spinning on a busy CPU)",
    )
    p.add_argument("--skip-torch", action="store_true")
    p.add_argument(
        "--smoke", action="store_true", help="tiny teacher, 64 px (8x8 latents), batch 2, 2 steps, both sides on CPU"
    )
    p.add_argument("--out", default=DEFAULT_OUTPUT, help="JSON results file")
    args = p.parse_args(argv)
    if args.smoke:
        args.teacher, args.resolution, args.batch, args.device = "tiny-sdxl", 64, 2, "cpu"
        args.steps, args.warmup, args.torch_threads = 2, 1, args.torch_threads or 1
    args.variant = args.variant or ("koala-700m" if args.smoke else "both")
    args.remat = [] if args.remat in ("", "none") else args.remat.split(",")
    return args


def main(argv: list[str] | None = None) -> None:
    # Both frameworks share one GPU in this process: JAX (whose backend starts lazily, after this)
    # allocates on demand instead of taking 75% of the memory up front. Set the variable to override.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    args = parse_args(argv)
    variants = list(STUDENT_VARIANTS) if args.variant == "both" else [args.variant]
    # Smallest student first: JAX's peak memory counter only grows within the process.
    cases = sorted((make_case(args, v) for v in variants), key=lambda c: param_count(c.student_config))
    data, null = random_batch(cases[0].teacher_config, args.batch, args.resolution // SDXL_VAE_FACTOR, args.text_len)
    # PyTorch first, then JAX: torch hands its cached memory back, JAX's allocator never does.
    torch_timings = (
        {}
        if args.skip_torch
        else {
            c.variant: bench_torch(
                c, data, null, args.device, args.warmup, args.steps, args.torch_compile, args.torch_threads
            )
            for c in cases
        }
    )
    warn_if_devices_differ(None if args.skip_torch else args.device)
    peak = measure_peak_flops(jnp.bfloat16)
    teacher_params = placed_random_params(cases[0].teacher_config, 1, jnp.bfloat16, one_device())
    rows = []
    for case in cases:
        jax_timing = bench_jax(case, teacher_params, data, null, args.warmup, args.steps)
        rows.append(result_row(case.variant, "jax/flax", jax_timing, args.batch, peak))
        if case.variant in torch_timings:
            torch_timing = dataclasses.replace(torch_timings[case.variant], flops=jax_timing.flops)
            rows.append(result_row(case.variant, "torch/diffusers", torch_timing, args.batch, peak))
            rows.append(ratio_row(case.variant, rows[-2], rows[-1]))
        gc.collect()
    device = device_description(None if args.skip_torch else args.device)
    print_table(rows, peak, device)
    write_results(args.out, args, rows, peak, device)


if __name__ == "__main__":
    main()
