"""Convert SDXL-family U-Net weights (diffusers folders, original single files, hub ids, JAX params dirs,
training runs), derive KOALA students from a teacher, and export diffusers U-Net or pipeline folders or
single original-format files.

    python convert_weights.py to-jax --src sdxl-base-1.0/ --out weights/sdxl-base --dtype bf16
    python convert_weights.py to-jax --src sd_xl_base_1.0.safetensors --out weights/sdxl-base
    python convert_weights.py student --teacher sdxl-base-1.0/ --variant koala-700m --out weights/koala-700m
    python convert_weights.py student --teacher sdxl-base-1.0/ --spec ssd-1b.json --out weights/ssd-1b-init
    python convert_weights.py to-diffusers --checkpoint runs/koala-700m --ema --out export/koala-700m \\
        --dtype fp16 --pipeline sdxl-base-1.0/
    python convert_weights.py to-single-file --checkpoint runs/koala-700m --ema --out koala-700m.safetensors \\
        --dtype fp16 --pipeline sdxl-base-1.0/
    python convert_weights.py info koala-700m

Every output is written under a temporary name and renamed when complete, with a README.md model card
(`<name>.README.md` beside a single file); `--push-to-hub REPO_ID` uploads it. Errors print one line and
exit with status 1.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import numpy as np

from koala_jax.cli.requires import require_torch
from koala_jax.cli.runner import make_parser, run
from koala_jax.dtypes import NAMES as DTYPE_NAMES
from koala_jax.dtypes import dtype, short_name
from koala_jax.errors import ConvertError
from koala_jax.files import check_free_space, disk_full_as, write_json
from koala_jax.models import UNetConfig
from koala_jax.models.init import describe
from koala_jax.students import STUDENT_VARIANTS, build_student, student_architecture
from koala_jax.students.mapping import mapping_lines
from koala_jax.weights import read_source, source_config
from koala_jax.weights.atomic import atomic_output_dir, check_output_free
from koala_jax.weights.export import (
    check_pipeline,
    check_single_file_pipeline,
    export_bytes,
    materialize,
    write_jax,
    write_pipeline,
    write_single_file,
    write_unet_folder,
)
from koala_jax.weights.model_card import CARD_NAME, CardFacts, push_to_hub, single_file_card_path, write_card
from koala_jax.weights.params_dir import write_params
from koala_jax.weights.single_file import is_pickle_source
from koala_jax.weights.sources import is_hub_id
from koala_jax.weights.training_run import checkpoint_steps, is_training_dir, restore_newest_params

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


def _output_options(parser: argparse.ArgumentParser, dtype_help: str, out_help: str = "output folder") -> None:
    parser.add_argument("--out", required=True, help=f"{out_help} (must not exist unless --overwrite)")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default="fp32", help=dtype_help)
    parser.add_argument("--overwrite", action="store_true", help="replace --out once the new output is complete")


def _publish_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the output and its model card to the hub")
    parser.add_argument("--base-model", help="hub id of the teacher, for the model card's base_model")


def _run_options(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--checkpoint", required=True, help="train.py working directory, JAX params dir, or any source to-jax reads"
    )
    parser.add_argument("--ema", action="store_true", help="export the EMA params of a training run")
    parser.add_argument("--step", type=int, help="training step to export (default: the latest)")
    parser.add_argument(
        "--pipeline",
        help=f"teacher pipeline folder: {what} whose VAE and text encoders (and tokenizers, scheduler) are the "
        f"teacher's",
    )


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
    which = student.add_mutually_exclusive_group(required=True)
    which.add_argument("--variant", choices=sorted(STUDENT_VARIANTS), help="a KOALA preset")
    which.add_argument("--spec", help="a custom student spec: a .json file or inline JSON (see docs/convert.md)")
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
    _publish_options(student)

    to_diffusers = commands.add_parser("to-diffusers", help="JAX params or training checkpoint -> diffusers folder")
    _run_options(to_diffusers, "write a complete pipeline")
    _source_options(to_diffusers)
    _output_options(to_diffusers, "dtype of the exported safetensors")
    _publish_options(to_diffusers)

    single = commands.add_parser(
        "to-single-file", help="any source -> one original-format .safetensors file (ComfyUI; docs/convert.md)"
    )
    _run_options(single, "also write the VAE and both text encoders into the file,")
    _source_options(single)
    _output_options(single, "dtype of the tensors (fp16 is the usual choice)", "output .safetensors file")
    _publish_options(single)

    info = commands.add_parser("info", help="architecture per stage and exact parameter count")
    info.add_argument("target", help="preset name (sdxl-base, koala-1b, koala-700m), folder, file or training run")
    _source_options(info)
    return parser


def write_output(
    args: argparse.Namespace,
    fmt: str,
    config: UNetConfig,
    params: dict,
    where: object,
    extra: dict | None = None,
    card: CardFacts | None = None,
) -> Path:
    """Write `params` (consumed) as `fmt` into --out atomically; `extra` goes to <out>/student_init.json and
    `card` to <out>/README.md."""
    cast = dtype(args.dtype)
    pipeline = Path(args.pipeline) if getattr(args, "pipeline", None) else None
    if pipeline:
        check_pipeline(pipeline, config)  # Fail before any expensive writing.
    needed = export_bytes(config, cast, pipeline) + (export_bytes(config, cast) if fmt == "both" else 0)
    out = Path(args.out).absolute()
    check_free_space(out, needed, "the export")
    with disk_full_as(out, needed), atomic_output_dir(out, args.overwrite) as tmp:
        if fmt == "both":
            params = materialize(params, cast, where)
            write_params(tmp / "jax", params, config)
        if fmt == "jax":
            write_jax(tmp, config, params, cast, where)
        elif pipeline:
            write_pipeline(tmp, pipeline, config, params, cast, where)
        else:
            write_unet_folder(tmp / "unet" if fmt == "both" else tmp, config, params, cast, where)
        if extra is not None:
            write_json(tmp / STUDENT_INIT, extra)
        if card is not None:
            write_card(tmp / CARD_NAME, card)
    return out


def _count(params: dict) -> int:
    return sum(int(np.prod(np.shape(leaf))) for leaf in jax.tree.leaves(params))


def _base_model(args: argparse.Namespace, teacher: str | None) -> str | None:
    """The card's base_model: --base-model, else a teacher given as a hub id."""
    return args.base_model or (teacher if teacher and is_hub_id(teacher) and not Path(teacher).exists() else None)


def _card(args: argparse.Namespace, config: UNetConfig, kind: str, source: str, **facts) -> CardFacts:
    title = Path(args.out).stem if kind.startswith("single-file") else Path(args.out).name
    return CardFacts(
        title=title,
        config=config,
        kind=kind,
        dtype=short_name(dtype(args.dtype)),
        source=source,
        base_model=_base_model(args, facts.get("teacher")),
        **facts,
    )


def _training_facts(args: argparse.Namespace, step: int | None) -> dict | None:
    """Steps of a training-run source (`step`: the one exported), for the card (None for other sources)."""
    if step is None:
        return None
    steps = checkpoint_steps(args.checkpoint)
    return {
        "training steps (exported checkpoint)": step,
        "parameters": "EMA" if args.ema else "raw (not EMA)",
        "checkpoints saved": ", ".join(map(str, steps)),
    }


def _publish(args: argparse.Namespace, out: Path, single_file: bool = False) -> None:
    if not args.push_to_hub:
        return
    if single_file:
        url = push_to_hub(args.push_to_hub, files={out.name: out, CARD_NAME: single_file_card_path(out)})
    else:
        url = push_to_hub(args.push_to_hub, folder=out)
    print(f"uploaded to {url}")


def cmd_to_jax(args: argparse.Namespace) -> None:
    config, params = read_source(args.src, args.config, args.allow_pickle, check_values=False)
    print(f"read {args.src}: {_count(params):,} parameters")
    out = write_output(args, "jax", config, params, args.src)
    print(f"wrote JAX params ({args.dtype}) to {out}")


def cmd_student(args: argparse.Namespace) -> None:
    if args.pipeline and args.format == "jax":
        raise ConvertError("--pipeline writes a diffusers pipeline; use it with --format diffusers or both")
    if args.push_to_hub and args.format == "jax":
        raise ConvertError("--push-to-hub uploads a diffusers export; use it with --format diffusers or both")
    which = args.variant or args.spec
    # The spec is checked against the teacher's config before any teacher weight is read.
    student_architecture(source_config(args.teacher, args.config, args.allow_pickle)[0], which)
    teacher_config, teacher_params = read_source(args.teacher, args.config, args.allow_pickle, check_values=False)
    student = build_student(teacher_config, teacher_params, which, seed=args.seed)
    del teacher_params  # Teacher tensors the student does not keep are never read.
    print(
        f"{args.variant or 'custom spec'} from {args.teacher}: {_count(student.params):,} parameters, "
        f"{len(student.mapping)} tensors from the teacher, {len(student.fresh)} fresh"
    )
    print("student <- teacher:")
    print("\n".join(f"  {line}" for line in mapping_lines(student.mapping)))
    print("fresh (random init): " + (", ".join(student.fresh) if student.fresh else "none"))
    extra = {
        "teacher": str(args.teacher),
        **({"variant": args.variant} if args.variant else {"spec": args.spec}),
        "config": student.config.to_diffusers(),
        "selection": {k: list(v) for k, v in student.selection.items()},
        "mapping": student.mapping,
        "fresh": student.fresh,
    }
    card = None
    if args.format != "jax":
        kind = "pipeline" if args.pipeline else "unet"
        summary = {
            "derived as": args.variant or f"spec {args.spec}",
            "tensors from the teacher": len(student.mapping),
            "fresh": len(student.fresh),
        }
        card = _card(args, student.config, kind, str(args.teacher), teacher=str(args.teacher), student=summary)
    out = write_output(args, args.format, student.config, student.params, args.teacher, extra, card)
    print(f"wrote {args.format} student ({args.dtype}) to {out}")
    _publish(args, out)


def cmd_to_diffusers(args: argparse.Namespace) -> None:
    if args.pipeline:  # Check the teacher pipeline before reading (possibly restoring) any weights.
        check_pipeline(Path(args.pipeline), source_config(args.checkpoint, args.config, args.allow_pickle)[0])
    config, params, step = _read_checkpoint(args)
    kind = "pipeline" if args.pipeline else "unet"
    card = _card(args, config, kind, args.checkpoint, training=_training_facts(args, step))
    out = write_output(args, "diffusers", config, params, args.checkpoint, card=card)
    print(f"wrote diffusers {'pipeline' if args.pipeline else 'U-Net'} ({args.dtype}) to {out}")
    _publish(args, out)


def _read_checkpoint(args: argparse.Namespace) -> tuple[UNetConfig, dict, int | None]:
    """(config, params, the step exported when --checkpoint is a training run: the newest readable one)."""
    step = None
    if is_training_dir(Path(args.checkpoint)):
        config, params, step = restore_newest_params(args.checkpoint, args.ema, args.step)
    else:
        config, params = read_source(
            args.checkpoint, args.config, args.allow_pickle, ema=args.ema, step=args.step, check_values=False
        )
    print(f"read {args.checkpoint}{' (EMA)' if args.ema else ''}: {_count(params):,} parameters")
    return config, params, step


def cmd_to_single_file(args: argparse.Namespace) -> None:
    out = Path(args.out).absolute()
    if out.suffix != ".safetensors":
        raise ConvertError(f"--out {args.out}: a single file is written as .safetensors")
    pipeline = Path(args.pipeline) if args.pipeline else None
    if pipeline:  # Before reading (possibly restoring) any weights.
        check_single_file_pipeline(pipeline, source_config(args.checkpoint, args.config, args.allow_pickle)[0])
    check_output_free(single_file_card_path(out), args.overwrite)
    config, params, step = _read_checkpoint(args)
    kind = "single-file-pipeline" if pipeline else "single-file-unet"
    card = _card(args, config, kind, args.checkpoint, training=_training_facts(args, step))
    out.parent.mkdir(parents=True, exist_ok=True)
    needed = export_bytes(config, dtype(args.dtype), pipeline, single_file=True)
    check_free_space(out, needed, "the export")
    with disk_full_as(out, needed):
        write_single_file(out, config, params, dtype(args.dtype), pipeline, args.checkpoint)
        write_card(single_file_card_path(out), card)
    print(f"wrote single file ({'U-Net, VAE, text encoders' if pipeline else 'U-Net'}, {args.dtype}) to {out}")
    _publish(args, out, single_file=True)


def cmd_info(args: argparse.Namespace) -> None:
    config, what = source_config(args.target, args.config, args.allow_pickle)
    print(what)
    print("\n".join(describe(config)))


COMMANDS = {
    "to-jax": cmd_to_jax,
    "student": cmd_student,
    "to-diffusers": cmd_to_diffusers,
    "to-single-file": cmd_to_single_file,
    "info": cmd_info,
}


# The argument that names each command's weights source.
SOURCE_ARGS = {
    "to-jax": "src",
    "student": "teacher",
    "to-diffusers": "checkpoint",
    "to-single-file": "checkpoint",
    "info": "target",
}


def require_torch_for_pickles(args: argparse.Namespace) -> None:
    """A pickle source is read with torch.load: without torch, that is one line before anything is read."""
    src = getattr(args, SOURCE_ARGS[args.command])
    if args.allow_pickle and is_pickle_source(src):
        require_torch(f"--allow-pickle ({src} is a torch pickle)", "a .safetensors copy of it, which needs no torch")


def convert(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    require_torch_for_pickles(args)
    if args.command != "info":
        check_output_free(args.out, args.overwrite)  # Before reading gigabytes; again before writing.
    COMMANDS[args.command](args)
    if args.command != "info":
        print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(convert, argv)
