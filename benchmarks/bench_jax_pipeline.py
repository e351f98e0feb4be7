"""JAX vs PyTorch on the teacher side, on the same device: images/s of the encode-once data step
(prepare_data.py's encoders: VAE posterior mean of each image and both text encoders of its caption) and
seconds per image of text-to-image sampling (sample.py's `--backend jax` vs `--backend diffusers`).

    python benchmarks/bench_jax_pipeline.py                      # tiny and mid-size random pipelines
    python benchmarks/bench_jax_pipeline.py --sizes tiny --torch-threads 2

Pipelines are built here with random weights (nothing is downloaded):
- tiny: the tests' pipeline (koala_jax.pipelines.tiny: 2-stage VAE at width 8-16, 2-layer 32-wide text
  encoders) with a 2-stage micro U-Net; 64 px images.
- mid: SDXL's layouts at reduced width: VAE with 4 stages of 64-256 channels (SDXL: 128-512), text
  encoders of 6 layers, 384 and 512 wide (SDXL: 12 x 768 and 32 x 1280), a 3-stage U-Net of 64-256
  channels with transformer depths 0/1/2 (KOALA-700M: 320-1280, 0/2/5); 256 px images.
- sdxl: SDXL's own VAE and text encoders (the tiny tokenizers' vocabulary) with a KOALA-700M U-Net;
  1024 px images (an accelerator's job).
Both backends run `--dtype` (float32 by default; SDXL's VAE stays float32, force_upcast) on `--device`
(torch's; JAX uses its default backend); the first call (compilation, allocation) is excluded. Prints a
table and writes JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import tempfile
import time
from typing import Any

import jax
import numpy as np
import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from koala_jax.data import prepare
from koala_jax.data.encoders_jax import JaxTeacherEncoders
from koala_jax.pipelines import sampling
from koala_jax.pipelines.jax_sdxl import JaxSDXLPipeline
from koala_jax.pipelines.tiny import save_tiny_sdxl_components, tiny_clip_vocab
from koala_jax.students.presets import preset

DEFAULT_OUTPUT = os.path.join(os.path.dirname(__file__), "results", "bench_jax_pipeline.json")
CAPTION = "a photo of a koala reading a newspaper on a park bench, rich in detail and color"


@dataclasses.dataclass(frozen=True)
class Size:
    resolution: int
    vae: dict | None  # None: the tiny pipeline's own
    text: tuple[dict, dict] | None
    unet: dict


def _unet(channels: tuple[int, ...], depths: tuple[int, ...], heads: tuple[int, ...], text: int, pooled: int) -> dict:
    return {
        "block_out_channels": list(channels),
        "down_block_types": ["DownBlock2D"] + ["CrossAttnDownBlock2D"] * (len(channels) - 1),
        "up_block_types": ["CrossAttnUpBlock2D"] * (len(channels) - 1) + ["UpBlock2D"],
        "layers_per_block": 1,
        "transformer_layers_per_block": list(depths),
        "attention_head_dim": list(heads),
        "cross_attention_dim": text,
        "use_linear_projection": True,
        "norm_num_groups": 16,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 32,
        "projection_class_embeddings_input_dim": pooled + 6 * 32,
    }


def _clip(hidden: int, heads: int, act: str, projection: int, layers: int = 6) -> dict:
    vocab = len(tiny_clip_vocab())
    return {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": 4 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "max_position_embeddings": 77,
        "hidden_act": act,
        "projection_dim": projection,
        "bos_token_id": vocab - 2,
        "eos_token_id": vocab - 1,
        "pad_token_id": vocab - 1,
    }


SIZES = {
    "tiny": Size(64, None, None, _unet((16, 32), (1, 2), (2, 4), 64, 32)),
    "mid": Size(
        256,
        {
            "down_block_types": ["DownEncoderBlock2D"] * 4,
            "up_block_types": ["UpDecoderBlock2D"] * 4,
            "block_out_channels": [64, 128, 256, 256],
            "layers_per_block": 2,
            "latent_channels": 4,
            "norm_num_groups": 32,
            "scaling_factor": 0.13025,
        },
        (_clip(384, 6, "quick_gelu", 384), _clip(512, 8, "gelu", 512)),
        _unet((64, 128, 256), (0, 1, 2), (2, 4, 8), 384 + 512, 512),
    ),
    "sdxl": Size(
        1024,
        {
            "down_block_types": ["DownEncoderBlock2D"] * 4,
            "up_block_types": ["UpDecoderBlock2D"] * 4,
            "block_out_channels": [128, 256, 512, 512],
            "layers_per_block": 2,
            "latent_channels": 4,
            "norm_num_groups": 32,
            "scaling_factor": 0.13025,
        },
        (_clip(768, 12, "quick_gelu", 768, 12), _clip(1280, 20, "gelu", 1280, 32)),
        {k: v for k, v in preset("koala-700m").to_diffusers().items() if not k.startswith("_")},
    ),
}


def build_pipeline(folder: str, size: Size) -> None:
    """A complete StableDiffusionXLPipeline folder of random weights for `size`."""
    save_tiny_sdxl_components(folder)
    torch.manual_seed(0)
    load = {
        "vae": AutoencoderKL,
        "text_encoder": CLIPTextModel,
        "text_encoder_2": CLIPTextModelWithProjection,
        "tokenizer": CLIPTokenizer,
        "tokenizer_2": CLIPTokenizer,
        "scheduler": EulerDiscreteScheduler,
    }
    parts = {name: cls.from_pretrained(os.path.join(folder, name)) for name, cls in load.items()}
    if size.vae is not None:
        parts["vae"] = AutoencoderKL(**size.vae)
    if size.text is not None:
        parts["text_encoder"] = CLIPTextModel(CLIPTextConfig(**size.text[0]))
        parts["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**size.text[1]))
    StableDiffusionXLPipeline(unet=UNet2DConditionModel(**size.unet), **parts).save_pretrained(folder)


def timed(fn, repeats: int) -> float:
    """Seconds per call of `fn` after one warm-up call."""
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def bench_encode(folder: str, size: Size, args: argparse.Namespace) -> list[dict[str, Any]]:
    """images/s of encode_images + encode_captions on batches of `args.batch` images."""
    rng = np.random.default_rng(0)
    pixels = rng.uniform(-1, 1, (args.batch, 3, size.resolution, size.resolution)).astype(np.float32)
    captions = [CAPTION] * args.batch
    dtype = {"fp32": "float32", "bf16": "bfloat16"}[args.dtype]
    encoders = {
        "torch": prepare.TeacherEncoders(folder, args.device, dtype),
        "jax": JaxTeacherEncoders.from_folder(folder, prepare.load_tokenizers(folder), dtype),
    }
    rows = []
    for backend, encoder in encoders.items():
        seconds = timed(lambda e=encoder: (e.encode_images(pixels), e.encode_captions(captions)), args.repeats)
        rows.append({"bench": "encode", "backend": backend, "batch": args.batch, "images_per_s": args.batch / seconds})
    return rows


def bench_sample(folder: str, size: Size, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Seconds per image, one image per call in both backends (the same work: CFG doubles the U-Net batch)."""
    settings = sampling.Settings(args.steps, args.guidance, "euler", size.resolution, size.resolution)
    pipe = sampling.load_pipeline(folder, None, args.dtype, args.device)
    pipe.scheduler = sampling.make_scheduler("euler", pipe.scheduler.config)
    jax_pipe = JaxSDXLPipeline.load(folder, None, args.dtype)
    runs = {
        "diffusers": lambda: sampling.generate(pipe, CAPTION, None, settings, 0),
        "jax": lambda: jax_pipe([CAPTION], settings, [0]),
    }
    return [
        {"bench": "sample", "backend": backend, "steps": args.steps, "s_per_image": timed(run, args.repeats)}
        for backend, run in runs.items()
    ]


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"{'size':<6} {'bench':<8} {'backend':<10} {'result':>18}   settings")
    for row in rows:
        key = next(k for k in row if k.endswith("_per_s") or k.startswith("s_per"))
        unit = {"images_per_s": "images/s", "s_per_image": "s/image"}[key]
        settings = ", ".join(f"{k}={v}" for k, v in row.items() if k not in ("size", "bench", "backend", key))
        print(f"{row['size']:<6} {row['bench']:<8} {row['backend']:<10} {row[key]:>9.3f} {unit:<8}   {settings}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=["tiny", "mid"])
    parser.add_argument("--batch", type=int, default=4, help="images per encoding batch")
    parser.add_argument("--steps", type=int, default=4, help="sampling steps")
    parser.add_argument("--guidance", type=float, default=5.0, help="> 1: classifier-free guidance")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls after the warm-up")
    parser.add_argument("--torch-threads", type=int, default=1, help="torch CPU threads (XLA uses every core)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="both backends")
    parser.add_argument("--output", default=DEFAULT_OUTPUT, help="JSON results file")
    args = parser.parse_args()
    torch.set_num_threads(args.torch_threads)

    rows = []
    with tempfile.TemporaryDirectory() as work:
        for name in args.sizes:
            folder = os.path.join(work, name)
            build_pipeline(folder, SIZES[name])
            for row in bench_encode(folder, SIZES[name], args) + bench_sample(folder, SIZES[name], args):
                rows.append({"size": name, "resolution": SIZES[name].resolution, **row})
    print_table(rows)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    result = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "jax": f"{jax.__version__} on {jax.devices()[0].device_kind}",
        "torch": f"{torch.__version__} on {torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'}",
        "args": vars(args),
        "results": rows,
    }
    with open(args.output, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
