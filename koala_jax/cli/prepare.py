"""Encode image-caption pairs once with the teacher's VAE and text encoders.

    python prepare_data.py --input photos/ --teacher sdxl-base/ --output-dir data/koala-1024

writes ArrayRecord shards of latents, text embeddings and SDXL micro-conditioning that
train.py reads (see docs/data.md). Rerun the same command to resume after a crash.
`--backend jax` encodes with the JAX VAE and text encoders (no torch; TPU hosts), each batch
split over the local devices; with `--distributed` every host of a pod runs the same command and
takes its own share of the shards.
"""

from __future__ import annotations

import argparse
import logging
import math

from koala_jax.cli.requires import require_torch, torch_available
from koala_jax.cli.runner import make_parser, run
from koala_jax.data import ingest
from koala_jax.errors import ConfigError, KoalaError


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser(__doc__)
    io = parser.add_argument_group("input and output")
    io.add_argument(
        "--input",
        required=True,
        help="folder, .csv/.tsv/.parquet table, .tar shard(s) (file, folder or glob), or a tfds name/folder",
    )
    io.add_argument(
        "--input-kind",
        choices=ingest.INPUT_KINDS,
        default="auto",
        help="input form (default: guessed from --input)",
    )
    io.add_argument(
        "--output-dir",
        required=True,
        help="folder for the shards; rerun with the same one to resume",
    )
    io.add_argument(
        "--teacher",
        required=True,
        help="diffusers SDXL folder with vae/, text_encoder(_2)/, tokenizer(_2)/",
    )
    io.add_argument(
        "--caption-key",
        default="caption",
        help=".json caption field (folder, webdataset) or tfds caption feature",
    )
    io.add_argument("--image-key", default="image", help="tfds image feature")
    io.add_argument("--image-column", default="image", help="table column of image paths or downloaded URLs")
    io.add_argument("--caption-column", default="caption", help="table column of captions")
    io.add_argument(
        "--image-root",
        default=None,
        help="folder table paths are relative to (default: the table's folder)",
    )
    io.add_argument("--tfds-split", default="train")
    io.add_argument("--tfds-data-dir", default=None, help="tfds data_dir when --input is a dataset name")

    filters = parser.add_argument_group("filters (records failing one are counted as filtered)")
    filters.add_argument(
        "--min-side",
        type=int,
        default=0,
        help="drop images whose shorter side is below this many pixels",
    )
    filters.add_argument("--min-aspect", type=float, default=0.0, help="drop images with width/height below this")
    filters.add_argument(
        "--max-aspect",
        type=float,
        default=math.inf,
        help="drop images with width/height above this",
    )
    filters.add_argument("--min-caption-words", type=int, default=0, help="drop captions with fewer words")

    encode = parser.add_argument_group("encoding")
    encode.add_argument(
        "--resolution",
        type=int,
        default=1024,
        help="square target size: short side resized, then center crop",
    )
    encode.add_argument("--batch-size", type=int, default=16)
    encode.add_argument(
        "--backend",
        choices=("torch", "jax"),
        default=None,
        help="encoders: diffusers/transformers (torch; the default where torch is installed) or our Flax modules "
        "(jax: no torch, all local devices; the default without torch)",
    )
    encode.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "float16", "bfloat16"),
        help="text encoder dtype (SDXL's VAE stays float32)",
    )
    encode.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    encode.add_argument("--num-threads", type=int, default=4, help="threads reading and decoding images")
    encode.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="torch CPU threads (1 can be much faster on a busy CPU)",
    )

    shards = parser.add_argument_group("shards")
    shards.add_argument("--records-per-shard", type=int, default=1000, help="input records per output shard")
    shards.add_argument(
        "--task-index",
        type=int,
        default=None,
        help="this machine's share of the shards: k with k %% task-count == task-index "
        "(default: 0; the JAX process index with --backend jax)",
    )
    shards.add_argument(
        "--task-count", type=int, default=None, help="default: 1; the JAX process count with --backend jax"
    )
    shards.add_argument(
        "--distributed",
        action="store_true",
        help="--backend jax on several hosts (TPU pod, SLURM): jax.distributed.initialize() first",
    )
    return parser


def task_share(args: argparse.Namespace) -> tuple[int, int]:
    """(task index, task count): as given, else this JAX process's index and the process count (jax backend;
    after --distributed these are the host's place in the pod), else one task."""
    if args.backend == "jax":
        import jax

        if args.distributed:
            jax.distributed.initialize()
        index, count = jax.process_index(), jax.process_count()
    else:
        index, count = 0, 1
    given = args.task_index, args.task_count
    return (index if given[0] is None else given[0], count if given[1] is None else given[1])


def choose_backend(args: argparse.Namespace) -> str:
    """--backend as given (torch refused in one line when it is not installed), else torch where it is installed
    (or where a torch-only flag asks for it) and the JAX backend, which gives the same records, where it is not."""
    if args.backend is None and not (torch_available() or args.device or args.torch_threads):
        print("note: torch is not installed: encoding with --backend jax (the same records within float16 rounding)")
        return "jax"
    backend = args.backend or "torch"
    if backend == "torch":
        require_torch("--backend torch", "--backend jax, which needs no torch")
    return backend


def prepare(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    args.backend = choose_backend(args)
    if args.backend == "jax" and (args.device or args.torch_threads):
        raise ConfigError("--device and --torch-threads are for --backend torch")
    if args.distributed and args.backend != "jax":
        raise ConfigError("--distributed is for --backend jax")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from koala_jax.data import prepare  # imported only once the arguments are fine

    if args.torch_threads:
        prepare.set_torch_threads(args.torch_threads)
    task_index, task_count = task_share(args)

    options = ingest.InputOptions(
        caption_key=args.caption_key,
        image_key=args.image_key,
        image_column=args.image_column,
        caption_column=args.caption_column,
        image_root=args.image_root,
        split=args.tfds_split,
        tfds_data_dir=args.tfds_data_dir,
    )
    config = prepare.PrepareConfig(
        output_dir=args.output_dir,
        teacher=args.teacher,
        resolution=args.resolution,
        filters=ingest.Filters(args.min_side, args.min_aspect, args.max_aspect, args.min_caption_words),
        records_per_shard=args.records_per_shard,
        batch_size=args.batch_size,
        dtype=args.dtype,
        device=args.device,
        num_threads=args.num_threads,
        task_index=task_index,
        task_count=task_count,
        backend=args.backend,
    )
    problems = config.problems()  # Every mistake in one message, before a model is loaded or a file written.
    try:
        collection = ingest.open_collection(args.input, args.input_kind, options)
    except (KoalaError, OSError) as e:
        raise ConfigError("; ".join([*problems, f"--input: {e}"])) from e
    if problems:
        raise ConfigError("; ".join(problems))
    report = prepare.prepare_dataset(collection, config)
    if report is None:
        print("this task's shards are done; rerun any task after all finish to write the metadata")
    else:
        print(report.summary())
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(prepare, argv)
