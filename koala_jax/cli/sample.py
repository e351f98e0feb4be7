"""Generate images from an exported KOALA student (or any SDXL pipeline) with diffusers.

    python sample.py --model export/koala-700m --prompt "a koala reading a newspaper" --out samples/
    python sample.py --model sdxl-base-1.0/ --unet export/koala-700m-unet --prompts-file prompts.txt --grid
    python sample.py --model export/koala-lightning-700m --preset lightning --prompt "..." --dtype fp16

Runs on the GPU when there is one (fp16 by default) and falls back to the CPU with a warning (fp32).
`--preset koala|lightning|turbo` picks the paper's sampling defaults per teacher family (see
koala_jax/pipelines/sampling.py for the sources and the assumptions); explicit flags override them. Each PNG
carries its prompt and settings in tEXt chunks; the time per image and the peak GPU memory are printed.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from koala_jax.cli.runner import make_parser, run
from koala_jax.errors import KoalaError
from koala_jax.pipelines.sampling import (
    PRESETS,
    SCHEDULERS,
    TORCH_DTYPES,
    Settings,
    generate,
    load_pipeline,
    make_grid,
    make_scheduler,
    peak_gpu_memory_gib,
    pick_device,
    save_png,
)


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser(__doc__)
    parser.add_argument("--model", required=True, help="diffusers SDXL pipeline folder (or hub id)")
    parser.add_argument("--unet", help="diffusers U-Net folder replacing the pipeline's (e.g. an exported student)")
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
    parser.add_argument("--dtype", choices=sorted(TORCH_DTYPES), help="default: fp16 on GPU, fp32 on CPU")
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
        lines = Path(args.prompts_file).read_text().splitlines()
        prompts += [line.strip() for line in lines if line.strip()]
    return prompts


def sample(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    prompts = read_prompts(args)
    if not prompts:
        raise KoalaError("give at least one --prompt or a --prompts-file with prompts")
    settings = resolve_settings(args)
    device, dtype = pick_device(args.dtype)
    try:
        pipe = load_pipeline(args.model, args.unet, TORCH_DTYPES[dtype], device)
    except (OSError, ValueError) as e:  # Missing folders or files, bad hub ids, configs diffusers refuses.
        raise KoalaError(f"{args.model}: {e}") from e
    pipe.scheduler = make_scheduler(settings.scheduler, pipe.scheduler.config)
    out = Path(args.out)
    common = {
        **dataclasses.asdict(settings),
        "negative_prompt": args.negative_prompt,
        "model": args.model,
        "unet": args.unet,
        "dtype": dtype,
        "preset": args.preset,
    }
    images, times = [], []
    for p, prompt in enumerate(prompts):
        for j in range(args.images_per_prompt):
            index = p * args.images_per_prompt + j
            image, seconds = generate(pipe, prompt, args.negative_prompt, settings, args.seed + index)
            save_png(image, out / f"{index:04d}.png", {**common, "prompt": prompt, "seed": args.seed + index})
            images.append(image)
            times.append(seconds)
            print(f"{out / f'{index:04d}.png'}: {seconds:.2f} s  {prompt!r}")
    if args.grid:
        make_grid(images).save(out / "grid.png")
    steady = times[1:] or times  # The first image includes warm-up (kernel selection, allocations).
    print(
        f"{len(images)} images, {settings.width}x{settings.height}, {settings.steps} steps, {settings.scheduler}, "
        f"guidance {settings.guidance}, {dtype} on {device}: {sum(steady) / len(steady):.2f} s per image "
        f"(first {times[0]:.2f} s)"
    )
    if device == "cuda":
        print(f"peak GPU memory: {peak_gpu_memory_gib():.2f} GiB")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(sample, argv)
