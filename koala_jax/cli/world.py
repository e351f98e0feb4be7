"""The tiny world: render captioned scenes, and build its pipeline components from scratch.

    python -m koala_jax.cli.world render --count 16 --out runs/tiny_world/preview --style rich
    python -m koala_jax.cli.world components --out runs/tiny_world/components

`render` writes PNGs with their captions (and a grid) to look at; `components` trains the VAE and writes the
frozen word-level text encoders, tokenizers and scheduler (everything but the U-Net; needs torch). The whole
rebuild of the shipped teacher is in configs/tiny_world_teacher.py and docs/tiny_world.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image

from koala_jax.cli.runner import make_parser, run
from koala_jax.data import world
from koala_jax.errors import ConfigError
from koala_jax.evaluation import detector
from koala_jax.weights.atomic import atomic_output_dir, check_output_free

RECONSTRUCTION_CHECK = 300  # held-out scenes whose VAE reconstructions the detector reads


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser(__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    render = commands.add_parser("render", help="PNGs of scenes with their captions")
    render.add_argument("--count", type=int, default=16)
    render.add_argument("--seed", type=int, default=0)
    render.add_argument("--style", choices=world.CAPTION_MIXES, default="rich")
    render.add_argument("--resolution", type=int, default=64)
    render.add_argument("--out", required=True)
    components = commands.add_parser("components", help="train the VAE, write the pipeline minus its U-Net")
    components.add_argument("--out", required=True)
    components.add_argument("--seed", type=int, default=0)
    components.add_argument("--vae-steps", type=int, default=4000)
    components.add_argument("--vae-images", type=int, default=8192)
    components.add_argument("--overwrite", action="store_true")
    components.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="torch CPU threads (more are often slower on a busy 2-core machine: spinning OpenMP threads)",
    )
    return parser


def cmd_render(args: argparse.Namespace) -> None:
    if args.count < 1 or args.resolution < 16:
        raise ConfigError(f"--count {args.count} and --resolution {args.resolution}: need at least 1 scene of 16 px")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    collection = world.WorldCollection(args.count, args.seed, args.style, args.resolution)
    lines, images = [], []
    for i in range(args.count):
        image = world.render(collection.scene(i), args.resolution)
        Image.fromarray(image).save(out / f"{i:04d}.png")
        lines.append(f"{i:04d}.png\t{collection.load(i).caption}")
        images.append(image)
    (out / "captions.txt").write_text("\n".join(lines) + "\n")
    columns = int(np.ceil(np.sqrt(len(images))))
    grid = np.zeros((-(-len(images) // columns) * args.resolution, columns * args.resolution, 3), np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        grid[r * args.resolution : (r + 1) * args.resolution, c * args.resolution : (c + 1) * args.resolution] = image
    Image.fromarray(grid).save(out / "grid.png")
    print(f"wrote {args.count} scenes, captions.txt and grid.png to {out}")


def cmd_components(args: argparse.Namespace) -> None:
    check_output_free(args.out, args.overwrite)
    from koala_jax.pipelines.tiny_world import RESOLUTION, build_components, reconstruct, world_images  # torch

    start = time.perf_counter()
    with atomic_output_dir(args.out, args.overwrite) as tmp:
        report, vae = build_components(tmp, args.seed, args.vae_steps, args.vae_images, args.torch_threads)
        # How well the VAE keeps what the detector reads, on scenes it never saw (seed 7).
        scenes = world.scenes(RECONSTRUCTION_CHECK, seed=7)
        images = reconstruct(vae, world_images(RECONSTRUCTION_CHECK, seed=7))
        report["reconstruction_accuracy"] = detector.accuracy(list(images), [world.scene_spec(s) for s in scenes])
        report["seconds"] = round(time.perf_counter() - start)
        (tmp / "build_report.json").write_text(json.dumps(report, indent=2) + "\n")
    accuracy = report["reconstruction_accuracy"]
    print(
        f"wrote the tiny world's components to {Path(args.out).absolute()} in {report['seconds']} s: VAE scaling "
        f"factor {report['scaling_factor']}; the detector on {RECONSTRUCTION_CHECK} held-out reconstructions at "
        f"{RESOLUTION} px: colour {accuracy['colour']:.3f}, shape {accuracy['shape']:.3f}, all {accuracy['all']:.3f}"
    )


def world_command(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    {"render": cmd_render, "components": cmd_components}[args.command](args)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(world_command, argv)


if __name__ == "__main__":
    raise SystemExit(main())
