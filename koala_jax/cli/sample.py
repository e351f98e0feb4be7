"""Generate images from an exported KOALA student (or any SDXL pipeline) with diffusers or in JAX.

    python sample.py --model export/koala-700m --prompt "a koala reading a newspaper" --out samples/
    python sample.py --model sdxl-base-1.0/ --unet export/koala-700m-unet --prompts-file prompts.txt --grid
    python sample.py --model export/koala-lightning-700m --preset lightning --prompt "..." --dtype fp16
    python sample.py --backend jax --model sdxl-base-1.0/ --unet runs/koala_700m --preset lightning --prompt "..."

`--backend diffusers` (default) runs StableDiffusionXLPipeline on the GPU when there is one (fp16 by
default) and falls back to the CPU with a warning (fp32). `--backend jax` runs the same pipeline in JAX
without torch (koala_jax/pipelines/jax_sdxl.py): on TPUs, GPUs or the CPU, bf16 by default (fp32 on the
CPU), each batch of `--batch-size` images split over the local devices; its `--unet` may also be a JAX
params dir or a train.py run, `--model` must be a local pipeline folder, and it samples with Euler only.
A seed gives the same initial noise in both backends. `--preset koala|lightning|turbo` picks the paper's
sampling defaults per teacher family (see koala_jax/pipelines/sampling.py for the sources and the
assumptions); explicit flags override them. Each PNG carries its prompt and settings in tEXt chunks; the
time per image (and, with diffusers on a GPU, the peak GPU memory) is printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from PIL import Image

from koala_jax.cli.runner import make_parser, run
from koala_jax.errors import ConfigError, KoalaError, MissingPathError
from koala_jax.pipelines.sampling import (
    DTYPES,
    PRESETS,
    SCHEDULERS,
    Settings,
    generate,
    load_pipeline,
    make_grid,
    make_scheduler,
    peak_gpu_memory_gib,
    pick_device,
    save_png,
)

BACKENDS = ("diffusers", "jax")
# A backend: (prompt, seed) jobs -> batches of (images, seconds for the batch).
Runner = Callable[[list[tuple[str, int]]], Iterator[tuple[list[Image.Image], float]]]


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser(__doc__)
    parser.add_argument("--model", required=True, help="diffusers SDXL pipeline folder (or hub id)")
    parser.add_argument(
        "--unet",
        help="diffusers U-Net folder replacing the pipeline's (e.g. an exported student); "
        "with --backend jax also a JAX params dir or a train.py run",
    )
    parser.add_argument("--backend", choices=BACKENDS, default="diffusers", help="diffusers + PyTorch, or JAX")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    parser.add_argument("--prompts-file", help="text file, one prompt per line")
    parser.add_argument("--negative-prompt")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="koala", help="defaults per teacher family")
    parser.add_argument("--steps", type=int, help="default: from --preset")
    parser.add_argument("--guidance", type=float, help="default: from --preset")
    parser.add_argument("--scheduler", choices=SCHEDULERS, help="default: from --preset")
    parser.add_argument("--height", type=int, help="default: from --preset")
    parser.add_argument("--width", type=int, help="default: from --preset")
    parser.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    parser.add_argument("--images-per-prompt", type=int, default=1)
    parser.add_argument("--batch-size", type=int, help="--backend jax: images per batch (default: local devices)")
    parser.add_argument(
        "--dtype", choices=DTYPES, help="default: fp16 (diffusers) or bf16 (jax) on an accelerator, fp32 on CPU"
    )
    parser.add_argument("--out", default="samples", help="output folder for the PNGs")
    parser.add_argument("--grid", action="store_true", help="also write grid.png with every image")
    return parser


def resolve_settings(args: argparse.Namespace) -> Settings:
    """The preset's defaults, overridden by every flag the user gave."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(Settings) if getattr(args, f.name) is not None}
    return dataclasses.replace(PRESETS[args.preset], **given)


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise MissingPathError(f"--prompts-file {path}: no such file")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as e:
            raise ConfigError(f"--prompts-file {path}: not UTF-8 text (byte {e.start}: {e.reason})") from e
        prompts += [line.strip() for line in lines if line.strip()]
    return prompts


def vae_factor(model: str) -> int | None:
    """Pixels per latent of `model`'s VAE, from its vae/config.json (None for a hub id: nothing to read yet)."""
    path = Path(model) / "vae" / "config.json"
    if not path.is_file():
        return None
    try:
        return 2 ** (len(json.loads(path.read_text())["block_out_channels"]) - 1)
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{path}: not a readable AutoencoderKL config ({e})") from e


def check_arguments(args: argparse.Namespace, settings: Settings) -> list[str]:
    """The prompts, once every argument is checked (before any model is loaded): all problems in one error."""
    problems = [
        f"{flag} {value} must be at least 1"
        for flag, value in (
            ("--steps", settings.steps),
            ("--height", settings.height),
            ("--width", settings.width),
            ("--images-per-prompt", args.images_per_prompt),
            ("--batch-size", args.batch_size),
        )
        if value is not None and value < 1
    ]
    if settings.guidance < 0:
        problems.append(f"--guidance {settings.guidance} must not be negative")
    factor = vae_factor(args.model)
    for flag, value in (("--height", settings.height), ("--width", settings.width)):
        if factor and value >= 1 and value % factor:
            problems.append(f"{flag} {value} is not a multiple of the VAE's factor {factor} ({args.model})")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        problems.append(f"--out {args.out} is a file, not a folder")
    try:
        prompts = read_prompts(args)
    except KoalaError as e:
        problems.append(str(e))
        prompts = None
    if prompts == []:
        problems.append("give at least one --prompt or a --prompts-file with prompts")
    if problems:
        raise ConfigError("; ".join(problems))
    return prompts


def diffusers_runner(args: argparse.Namespace, settings: Settings) -> tuple[Runner, str, str]:
    """(runner, device, dtype) of StableDiffusionXLPipeline: one image per call."""
    if args.batch_size is not None:
        raise ConfigError("--batch-size is for --backend jax (diffusers samples one image at a time)")
    device, dtype = pick_device(args.dtype)
    try:
        pipe = load_pipeline(args.model, args.unet, dtype, device)
    except (OSError, ValueError) as e:  # Missing folders or files, bad hub ids, configs diffusers refuses.
        raise KoalaError(f"{args.model}: {e}") from e
    pipe.scheduler = make_scheduler(settings.scheduler, pipe.scheduler.config)

    def images(jobs: list[tuple[str, int]]) -> Iterator[tuple[list[Image.Image], float]]:
        for prompt, seed in jobs:
            image, seconds = generate(pipe, prompt, args.negative_prompt, settings, seed)
            yield [image], seconds

    return images, device, dtype


def jax_runner(args: argparse.Namespace, settings: Settings) -> tuple[Runner, str, str]:
    """(runner, device, dtype) of the JAX pipeline: batches of `--batch-size` images over the local devices."""
    import jax

    from koala_jax.pipelines.jax_sdxl import SCHEDULER_OVERRIDES, JaxSDXLPipeline

    if settings.scheduler not in SCHEDULER_OVERRIDES:
        raise ConfigError(f"--backend jax samples with {' or '.join(SCHEDULER_OVERRIDES)}, not {settings.scheduler!r}")
    if not Path(args.model).is_dir():
        raise MissingPathError(f"{args.model}: no such folder (--backend jax reads a local pipeline folder)")
    device = jax.default_backend()
    dtype = args.dtype or ("fp32" if device == "cpu" else "bf16")
    pipe = JaxSDXLPipeline.load(args.model, args.unet, dtype)
    batch = args.batch_size or jax.local_device_count()

    def images(jobs: list[tuple[str, int]]) -> Iterator[tuple[list[Image.Image], float]]:
        for start in range(0, len(jobs), batch):
            prompts, seeds = zip(*jobs[start : start + batch])
            began = time.perf_counter()
            out = pipe(list(prompts), settings, list(seeds), args.negative_prompt)
            yield out, time.perf_counter() - began

    return images, device, dtype


def sample(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    settings = resolve_settings(args)
    prompts = check_arguments(args, settings)
    runner, device, dtype = (jax_runner if args.backend == "jax" else diffusers_runner)(args, settings)
    out = Path(args.out)
    common = {
        **dataclasses.asdict(settings),
        "negative_prompt": args.negative_prompt,
        "model": args.model,
        "unet": args.unet,
        "dtype": dtype,
        "preset": args.preset,
        "backend": args.backend,
    }
    jobs = [
        (prompt, args.seed + p * args.images_per_prompt + j)
        for p, prompt in enumerate(prompts)
        for j in range(args.images_per_prompt)
    ]
    images, calls = [], []
    for batch, seconds in runner(jobs):
        for image in batch:
            prompt, seed = jobs[len(images)]
            path = out / f"{len(images):04d}.png"
            save_png(image, path, {**common, "prompt": prompt, "seed": seed})
            images.append(image)
            print(f"{path}: {seconds / len(batch):.2f} s  {prompt!r}")
        calls.append((len(batch), seconds))
    if args.grid:
        make_grid(images).save(out / "grid.png")
    steady = calls[1:] or calls  # The first call includes warm-up (compilation, kernel selection, allocations).
    per_image = sum(s for _, s in steady) / sum(n for n, _ in steady)
    print(
        f"{len(images)} images, {settings.width}x{settings.height}, {settings.steps} steps, {settings.scheduler}, "
        f"guidance {settings.guidance}, {dtype} on {device} ({args.backend}): {per_image:.2f} s per image "
        f"(first {calls[0][1] / calls[0][0]:.2f} s)"
    )
    if device == "cuda":
        print(f"peak GPU memory: {peak_gpu_memory_gib():.2f} GiB")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(sample, argv)
