"""Text-to-image models as evaluation `Generator`s: the JAX pipeline (no torch) or diffusers'
StableDiffusionXLPipeline, each drawing image i from `initial_noise(seed_i)`, in batches."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from koala_jax.console import Progress
from koala_jax.evaluation import world_eval
from koala_jax.evaluation.world_eval import Generated, Generator
from koala_jax.pipelines.sampling import Settings

BACKENDS = ("jax", "diffusers")


def batched(draw: Callable[[list[str], list[int]], tuple[np.ndarray, np.ndarray]], batch_size: int) -> Generator:
    """A Generator that calls `draw(prompts, seeds) -> (images, latents)` on at most `batch_size` items at once."""

    def generate(prompts: Sequence[str], seeds: Sequence[int]) -> Generated:
        images, latents = [], []
        with Progress(len(prompts), "sampling", unit="img") as bar:  # a bar on a terminal only
            for i in range(0, len(prompts), batch_size):
                pixels, final = draw(list(prompts[i : i + batch_size]), list(seeds[i : i + batch_size]))
                images += list(pixels)
                latents += list(final)
                bar.update(len(pixels))
        return Generated(images, latents)

    return generate


def load_generator(
    backend: str,
    pipeline: str | os.PathLike,
    unet: str | os.PathLike | None,
    settings: Settings,
    ema: bool = False,
    batch_size: int = 16,
    dtype: str = "fp32",
) -> Generator:
    """The pipeline folder `pipeline` with the U-Net of `unet` (a train.py run, a JAX params dir, a diffusers
    U-Net or pipeline folder; None: the pipeline's own), sampling with `settings`."""
    if backend == "jax":
        from koala_jax.pipelines.jax_sdxl import JaxSDXLPipeline

        pipe = JaxSDXLPipeline.load(pipeline, unet, dtype=dtype, ema=ema)
        return batched(lambda prompts, seeds: pipe.generate(prompts, settings, seeds), batch_size)
    from koala_jax.pipelines import sampling

    device, dtype = sampling.pick_device(dtype)
    pipe = sampling.load_pipeline(str(pipeline), None if unet is None else str(unet), dtype, device)
    pipe.scheduler = sampling.make_scheduler(settings.scheduler, pipe.scheduler.config)
    return batched(lambda prompts, seeds: sampling.generate_batch(pipe, prompts, seeds, settings), batch_size)


def evaluate_beside_teacher(
    pipeline: str | os.PathLike,
    teacher_unet: str | os.PathLike | None,
    students: Mapping[str, str | os.PathLike],
    settings: Settings,
    prompts: str,
    seeds: Sequence[int],
    ema: bool = True,
    batch_size: int = 16,
) -> world_eval.WorldEvaluation:
    """The teacher (the pipeline's own U-Net, or `teacher_unet`) and each student ({name: train.py run}), all
    sampled with `settings` from the same noise on the world prompt set `prompts`, compared with the teacher:
    what train.py's end-of-run evaluation and benchmarks/kd_ablation.py measure."""
    generators = {"teacher": load_generator("jax", pipeline, teacher_unet, settings, batch_size=batch_size)}
    for name, run in students.items():
        generators[name] = load_generator("jax", pipeline, run, settings, ema=ema, batch_size=batch_size)
    return world_eval.evaluate_world(generators, world_eval.prompt_set(prompts), seeds, reference="teacher")
