"""Generate images from an exported KOALA student (or any SDXL pipeline) with diffusers or in JAX.

    python sample.py --model export/koala-700m --prompt "a koala reading a newspaper" --out samples/
    python sample.py --model sdxl-base-1.0/ --unet export/koala-700m-unet --prompts-file prompts.txt --grid
    python sample.py --model export/koala-lightning-700m --preset lightning --prompt "..." --dtype fp16
    python sample.py --backend jax --model sdxl-base-1.0/ --unet runs/koala_700m --preset lightning --prompt "..."

`--backend diffusers` (the default when PyTorch is installed) runs StableDiffusionXLPipeline on the GPU when
there is one (fp16 by default) and falls back to the CPU with a warning (fp32). `--backend jax` (the default
without PyTorch) runs the same pipeline in JAX without torch (koala_jax/pipelines/jax_sdxl.py): on TPUs, GPUs
or the CPU, bf16 by default (fp32 on the CPU), each batch of `--batch-size` images split over the local
devices; its `--unet` may also be a JAX params dir or a train.py run, `--model` must be a local pipeline folder,
and it samples with Euler only. A seed gives the same initial noise in both backends. `--preset
koala|lightning|turbo` picks the paper's sampling defaults per teacher family (see
koala_jax/pipelines/sampling.py for the sources and the assumptions); explicit flags override them. Images are
drawn at the model's own size (its U-Net's sample_size x the VAE factor, as diffusers does), the preset's size
applying to full-size (1024 px) models and hub ids. Every value is checked before a model loads: steps 1..1000,
guidance 0..100, seeds from 0, sides up to 4096 px in multiples of the VAE factor (and of 8 for diffusers).
Each PNG carries its prompt and settings in tEXt chunks and is written whole or not at all; the time per image
(and, with diffusers on a GPU, the peak GPU memory) is printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from PIL import Image

from koala_jax.cli.requires import TORCH_INSTALL, require_torch, torch_available
from koala_jax.cli.runner import make_parser, run
from koala_jax.errors import ConfigError, KoalaError, MissingPathError
from koala_jax.files import read_prompts_file
from koala_jax.pipelines.sampling import (
    DTYPES,
    GUIDANCE_RANGE,
    MAX_SIDE,
    MAX_STEPS,
    PRESETS,
    SCHEDULERS,
    Settings,
    generate,
    load_pipeline,
    make_grid,
    make_scheduler,
    peak_gpu_memory_gib,
    pick_device,
    preset_settings,
    range_problem,
    save_png,
    setting_problems,
)
from koala_jax.weights.params_dir import is_params_dir
from koala_jax.weights.pipeline_dir import default_image_size, is_pipeline_dir, vae_factor
from koala_jax.weights.training_run import is_training_dir

BACKENDS = ("diffusers", "jax")
SETTING_FLAGS = {name: f"--{name}" for name in ("steps", "guidance", "height", "width")}
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
    parser.add_argument(
        "--backend", choices=BACKENDS, help="diffusers + PyTorch, or JAX (default: diffusers when torch is installed)"
    )
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    parser.add_argument("--prompts-file", help="UTF-8 text file, one prompt per line")
    parser.add_argument("--negative-prompt")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="koala", help="defaults per teacher family")
    parser.add_argument("--steps", type=int, help=f"1..{MAX_STEPS} (default: from --preset)")
    low, high = GUIDANCE_RANGE
    parser.add_argument("--guidance", type=float, help=f"{low:g}..{high:g} (default: from --preset)")
    parser.add_argument("--scheduler", choices=SCHEDULERS, help="default: from --preset")
    side = (
        f"pixels, up to {MAX_SIDE}, a multiple of the VAE factor (and of 8 for diffusers); default: the model's own "
        "size (U-Net sample_size x VAE factor), or the preset's for full-size (1024 px) models and hub ids"
    )
    parser.add_argument("--height", type=int, help=side)
    parser.add_argument("--width", type=int, help="as --height")
    parser.add_argument("--seed", type=int, default=0, help="at least 0; image i uses seed + i")
    parser.add_argument("--images-per-prompt", type=int, default=1, help="at least 1")
    parser.add_argument("--batch-size", type=int, help="--backend jax: images per batch (default: local devices)")
    parser.add_argument(
        "--dtype", choices=DTYPES, help="default: fp16 (diffusers) or bf16 (jax) on an accelerator, fp32 on CPU"
    )
    parser.add_argument("--out", default="samples", help="output folder for the PNGs")
    parser.add_argument("--grid", action="store_true", help="also write grid.png with every image")
    return parser


def resolve_backend(backend: str | None) -> str:
    """The backend asked for, or diffusers when PyTorch is installed and JAX (said on stderr) when it is not."""
    if backend == "diffusers":
        require_torch("--backend diffusers", "--backend jax, which needs no torch")
    if backend is not None:
        return backend
    if torch_available():
        return "diffusers"
    print(
        f"note: PyTorch is not installed, so sampling with --backend jax (for diffusers: {TORCH_INSTALL})",
        file=sys.stderr,
    )
    return "jax"


def resolve_settings(args: argparse.Namespace, native: int | None = None) -> Settings:
    """The preset's defaults at the model's own size `native` (see `preset_settings`), overridden by every flag
    the user gave."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(Settings) if getattr(args, f.name) is not None}
    return dataclasses.replace(preset_settings(args.preset, native), **given)


def read_prompts(args: argparse.Namespace) -> list[str]:
    return list(args.prompt) + (read_prompts_file(args.prompts_file) if args.prompts_file else [])


def model_sizes(args: argparse.Namespace) -> tuple[int | None, int | None]:
    """(VAE factor, the model's own image side when no size was given) of a local --model folder, from its
    configs; (None, None) for a hub id, whose configs are read as it loads."""
    if not Path(args.model).is_dir():
        return None, None
    factor = vae_factor(args.model)
    if args.height is not None and args.width is not None:
        return factor, None
    try:
        return factor, default_image_size(args.model)
    except KoalaError as e:
        raise ConfigError(f"{e} (or give --height and --width)") from e


def is_hub_id(name: str) -> bool:
    """Whether `name` could be a Hugging Face hub id (by huggingface_hub's own rule; `/abs/path` cannot)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def unet_problem(args: argparse.Namespace) -> str | None:
    """Why `--unet` cannot be read by the backend (named by its own path, with --backend jax where that reads
    it), found before anything loads; or None."""
    if args.unet is None:
        return None
    path = Path(args.unet)
    if not path.exists():
        return None if is_hub_id(args.unet) else f"--unet {path}: no such file or folder"
    if args.backend != "diffusers":
        return None
    kinds = (
        (is_training_dir, "a train.py run"),
        (is_params_dir, "a JAX params dir"),
        (is_pipeline_dir, f"a pipeline folder (give --unet {path / 'unet'})"),
        (Path.is_file, "a single weights file"),
    )
    for test, kind in kinds:
        if test(path):
            return (
                f"--unet {path} is {kind}, which diffusers does not read as a U-Net: use --backend jax, which reads it"
            )
    if not (path / "config.json").is_file():
        return f"--unet {path}: not a diffusers U-Net folder (no config.json), nor a train.py run or JAX params dir"
    return None


def check_arguments(args: argparse.Namespace) -> tuple[Settings, list[str]]:
    """(settings, prompts), once every argument is checked (before any model is loaded): all problems in one
    error."""
    problems = []
    try:
        factor, native = model_sizes(args)
    except KoalaError as e:
        problems.append(str(e))
        factor, native = None, None
    settings = resolve_settings(args, native)
    problems += setting_problems(settings, args.backend, factor, SETTING_FLAGS)
    problems += [
        p
        for p in (
            range_problem("--seed", args.seed, 0),
            range_problem("--images-per-prompt", args.images_per_prompt, 1),
            range_problem("--batch-size", args.batch_size, 1),
            unet_problem(args),
        )
        if p
    ]
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
    return settings, prompts


def diffusers_runner(args: argparse.Namespace, settings: Settings) -> tuple[Runner, str, str]:
    """(runner, device, dtype) of StableDiffusionXLPipeline: one image per call."""
    if args.batch_size is not None:
        raise ConfigError("--batch-size is for --backend jax (diffusers samples one image at a time)")
    device, dtype = pick_device(args.dtype)
    pipe = load_pipeline(args.model, args.unet, dtype, device)  # Errors name --unet's or --model's own path.
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
    args = build_parser().parse_args(argv)
    args.backend = resolve_backend(args.backend)
    settings, prompts = check_arguments(args)
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
        save_png(make_grid(images), out / "grid.png")
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
