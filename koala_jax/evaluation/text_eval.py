"""Evaluating text-to-image models on free prompts (evaluate.py --prompts-file): every (prompt, seed) with every
model from the same initial noise, and each model's agreement with the first. No attribute accuracy: these
prompts state nothing the world's detector could check (real-model metrics are added by evaluate.py)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from koala_jax.evaluation.report import Report
from koala_jax.evaluation.world_eval import Generator, agreement_with

COLUMNS = ("model", "psnr_db", "image_mse", "latent_mse")


def evaluate_texts(generators: Mapping[str, Generator], texts: Sequence[str], seeds: Sequence[int]) -> Report:
    """Every (prompt, seed) with every model; agreement with the first model (the reference)."""
    items = [{"prompt": t, "seed": s} for t in texts for s in seeds]
    prompts, item_seeds = [i["prompt"] for i in items], [i["seed"] for i in items]
    generated = {name: generate(prompts, item_seeds) for name, generate in generators.items()}
    reference = next(iter(generated))
    compared = agreement_with(generated, reference)
    models = {name: {"agreement": compared.get(name, {})} for name in generated}
    return Report(reference, items, {m: g.images for m, g in generated.items()}, models, COLUMNS, list(seeds))
