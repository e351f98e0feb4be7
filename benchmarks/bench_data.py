"""Data throughput: records/s of the grain loader, and images/s of the preparation.

    python benchmarks/bench_data.py                      # SDXL-sized records, loader only
    python benchmarks/bench_data.py --encode             # also time prepare (tiny teacher)
    python benchmarks/bench_data.py --encode --teacher sdxl-base/ --resolution 1024

Loading is timed on a prepared dataset written here with SDXL-sized records (latents
4x128x128, prompt_embeds 77x2048, pooled 1280, float16) and on `SyntheticSource`
(no disk, no decoding), with reading threads only and with worker processes. Encoding
times `prepare_dataset` on generated JPEGs; with the tiny random teacher it measures
the pipeline around the encoders (decoding, resizing, serialization, writing), with a
real teacher on a GPU the encoders themselves. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import io
import json
import os
import platform
import tempfile
import time
from typing import Any

import numpy as np
from array_record.python import array_record_module
from PIL import Image

from koala_jax.data import SyntheticSource, make_train_loader, open_source, schema

DEFAULT_OUTPUT = os.path.join(os.path.dirname(__file__), "results", "bench_data.json")


@dataclasses.dataclass(frozen=True)
class Shapes:
    latent: tuple[int, int, int]
    text_dim: int
    pooled_dim: int


def write_dataset(data_dir: str, num_records: int, shapes: Shapes, records_per_shard: int) -> None:
    """A prepared dataset of random records, in prepare_data.py's exact format."""
    os.makedirs(os.path.join(data_dir, schema.INCOMPLETE_DIR), exist_ok=True)
    features = schema.record_features(shapes.latent, shapes.text_dim, shapes.pooled_dim)
    source = SyntheticSource(num_records, shapes.latent, schema.TEXT_LENGTH, shapes.text_dim, shapes.pooled_dim)
    lengths = []
    for shard, start in enumerate(range(0, num_records, records_per_shard)):
        stop = min(start + records_per_shard, num_records)
        num_shards = -(-num_records // records_per_shard)
        path = os.path.join(data_dir, schema.shard_filename(shard, num_shards))
        writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
        for index in range(start, stop):
            writer.write(features.serialize_example(source[index]))
        writer.close()
        lengths.append(stop - start)
    schema.write_tfds_metadata(data_dir, features, lengths)


def time_loader(source: Any, batch_size: int, num_batches: int, num_workers: int) -> float:
    """Records/s after the first batch (worker start-up excluded)."""
    loader = make_train_loader(
        source,
        global_batch_size=batch_size,
        seed=0,
        process_index=0,
        process_count=1,
        num_workers=num_workers,
    )
    next(loader)
    start = time.perf_counter()
    for _ in range(num_batches):
        next(loader)
    elapsed = time.perf_counter() - start
    loader.close()
    return num_batches * batch_size / elapsed


def bench_loading(args: argparse.Namespace, work_dir: str) -> list[dict[str, Any]]:
    shapes = Shapes((4, args.latent_size, args.latent_size), args.text_dim, args.pooled_dim)
    data_dir = os.path.join(work_dir, "prepared")
    write_dataset(data_dir, args.records, shapes, records_per_shard=max(1, args.records // 4))
    sources = {
        "prepared (ArrayRecord)": open_source(data_dir),
        "synthetic": SyntheticSource(args.records, shapes.latent, 77, shapes.text_dim, shapes.pooled_dim),
    }
    rows = []
    for name, source in sources.items():
        for workers in args.workers:
            rate = time_loader(source, args.batch_size, args.batches, workers)
            rows.append(
                {
                    "bench": "load",
                    "source": name,
                    "workers": workers,
                    "batch": args.batch_size,
                    "latent": list(shapes.latent),
                    "records_per_s": round(rate, 1),
                }
            )
    return rows


def write_jpegs(folder: str, count: int, size: int) -> None:
    os.makedirs(folder)
    rng = np.random.default_rng(0)
    for i in range(count):
        pixels = rng.integers(0, 256, (size, size * 4 // 3, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
        with open(os.path.join(folder, f"{i:06d}.jpg"), "wb") as f:
            f.write(buffer.getvalue())
        with open(os.path.join(folder, f"{i:06d}.txt"), "w") as f:
            f.write(f"a photo of random noise number {i}, rich in detail and color")


def bench_encoding(args: argparse.Namespace, work_dir: str) -> list[dict[str, Any]]:
    import torch

    from koala_jax.data import ingest, prepare

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    teacher = args.teacher
    if teacher is None:
        from koala_jax.pipelines.tiny import save_tiny_sdxl_components

        teacher = os.path.join(work_dir, "tiny_teacher")
        save_tiny_sdxl_components(teacher)
    images = os.path.join(work_dir, "images")
    write_jpegs(images, args.encode_images, args.resolution)
    config = prepare.PrepareConfig(
        output_dir=os.path.join(work_dir, "encoded"),
        teacher=teacher,
        resolution=args.resolution,
        records_per_shard=args.encode_images,
        batch_size=args.encode_batch,
        device=args.device,
    )
    start = time.perf_counter()
    report = prepare.prepare_dataset(ingest.open_collection(images), config)
    elapsed = time.perf_counter() - start
    return [
        {
            "bench": "encode",
            "teacher": "tiny random" if args.teacher is None else args.teacher,
            "resolution": args.resolution,
            "batch": args.encode_batch,
            "images": report.kept,
            "device": str(prepare.TeacherEncoders.default_device(args.device)),
            "images_per_s": round(report.kept / elapsed, 1),
        }
    ]


def print_table(rows: list[dict[str, Any]]) -> None:
    for row in rows:
        detail = ", ".join(f"{k}={v}" for k, v in row.items() if not k.endswith("_per_s") and k != "bench")
        rate = next(f"{v} {k.removesuffix('_per_s')}/s" for k, v in row.items() if k.endswith("_per_s"))
        print(f"{row['bench']:<7} {rate:>20}   {detail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=256, help="records in the loading dataset")
    parser.add_argument("--latent-size", type=int, default=128, help="latent side (SDXL 1024px: 128)")
    parser.add_argument("--text-dim", type=int, default=2048)
    parser.add_argument("--pooled-dim", type=int, default=1280)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--batches", type=int, default=30, help="timed batches per configuration")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--encode", action="store_true", help="also time prepare_dataset")
    parser.add_argument("--teacher", default=None, help="SDXL folder (default: tiny random teacher)")
    parser.add_argument(
        "--resolution",
        type=int,
        default=64,
        help="encoding resolution (the tiny VAE attends over all latent pixels: keep it small)",
    )
    parser.add_argument("--encode-images", type=int, default=64)
    parser.add_argument("--encode-batch", type=int, default=16)
    parser.add_argument("--device", default=None)
    parser.add_argument("--torch-threads", type=int, default=None, help="torch CPU threads for --encode")
    parser.add_argument("--output", default=DEFAULT_OUTPUT, help="JSON results file")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as work_dir:
        rows = bench_loading(args, work_dir)
        if args.encode:
            rows += bench_encoding(args, work_dir)
    print_table(rows)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    result = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "args": vars(args),
        "results": rows,
    }
    with open(args.output, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
