"""Evaluate text-to-image models side by side: the same prompts and seeds (so the same initial noise) for each,
a table and JSON of the metrics, and a grid where the models stand in columns.

    python evaluate.py --model teacher=assets/tiny_world/teacher --model student=runs/tiny --ema \\
        --pipeline assets/tiny_world/teacher --prompts world-single --seeds 0,1 --out runs/tiny/eval

Each --model is NAME=PATH: a diffusers SDXL pipeline folder, or (with --pipeline, the folder that gives the VAE,
text encoders, tokenizers and scheduler) a U-Net source: a train.py run, a JAX params dir or a diffusers U-Net
folder. The first model is the reference for agreement (PSNR/MSE of images and final latents from the same
noise). Tiny-world prompt sets (world-single: every colour x shape; world-rich: sizes, positions, backgrounds and
relations) are scored by the world's detector (attribute accuracy).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from koala_jax.cli.runner import make_parser, run
from koala_jax.errors import ConfigError, MissingPathError
from koala_jax.evaluation import world_eval
from koala_jax.evaluation.generators import BACKENDS, load_generator
from koala_jax.evaluation.report import markdown_table
from koala_jax.pipelines.sampling import Settings
from koala_jax.weights.pipeline_dir import default_image_size, is_pipeline_dir


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser(__doc__)
    parser.add_argument("--model", action="append", required=True, metavar="NAME=PATH", help="a model to evaluate")
    parser.add_argument("--pipeline", help="pipeline folder for models given as U-Net sources")
    parser.add_argument("--ema", action="store_true", help="the EMA params of models that are train.py runs")
    parser.add_argument("--prompts", default="world-single", help=f"{' | '.join(world_eval.PROMPT_SETS)}")
    parser.add_argument("--seeds", default="0,1", help="comma-separated seeds; every prompt is drawn with each")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--scheduler", default="euler", choices=("euler", "euler-trailing"))
    parser.add_argument(
        "--size", type=int, help="image side in pixels (default: the pipeline's U-Net sample_size x VAE factor)"
    )
    parser.add_argument("--backend", choices=BACKENDS, default="jax")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", required=True, help="folder for report.json, report.md and grid.png")
    return parser


def parse_models(specs: list[str], pipeline: str | None) -> dict[str, tuple[str, str | None]]:
    """{name: (pipeline folder, U-Net source or None)}, every path checked before anything is loaded."""
    models = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--model {spec!r}: expected NAME=PATH, e.g. teacher=assets/tiny_world/teacher")
        if name in models:
            raise ConfigError(f"--model {name!r} is given twice")
        if not Path(path).exists():
            raise MissingPathError(f"--model {name}={path}: no such file or folder")
        if is_pipeline_dir(path):
            models[name] = (path, None)
        elif pipeline is None:
            raise ConfigError(
                f"--model {name}={path} is not a pipeline folder: give --pipeline for its VAE and encoders"
            )
        else:
            models[name] = (pipeline, path)
    return models


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError as e:
        raise ConfigError(f"--seeds {text!r}: comma-separated integers expected") from e
    if not seeds:
        raise ConfigError("--seeds: give at least one seed")
    return seeds


def evaluate(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.steps < 1 or args.batch_size < 1 or (args.size is not None and args.size < 1):
        raise ConfigError(f"--steps {args.steps}, --batch-size {args.batch_size} and --size must be positive")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise ConfigError(f"--out {args.out} is a file, not a folder")
    prompts = world_eval.prompt_set(args.prompts)
    seeds = parse_seeds(args.seeds)
    if args.pipeline and not is_pipeline_dir(args.pipeline):
        raise MissingPathError(f"--pipeline {args.pipeline}: not a diffusers pipeline folder (no model_index.json)")
    models = parse_models(args.model, args.pipeline)
    size = args.size or default_image_size(next(iter(models.values()))[0])
    settings = Settings(steps=args.steps, guidance=args.guidance, scheduler=args.scheduler, height=size, width=size)
    generators = {
        name: load_generator(args.backend, pipeline, unet, settings, args.ema, args.batch_size)
        for name, (pipeline, unet) in models.items()
    }
    result = world_eval.evaluate_world(generators, prompts, seeds, reference=next(iter(models)))
    world_eval.write_report(result, Path(args.out), {**vars(args), "size": size})
    print(markdown_table(result.rows(), world_eval.COLUMNS))
    print(f"wrote report.json, report.md and grid.png to {Path(args.out).absolute()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(evaluate, argv)
