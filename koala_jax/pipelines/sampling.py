"""Image generation with diffusers' StableDiffusionXLPipeline: the paper's per-family defaults, scheduler
choice, and PNGs that carry their prompt and settings.

Imports torch and diffusers: used by sample.py, never by the JAX training path.

Defaults per teacher family (docs/paper.md sections 4 and 5):
- koala (KOALA-1B/700M, SDXL-Base teacher): 25 steps, guidance 7.5, Euler, 1024 px; the GitHub README
  example and the model cards.
- lightning (KOALA-Lightning, SDXL-Lightning teacher): Euler with "trailing" timesteps, 10 steps, guidance
  3.5, 1024 px; the KOALA-Lightning model card code.
- turbo (KOALA-Turbo, SDXL-Turbo teacher): 512 px (the project page times Turbo models at 512x512) and
  trailing Euler. ASSUMPTIONS, not verified: 4 steps and guidance 0.0 (SDXL-Turbo's own card samples
  without classifier-free guidance in 1-4 steps; KOALA-Turbo's settings are not in any source we read).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from PIL import Image
from PIL.PngImagePlugin import PngInfo


@dataclasses.dataclass(frozen=True)
class Settings:
    steps: int
    guidance: float
    scheduler: str
    height: int
    width: int


PRESETS = {
    "koala": Settings(steps=25, guidance=7.5, scheduler="euler", height=1024, width=1024),
    "lightning": Settings(steps=10, guidance=3.5, scheduler="euler-trailing", height=1024, width=1024),
    "turbo": Settings(steps=4, guidance=0.0, scheduler="euler-trailing", height=512, width=512),
}
SCHEDULERS = ("euler", "euler-trailing", "dpm++")
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def pick_device(dtype: str | None) -> tuple[str, str]:
    """(device, dtype name): the GPU when there is one, else the CPU with a warning."""
    if torch.cuda.is_available():
        return "cuda", dtype or "fp16"
    print("warning: no GPU found; sampling on the CPU (slow)", file=sys.stderr)
    return "cpu", dtype or "fp32"


def peak_gpu_memory_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30


def make_scheduler(name: str, config: dict):
    """A scheduler built from the pipeline's own scheduler config (betas, offsets), as the model cards do."""
    if name == "euler":
        return EulerDiscreteScheduler.from_config(config)
    if name == "euler-trailing":
        return EulerDiscreteScheduler.from_config(config, timestep_spacing="trailing")
    if name == "dpm++":
        return DPMSolverMultistepScheduler.from_config(config)  # DPM-Solver++ 2M, diffusers' default.
    raise ValueError(f"unknown scheduler {name!r}; choose from {SCHEDULERS}")


def load_pipeline(model: str, unet: str | None, dtype: torch.dtype, device: str) -> StableDiffusionXLPipeline:
    """The SDXL pipeline of `model` (folder or hub id), with the U-Net of folder `unet` when given."""
    kwargs = {"unet": UNet2DConditionModel.from_pretrained(unet, dtype=dtype)} if unet else {}
    pipe = StableDiffusionXLPipeline.from_pretrained(model, dtype=dtype, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def png_info(metadata: dict) -> PngInfo:
    """PNG tEXt chunks: the prompt and negative prompt on their own, and every setting as JSON."""
    info = PngInfo()
    info.add_text("prompt", metadata["prompt"])
    info.add_text("negative_prompt", metadata.get("negative_prompt") or "")
    info.add_text("parameters", json.dumps(metadata, sort_keys=True))
    return info


def generate(
    pipe: StableDiffusionXLPipeline, prompt: str, negative_prompt: str | None, settings: Settings, seed: int
) -> tuple[Image.Image, float]:
    """(image, seconds) for one prompt; the seed fixes the initial noise (a CPU generator, so a seed
    gives the same noise on every device)."""
    start = time.perf_counter()
    image = pipe(
        prompt=prompt,
        negative_prompt=negative_prompt,
        num_inference_steps=settings.steps,
        guidance_scale=settings.guidance,
        height=settings.height,
        width=settings.width,
        generator=torch.Generator("cpu").manual_seed(seed),
    ).images[0]
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return image, time.perf_counter() - start


def make_grid(images: list[Image.Image]) -> Image.Image:
    """The images in a near-square grid, row by row."""
    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    width, height = images[0].size
    grid = Image.new("RGB", (cols * width, rows * height), "white")
    for i, image in enumerate(images):
        grid.paste(image, ((i % cols) * width, (i // cols) * height))
    return grid


def save_png(image: Image.Image, path: Path, metadata: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, pnginfo=png_info(metadata))
