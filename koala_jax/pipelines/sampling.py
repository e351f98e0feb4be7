"""Image generation for sample.py: the paper's per-family defaults, the seed -> initial noise rule, PNGs that
carry their prompt and settings (both backends), and the diffusers backend (StableDiffusionXLPipeline).

torch and diffusers are imported inside the diffusers backend's functions only, so the JAX backend
(`jax_sdxl`) uses this module without torch installed.

Defaults per teacher family (docs/paper.md sections 4 and 5):
- koala (KOALA-1B/700M, SDXL-Base teacher): 25 steps, guidance 7.5, Euler, 1024 px; the GitHub README
  example and the model cards.
- lightning (KOALA-Lightning, SDXL-Lightning teacher): Euler with "trailing" timesteps, 10 steps, guidance
  3.5, 1024 px; the KOALA-Lightning model card code.
- turbo (KOALA-Turbo, SDXL-Turbo teacher): 512 px (the project page times Turbo models at 512x512) and
  trailing Euler. ASSUMPTIONS, not verified: 4 steps and guidance 0.0 (SDXL-Turbo's own card samples
  without classifier-free guidance in 1-4 steps; KOALA-Turbo's settings are not in any source we read).
The presets' sizes are for full-size (1024 px) models; any smaller model draws at its own size by default
(`preset_settings`: the tiny pipelines at 64 px). Every setting has a range (`setting_problems`), checked by the
commands before anything loads, and PNGs are written whole or not at all (`save_png`).
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from koala_jax.errors import ConfigError
from koala_jax.files import write_bytes

if TYPE_CHECKING:
    from diffusers import StableDiffusionXLPipeline


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
DTYPES = ("fp32", "fp16", "bf16")
# The presets' sizes are the paper's, for models at SDXL's own side; smaller models draw at their own size.
FULL_SIZE = 1024
# Ranges of the sampling settings, checked before any model loads. Steps: SDXL's num_train_timesteps (beyond it
# the schedule only repeats timesteps). Guidance: images saturate long before 100 (1e30 drew black). Sides: 4x
# SDXL's. diffusers' StableDiffusionXLPipeline refuses heights and widths that are not multiples of 8.
MAX_STEPS = 1000
GUIDANCE_RANGE = (0.0, 100.0)
MAX_SIDE = 4096
DIFFUSERS_MULTIPLE = 8


def preset_settings(preset: str, native: int | None) -> Settings:
    """The preset's settings at the model's own size `native` (U-Net sample_size x VAE factor, as diffusers
    defaults to); the preset's size (the paper's) for a full-size model, or where the size is not known before
    loading (None: a hub id). The tiny pipeline thus draws 64 px, not 1024."""
    settings = PRESETS[preset]
    if native is None or native >= FULL_SIZE:
        return settings
    return dataclasses.replace(settings, height=native, width=native)


def range_problem(flag: str, value: float | None, low: float, high: float | None = None) -> str | None:
    """`<flag> <value> must be ...` when `value` lies outside [low, high] (NaN does too; None: not given)."""
    if value is None or (low <= value and (high is None or value <= high)):
        return None
    return f"{flag} {value} must be " + (f"between {low} and {high}" if high is not None else f"at least {low}")


def size_problem(flag: str, value: int, backend: str, factor: int | None) -> str | None:
    """Why `backend` ("diffusers" or "jax") cannot draw `value` pixels along a side with a VAE of `factor` pixels
    per latent (None: not known before loading, a hub id), or None."""
    if factor and value % factor:
        return f"{flag} {value} is not a multiple of the VAE's factor {factor}"
    if backend == "diffusers" and value % DIFFUSERS_MULTIPLE:
        instead = f"; --backend jax draws multiples of the VAE's factor {factor}" if factor else ""
        return f"{flag} {value} is not a multiple of {DIFFUSERS_MULTIPLE}, which diffusers needs{instead}"
    return None


def setting_problems(settings: Settings, backend: str, factor: int | None, flags: Mapping[str, str]) -> list[str]:
    """Each setting out of its range or not drawable by `backend`, named by its flag (`flags`: field -> flag)."""
    problems = [
        range_problem(flags["steps"], settings.steps, 1, MAX_STEPS),
        range_problem(flags["guidance"], settings.guidance, *GUIDANCE_RANGE),
    ]
    for side in ("height", "width"):
        value = getattr(settings, side)
        problems.append(
            range_problem(flags[side], value, 1, MAX_SIDE) or size_problem(flags[side], value, backend, factor)
        )
    return list(dict.fromkeys(p for p in problems if p))  # evaluate.py's --size names both sides


def initial_noise(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    """The starting latents of image `seed`: standard normal float32 from numpy's default generator, so a
    seed gives the same noise on every device and in both backends (diffusers gets it as `latents=`)."""
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


def pick_device(dtype: str | None) -> tuple[str, str]:
    """(device, dtype name): the GPU when there is one, else the CPU with a warning."""
    import torch

    if torch.cuda.is_available():
        return "cuda", dtype or "fp16"
    print("warning: no GPU found; sampling on the CPU (slow)", file=sys.stderr)
    return "cpu", dtype or "fp32"


def peak_gpu_memory_gib() -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30


def make_scheduler(name: str, config: dict):
    """A scheduler built from the pipeline's own scheduler config (betas, offsets), as the model cards do."""
    from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler

    if name == "euler":
        return EulerDiscreteScheduler.from_config(config)
    if name == "euler-trailing":
        return EulerDiscreteScheduler.from_config(config, timestep_spacing="trailing")
    if name == "dpm++":
        return DPMSolverMultistepScheduler.from_config(config)  # DPM-Solver++ 2M, diffusers' default.
    raise ValueError(f"unknown scheduler {name!r}; choose from {SCHEDULERS}")


def load_pipeline(model: str, unet: str | None, dtype: str, device: str) -> StableDiffusionXLPipeline:
    """The SDXL pipeline of `model` (folder or hub id), with the U-Net of folder `unet` when given; `dtype`
    is one of DTYPES."""
    import torch
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    kwargs = {"unet": _from_pretrained(UNet2DConditionModel, unet, dtype=dtype)} if unet else {}
    pipe = _from_pretrained(StableDiffusionXLPipeline, model, dtype=dtype, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _from_pretrained(cls: type, path: str, **kwargs):
    """`cls.from_pretrained(path)`; what diffusers refuses (a missing folder or file, a bad hub id, a config it
    cannot build) is one error naming `path` itself, so a bad `--unet` is not blamed on `--model`."""
    try:
        return cls.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: {e}") from e


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
    """(image, seconds) for one prompt; the seed fixes the initial noise (`initial_noise`)."""
    import torch

    start = time.perf_counter()
    images, _ = generate_batch(pipe, [prompt], [seed], settings, negative_prompt)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return Image.fromarray(images[0]), time.perf_counter() - start


def generate_batch(
    pipe: StableDiffusionXLPipeline,
    prompts: list[str],
    seeds: list[int],
    settings: Settings,
    negative_prompt: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images (B, H, W, 3), final latents (B, C, h, w)): image i from `initial_noise(seeds[i])`. The
    pipeline returns its latents undecoded and the VAE decodes them here, so an evaluation can compare both."""
    import torch

    factor = pipe.vae_scale_factor
    shape = (1, pipe.unet.config.in_channels, settings.height // factor, settings.width // factor)
    noise = np.concatenate([initial_noise(seed, shape) for seed in seeds])
    with torch.no_grad():
        latents = pipe(
            prompt=list(prompts),
            negative_prompt=None if negative_prompt is None else [negative_prompt] * len(prompts),
            num_inference_steps=settings.steps,
            guidance_scale=settings.guidance,
            height=settings.height,
            width=settings.width,
            latents=torch.from_numpy(noise).to(pipe.device, pipe.unet.dtype),
            output_type="latent",
        ).images
        vae = pipe.vae
        upcast = vae.dtype == torch.float16 and vae.config.force_upcast  # SDXL's VAE overflows in fp16
        if upcast:
            vae.to(torch.float32)
        decoded = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
        if upcast:
            vae.to(torch.float16)
        pixels = pipe.image_processor.postprocess(decoded.float(), output_type="np")
    return (pixels * 255).round().astype(np.uint8), latents.float().cpu().numpy()


def make_grid(images: list[Image.Image]) -> Image.Image:
    """The images in a near-square grid, row by row."""
    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    width, height = images[0].size
    grid = Image.new("RGB", (cols * width, rows * height), "white")
    for i, image in enumerate(images):
        grid.paste(image, ((i % cols) * width, (i // cols) * height))
    return grid


def save_png(image: Image.Image, path: Path, metadata: dict | None = None) -> None:
    """Write `image` (with `metadata` as tEXt chunks) whole or not at all: encoded first, then written under a
    temporary name and renamed, so a full disk is one error naming `path`, the bytes needed and free, and no
    0-byte or half-written PNG is left."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=None if metadata is None else png_info(metadata))
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes(path, buffer.getvalue())
