"""Evaluate text-to-image models side by side: the same prompts and seeds (so the same initial noise) for each,
a table and JSON of the metrics, and a grid where the models stand in columns.

    python evaluate.py --model teacher=assets/tiny_world/teacher --model student=runs/tiny --ema \\
        --pipeline assets/tiny_world/teacher --prompts world-single --seeds 0,1 --out runs/tiny/eval

Each --model is NAME=PATH: a diffusers SDXL pipeline folder, or (with --pipeline, the folder that gives the VAE,
text encoders, tokenizers and scheduler) a U-Net source: a train.py run, a JAX params dir or a diffusers U-Net
folder. The first model is the reference for agreement (PSNR/MSE of images and final latents from the same
noise). Tiny-world prompt sets (world-single: every colour x shape; world-rich: sizes, positions, backgrounds and
relations) are scored by the world's detector (attribute accuracy).

Real SDXL-family models: --prompts-file (one prompt per line) instead of a world set, and any of --clip DIR (CLIP
score with a local CLIP folder), --fid-reference DIR (FID against a folder of reference images) and
--hps-checkpoint FILE --allow-pickle (HPSv2), each an extra column; these metrics and --backend diffusers need
PyTorch, the rest runs without it. Every path and value is checked before a model is loaded (steps 1..1000,
guidance 0..100, seeds from 0, the size a multiple of the VAE factor, and of 8 for diffusers), and every missing
metric folder or file is named at once. The grid (grid.png) has one row per prompt and a group of columns per
model, one column per seed.

    python evaluate.py --model koala=export/koala-700m --model sdxl=stable-diffusion-xl-base-1.0 \\
        --prompts-file prompts.txt --seeds 0 --size 1024 --steps 25 --clip clip-vit-large-patch14 \\
        --fid-reference coco-val/ --out runs/eval
"""

from __future__ import annotations

import argparse
from pathlib import Path

from koala_jax.cli.requires import require_torch
from koala_jax.cli.runner import make_parser, run
from koala_jax.data import world
from koala_jax.errors import ConfigError, MissingPathError
from koala_jax.evaluation import world_eval
from koala_jax.evaluation.generators import BACKENDS, load_generator
from koala_jax.evaluation.real_metrics import CLIP_REPO, RealMetricInputs, score_models
from koala_jax.evaluation.report import markdown_table
from koala_jax.evaluation.text_eval import evaluate_texts
from koala_jax.files import read_prompts_file
from koala_jax.pipelines.sampling import GUIDANCE_RANGE, MAX_SIDE, MAX_STEPS, Settings, range_problem, setting_problems
from koala_jax.weights.pipeline_dir import default_image_size, is_pipeline_dir, vae_factor
from koala_jax.weights.training_run import is_training_dir


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser(__doc__)
    parser.add_argument("--model", action="append", required=True, metavar="NAME=PATH", help="a model to evaluate")
    parser.add_argument("--pipeline", help="pipeline folder for models given as U-Net sources")
    parser.add_argument("--ema", action="store_true", help="the EMA params of models that are train.py runs")
    parser.add_argument("--prompts", help=f"{' | '.join(world_eval.PROMPT_SETS)} (default: world-single)")
    parser.add_argument("--prompts-file", metavar="FILE", help="UTF-8 text, one prompt per line (real models)")
    parser.add_argument("--clip", metavar="DIR", help=f"a local CLIP folder (e.g. {CLIP_REPO}): CLIP score")
    parser.add_argument("--fid-reference", metavar="DIR", help="a folder of reference images (png/jpg/webp): FID")
    parser.add_argument("--hps-checkpoint", metavar="FILE", help="HPS_v2.1_compressed.pt (needs hpsv2): HPSv2")
    parser.add_argument("--allow-pickle", action="store_true", help="let hpsv2 load its checkpoint (a pickle)")
    parser.add_argument(
        "--seeds",
        default="0,1",
        help="comma-separated distinct seeds, each at least 0; every prompt is drawn with each",
    )
    parser.add_argument("--steps", type=int, default=20, help=f"1..{MAX_STEPS}")
    parser.add_argument("--guidance", type=float, default=5.0, help="{:g}..{:g}".format(*GUIDANCE_RANGE))
    parser.add_argument("--scheduler", default="euler", choices=("euler", "euler-trailing"))
    parser.add_argument(
        "--size",
        type=int,
        help=f"image side in pixels, up to {MAX_SIDE} (default: the pipeline's U-Net sample_size x VAE factor)",
    )
    parser.add_argument("--backend", choices=BACKENDS, default="jax", help="jax (no torch needed) or diffusers")
    parser.add_argument("--batch-size", type=int, default=16, help="at least 1")
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
    """The seeds of `--seeds`: integers, at least 0 (the noise generator's domain), each once (a seed twice would
    draw the same images twice)."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError as e:
        raise ConfigError(f"--seeds {text!r}: comma-separated integers expected") from e
    if not seeds:
        raise ConfigError("--seeds: give at least one seed")
    negative = [str(s) for s in seeds if s < 0]
    if negative:
        raise ConfigError(f"--seeds {text}: seeds must be at least 0, not {', '.join(negative)}")
    if len(set(seeds)) < len(seeds):
        raise ConfigError(f"--seeds {text}: give each seed once")
    return seeds


def parse_prompts(args: argparse.Namespace) -> tuple[list[world.Prompt] | None, list[str]]:
    """(the world prompt set, or None for a prompts file; the prompt texts)."""
    if args.prompts_file is not None and args.prompts is not None:
        raise ConfigError("give --prompts (a world set) or --prompts-file, not both")
    if args.prompts_file is not None:
        return None, read_prompts_file(args.prompts_file)
    args.prompts = args.prompts or "world-single"
    prompts = world_eval.prompt_set(args.prompts)
    return prompts, [p.text for p in prompts]


def real_metric_inputs(args: argparse.Namespace) -> RealMetricInputs:
    """The real-model metrics asked for, their folders and files checked (nothing is loaded)."""
    inputs = RealMetricInputs(
        clip_dir=None if args.clip is None else Path(args.clip),
        fid_reference=None if args.fid_reference is None else Path(args.fid_reference),
        hps_checkpoint=None if args.hps_checkpoint is None else Path(args.hps_checkpoint),
        allow_pickle=args.allow_pickle,
    )
    inputs.check()
    return inputs


def require_torch_for(args: argparse.Namespace) -> None:
    """One line, before anything else, when what was asked for needs PyTorch and it is not installed."""
    if args.backend == "diffusers":
        require_torch("--backend diffusers", "--backend jax (the default), which needs no torch")
    metrics = {"--clip": args.clip, "--fid-reference": args.fid_reference, "--hps-checkpoint": args.hps_checkpoint}
    asked = [flag for flag, value in metrics.items() if value is not None]
    if asked:
        require_torch(f"{', '.join(asked)} (real-model metrics)", "a world prompt set, scored without torch")


def checked_settings(args: argparse.Namespace, models: dict[str, tuple[str, str | None]]) -> Settings:
    """The sampling settings with every value in range and the size drawable by the backend with each model's
    VAE: the model's own size by default (configs only, before any model loads; all problems in one error)."""
    pipelines = list(dict.fromkeys(pipeline for pipeline, _ in models.values()))
    size = default_image_size(pipelines[0]) if args.size is None else args.size
    settings = Settings(steps=args.steps, guidance=args.guidance, scheduler=args.scheduler, height=size, width=size)
    flags = {"steps": "--steps", "guidance": "--guidance", "height": "--size", "width": "--size"}
    problems = [range_problem("--batch-size", args.batch_size, 1)]
    for pipeline in pipelines:
        problems += setting_problems(settings, args.backend, vae_factor(pipeline), flags)
    problems = list(dict.fromkeys(p for p in problems if p))
    if problems:
        raise ConfigError("; ".join(problems))
    return settings


def evaluate(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    require_torch_for(args)
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise ConfigError(f"--out {args.out} is a file, not a folder")
    world_prompts, texts = parse_prompts(args)
    seeds = parse_seeds(args.seeds)
    if args.pipeline and not is_pipeline_dir(args.pipeline):
        raise MissingPathError(f"--pipeline {args.pipeline}: not a diffusers pipeline folder (no model_index.json)")
    models = parse_models(args.model, args.pipeline)
    settings = checked_settings(args, models)
    metrics = real_metric_inputs(args)
    generators = {
        name: load_generator(
            args.backend,
            pipeline,
            unet,
            settings,
            args.ema and unet is not None and is_training_dir(unet),
            args.batch_size,
        )
        for name, (pipeline, unet) in models.items()
    }
    if world_prompts is None:
        report = evaluate_texts(generators, texts, seeds)
    else:
        report = world_eval.evaluate_world(generators, world_prompts, seeds, reference=next(iter(models))).report()
    if metrics.names():
        item_prompts = [item["prompt"] for item in report.items]
        report.add_metrics(score_models(report.images, item_prompts, metrics, args.batch_size), metrics.names())
    report.write(Path(args.out), {**vars(args), "size": settings.height})
    print(markdown_table(report.rows(), report.columns))
    print(f"wrote report.json, report.md and grid.png to {Path(args.out).absolute()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(evaluate, argv)
