"""Convert SDXL-family U-Net weights (diffusers folders, original single files, hub ids, JAX params dirs,
training runs), derive KOALA students from a teacher, and export diffusers U-Net or pipeline folders.

    python convert_weights.py to-jax --src sdxl-base-1.0/ --out weights/sdxl-base --dtype bf16
    python convert_weights.py to-jax --src sd_xl_base_1.0.safetensors --out weights/sdxl-base
    python convert_weights.py student --teacher sdxl-base-1.0/ --variant koala-700m --out weights/koala-700m
    python convert_weights.py to-diffusers --checkpoint runs/koala-700m --ema --out export/koala-700m \\
        --dtype fp16 --pipeline sdxl-base-1.0/
    python convert_weights.py info koala-700m

Every output is written under a temporary name and renamed when complete. Errors print one line and
exit with status 1.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import numpy as np

from koala_jax.cli.runner import make_parser, run
from koala_jax.dtypes import NAMES as DTYPE_NAMES
from koala_jax.dtypes import dtype
from koala_jax.errors import ConvertError
from koala_jax.models import UNetConfig
from koala_jax.models.init import describe
from koala_jax.students import STUDENT_VARIANTS, build_student
from koala_jax.students.mapping import mapping_lines
from koala_jax.weights import read_source, source_config
from koala_jax.weights.atomic import atomic_output_dir, check_output_free
from koala_jax.weights.export import check_pipeline, materialize, write_jax, write_pipeline, write_unet_folder
from koala_jax.weights.params_dir import write_params

STUDENT_INIT = "student_init.json"


def _source_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        help="diffusers U-Net config.json (or its folder) for a single-file "
        "checkpoint; inferred from the weights when omitted",
    )
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="also read .ckpt/.bin/.pt pickles (with torch.load(weights_only=True))",
    )


def _output_options(parser: argparse.ArgumentParser, dtype_help: str) -> None:
    parser.add_argument("--out", required=True, help="output folder (must not exist unless --overwrite)")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default="fp32", help=dtype_help)
    parser.add_argument("--overwrite", action="store_true", help="replace --out once the new output is complete")


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser(__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    to_jax = commands.add_parser("to-jax", help="teacher weights -> JAX params dir (what train.py reads)")
    to_jax.add_argument(
        "--src",
        required=True,
        help="diffusers U-Net or pipeline folder, single-file checkpoint, "
        "JAX params dir, training run, or hub id (org/name)",
    )
    _source_options(to_jax)
    _output_options(to_jax, "parameter dtype of the JAX params")

    student = commands.add_parser("student", help="derive a KOALA student initialised from the teacher's blocks")
    student.add_argument("--teacher", required=True, help="any source that to-jax reads")
    student.add_argument("--variant", required=True, choices=sorted(STUDENT_VARIANTS))
    student.add_argument(
        "--format",
        choices=("jax", "diffusers", "both"),
        default="jax",
        help="JAX params dir, diffusers folder, or both (in <out>/jax and <out>/unet)",
    )
    student.add_argument(
        "--pipeline", help="teacher pipeline folder: write a complete pipeline (with --format diffusers or both)"
    )
    student.add_argument("--seed", type=int, default=0, help="for parameters without a teacher source, if any")
    _source_options(student)
    _output_options(student, "parameter dtype of the student")

    to_diffusers = commands.add_parser("to-diffusers", help="JAX params or training checkpoint -> diffusers folder")
    to_diffusers.add_argument(
        "--checkpoint",
        required=True,
        help="train.py working directory, JAX params dir, or any source that to-jax reads",
    )
    to_diffusers.add_argument("--ema", action="store_true", help="export the EMA params of a training run")
    to_diffusers.add_argument("--step", type=int, help="training step to export (default: the latest)")
    to_diffusers.add_argument(
        "--pipeline",
        help="teacher pipeline folder: write a complete pipeline whose VAE, "
        "text encoders, tokenizers and scheduler are the teacher's",
    )
    _source_options(to_diffusers)
    _output_options(to_diffusers, "dtype of the exported safetensors")

    info = commands.add_parser("info", help="architecture per stage and exact parameter count")
    info.add_argument("target", help="preset name (sdxl-base, koala-1b, koala-700m), folder, file or training run")
    _source_options(info)
    return parser


def write_output(
    args: argparse.Namespace, fmt: str, config: UNetConfig, params: dict, extra: dict | None = None
) -> Path:
    """Write `params` (consumed) as `fmt` into --out atomically; `extra` goes to <out>/student_init.json."""
    cast = dtype(args.dtype)
    pipeline = Path(args.pipeline) if getattr(args, "pipeline", None) else None
    if pipeline:
        check_pipeline(pipeline, config)  # Fail before any expensive writing.
    with atomic_output_dir(args.out, args.overwrite) as tmp:
        if fmt == "both":
            params = materialize(params, cast)
            write_params(tmp / "jax", params, config)
        if fmt == "jax":
            write_jax(tmp, config, params, cast)
        elif pipeline:
            write_pipeline(tmp, pipeline, config, params, cast)
        else:
            write_unet_folder(tmp / "unet" if fmt == "both" else tmp, config, params, cast)
        if extra is not None:
            (tmp / STUDENT_INIT).write_text(json.dumps(extra, indent=2) + "\n")
    return Path(args.out).absolute()


def _count(params: dict) -> int:
    return sum(int(np.prod(np.shape(leaf))) for leaf in jax.tree.leaves(params))


def cmd_to_jax(args: argparse.Namespace) -> None:
    config, params = read_source(args.src, args.config, args.allow_pickle)
    print(f"read {args.src}: {_count(params):,} parameters")
    out = write_output(args, "jax", config, params)
    print(f"wrote JAX params ({args.dtype}) to {out}")


def cmd_student(args: argparse.Namespace) -> None:
    if args.pipeline and args.format == "jax":
        raise ConvertError("--pipeline writes a diffusers pipeline; use it with --format diffusers or both")
    teacher_config, teacher_params = read_source(args.teacher, args.config, args.allow_pickle)
    student = build_student(teacher_config, teacher_params, args.variant, seed=args.seed)
    del teacher_params  # Teacher tensors the student does not keep are never read.
    print(
        f"{args.variant} from {args.teacher}: {_count(student.params):,} parameters, {len(student.mapping)} "
        f"tensors from the teacher, {len(student.fresh)} fresh"
    )
    print("student <- teacher:")
    print("\n".join(f"  {line}" for line in mapping_lines(student.mapping)))
    print("fresh (random init): " + (", ".join(student.fresh) if student.fresh else "none"))
    extra = {"teacher": str(args.teacher), "variant": args.variant, "mapping": student.mapping, "fresh": student.fresh}
    out = write_output(args, args.format, student.config, student.params, extra)
    print(f"wrote {args.format} student ({args.dtype}) to {out}")


def cmd_to_diffusers(args: argparse.Namespace) -> None:
    if args.pipeline:  # Check the teacher pipeline before reading (possibly restoring) any weights.
        check_pipeline(Path(args.pipeline), source_config(args.checkpoint, args.config, args.allow_pickle)[0])
    config, params = read_source(args.checkpoint, args.config, args.allow_pickle, ema=args.ema, step=args.step)
    print(f"read {args.checkpoint}{' (EMA)' if args.ema else ''}: {_count(params):,} parameters")
    out = write_output(args, "diffusers", config, params)
    print(f"wrote diffusers {'pipeline' if args.pipeline else 'U-Net'} ({args.dtype}) to {out}")


def cmd_info(args: argparse.Namespace) -> None:
    config, what = source_config(args.target, args.config, args.allow_pickle)
    print(what)
    print("\n".join(describe(config)))


COMMANDS = {"to-jax": cmd_to_jax, "student": cmd_student, "to-diffusers": cmd_to_diffusers, "info": cmd_info}


def convert(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    if args.command != "info":
        check_output_free(args.out, args.overwrite)  # Before reading gigabytes; again before writing.
    COMMANDS[args.command](args)
    if args.command != "info":
        print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(convert, argv)
