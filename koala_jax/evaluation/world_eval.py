"""Evaluating text-to-image models in the tiny world: generate every (prompt, seed) with each model from the
same initial noise, read the attributes back with the detector, and compare each model with a reference
(the teacher) image by image.

Generation is a callable (`Generator`) so the same evaluation serves the JAX pipeline (training's summary,
`evaluate.py --backend jax`) and diffusers (`--backend diffusers`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from koala_jax.data import world
from koala_jax.errors import ConfigError
from koala_jax.evaluation import detector
from koala_jax.evaluation.agreement import agreement
from koala_jax.evaluation.report import Report


@dataclasses.dataclass
class Generated:
    """uint8 (H, W, 3) images, and the final latents (C, h, w) that were decoded into them when known."""

    images: list[np.ndarray]
    latents: list[np.ndarray] | None = None


# (prompts, seeds) -> one image per prompt, image i from seed i's initial noise.
Generator = Callable[[Sequence[str], Sequence[int]], Generated]

# Named prompt sets: every colour x shape in the short style (the teacher's >= 90% bar), and rich prompts with
# size, position, background and two-object relations (drawn apart from the training scenes).
PROMPT_SETS: dict[str, Callable[[], list[world.Prompt]]] = {
    "world-single": world.single_object_prompts,
    "world-rich": lambda: world.rich_prompts(24, seed=1),
}
# `all`: every attribute the prompt states, with exactly the objects it names (for "a red circle": one object,
# red and a circle) - the headline; `colour_shape` alone would credit an image of many blobs that include one.
SUMMARY_KEYS = ("colour", "shape", "colour_shape", "count", "size", "position", "relation", "background", "all")
COLUMNS = ("model", *SUMMARY_KEYS, "psnr_db", "image_mse", "latent_mse")


def prompt_set(name: str) -> list[world.Prompt]:
    if name not in PROMPT_SETS:
        raise ConfigError(f"unknown prompt set {name!r}; choose from {', '.join(PROMPT_SETS)}")
    return PROMPT_SETS[name]()


@dataclasses.dataclass
class WorldEvaluation:
    """Per model: generated images, attribute accuracy, and agreement with the reference model."""

    prompts: list[world.Prompt]
    seeds: list[int]
    generated: dict[str, Generated]
    accuracy: dict[str, dict[str, float]]
    agreement: dict[str, dict[str, float]]
    reference: str | None

    def report(self) -> Report:
        """The evaluation as evaluate.py and train.py write it (report.json, report.md, grid.png)."""
        items = [{"prompt": p.text, "seed": s} for p in self.prompts for s in self.seeds]
        models = {m: {"accuracy": self.accuracy[m], "agreement": self.agreement.get(m, {})} for m in self.generated}
        images = {m: g.images for m, g in self.generated.items()}
        return Report(self.reference, items, images, models, COLUMNS, self.seeds)


def evaluate_world(
    generators: Mapping[str, Generator],
    prompts: Sequence[world.Prompt],
    seeds: Sequence[int],
    reference: str | None = None,
) -> WorldEvaluation:
    """Generate every (prompt, seed) with every model, score the images, and compare each model with
    `reference` (one of `generators`; None: no agreement)."""
    if reference is not None and reference not in generators:
        raise ConfigError(f"reference model {reference!r} is not among {', '.join(generators)}")
    items = [(p, s) for p in prompts for s in seeds]
    texts, item_seeds = [p.text for p, _ in items], [s for _, s in items]
    specs = [p.spec for p, _ in items]
    generated = {name: generate(texts, item_seeds) for name, generate in generators.items()}
    accuracy = {name: detector.accuracy(g.images, specs) for name, g in generated.items()}
    compared = {} if reference is None else agreement_with(generated, reference)
    return WorldEvaluation(list(prompts), list(seeds), generated, accuracy, compared, reference)


def agreement_with(generated: Mapping[str, Generated], reference: str) -> dict[str, dict[str, float]]:
    """Each other model's agreement with `reference`: its images and final latents against the reference's
    from the same noise (world prompt sets and free prompts alike)."""
    ref = generated[reference]
    return {
        name: agreement(g.images, ref.images, g.latents, ref.latents)
        for name, g in generated.items()
        if name != reference
    }
