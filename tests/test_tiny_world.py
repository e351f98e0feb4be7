"""The tiny world's pipeline: the builder writes a pipeline diffusers and our JAX side both load, the shipped
teacher draws what its caption says (in diffusers, as sample.py runs it, and in JAX), and the main job's wiring
(world data prepared on the fly with the teacher's encoders, distillation, evaluation in the summary) runs."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from diffusers import StableDiffusionXLPipeline

from koala_jax.cli import world as world_cli
from koala_jax.data import world
from koala_jax.evaluation import detector
from koala_jax.pipelines.sampling import Settings, generate_batch
from koala_jax.pipelines.tiny_world import build_components

from tests.conftest import ROOT, WITHOUT_TORCH

TEACHER = ROOT / "assets" / "tiny_world" / "teacher"
LIGHTNING = ROOT / "assets" / "tiny_world" / "lightning_4step"  # the teacher step-distilled to 4 steps
RED_CIRCLE = world.PromptSpec((world.ObjectConstraint(shape="circle", colour="red"),))


def test_components_load_in_diffusers_and_jax(tmp_path):
    """A minutes-long build in seconds (2 VAE steps): the layout, the word tokenizers and the model index."""
    report, _ = build_components(tmp_path, vae_steps=2, vae_images=16, log=lambda _: None)
    assert report["scaling_factor"] > 0
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline" and index["unet"] == [None, None]
    from koala_jax.weights.pipeline_dir import read_pipeline

    parts = read_pipeline(tmp_path)
    assert parts.vae_config.downscale_factor == 4 and parts.force_zeros_for_empty_prompt


def test_world_cli_renders_scenes_with_captions(tmp_path, capsys):
    assert world_cli.main(["render", "--count", "4", "--style", "short", "--out", str(tmp_path)]) == 0
    lines = (tmp_path / "captions.txt").read_text().splitlines()
    assert len(lines) == 4 and all(line.split("\t")[1].startswith("a ") for line in lines)
    assert world_cli.main(["render", "--count", "0", "--out", str(tmp_path)]) == 1
    assert capsys.readouterr().err.startswith("error: --count 0")


def test_shipped_teachers_are_small_and_self_describing():
    """Both shipped pipelines (the teacher, its 4-step distillation) in under 30 MiB; each says how it samples."""
    files = [p for folder in (TEACHER, LIGHTNING) for p in folder.rglob("*") if p.is_file()]
    size = sum(p.stat().st_size for p in files)
    print(f"shipped pipelines: {len(files)} files, {size / 2**20:.1f} MiB")
    assert size < 30 * 2**20
    for folder in (TEACHER, LIGHTNING):
        unet = json.loads((folder / "unet" / "config.json").read_text())
        assert unet["sample_size"] == 16 and unet["layers_per_block"] == [2, 2, 2]
        assert (folder / "README.md").read_text().startswith("---\nlibrary_name: diffusers")
    scheduler = json.loads((LIGHTNING / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["timestep_spacing"] == "trailing"


@pytest.fixture(scope="module")
def diffusers_teacher():
    return StableDiffusionXLPipeline.from_pretrained(TEACHER)


def test_shipped_teacher_draws_a_red_circle_in_diffusers(diffusers_teacher):
    """sample.py's pipeline and default size (unet sample_size 16 x VAE factor 4 = 64 px)."""
    settings = Settings(steps=20, guidance=5.0, scheduler="euler", height=64, width=64)
    images, _ = generate_batch(diffusers_teacher, ["a red circle"] * 4, [0, 1, 2, 3], settings)
    scores = [detector.score(detector.detect(image), RED_CIRCLE)["all"] for image in images]
    print(f"'a red circle', seeds 0-3: {scores}")
    assert sum(scores) >= 3


def test_shipped_teacher_draws_colour_and_shape_in_jax():
    """The JAX pipeline (what training's evaluation uses) on every colour x shape, one seed each: the named
    object's colour and shape (docs/tiny_world.md: 0.986 over four seeds; the bar is 0.9 there, a little lower
    here for one seed's 18 images)."""
    from koala_jax.evaluation.generators import load_generator

    settings = Settings(steps=20, guidance=5.0, scheduler="euler", height=64, width=64)
    prompts = world.single_object_prompts()
    generated = load_generator("jax", TEACHER, None, settings)([p.text for p in prompts], [7] * len(prompts))
    accuracy = detector.accuracy(generated.images, [p.spec for p in prompts])
    print(f"teacher, {len(prompts)} prompts x seed 7: {accuracy}")
    assert accuracy["colour_shape"] >= 0.85


def test_shipped_lightning_teacher_draws_in_four_unguided_steps():
    """diffusers' pipeline with the folder's own scheduler (trailing), 4 steps, no guidance, every colour x shape
    once: the shipped folder (its trailing scheduler config included) samples as intended (docs/kd_ablation.md:
    colour+shape 0.978 over ten seeds; on one seed the original teacher sampled alike can do as well)."""
    pipe = StableDiffusionXLPipeline.from_pretrained(LIGHTNING)
    settings = Settings(steps=4, guidance=1.0, scheduler="euler", height=64, width=64)
    prompts = world.single_object_prompts()
    images, _ = generate_batch(pipe, [p.text for p in prompts], [7] * len(prompts), settings)
    accuracy = detector.accuracy(images, [p.spec for p in prompts])
    print(f"lightning_4step, {len(prompts)} prompts x seed 7, 4 steps: {accuracy}")
    assert accuracy["colour_shape"] >= 0.9


@pytest.mark.slow
def test_main_job_wiring_prepares_distils_and_evaluates(tmp_path):
    """configs/tiny.py shortened (6 steps, 64 records, one seed): data encoded on the fly with the teacher's
    encoders, a KOALA-700M student distilled, both evaluated; the summary says where things are. Run where torch
    and diffusers cannot be imported: the README's first command installs neither."""
    argv = [
        "train.py",
        "--config",
        "configs/tiny.py",
        f"--config.workdir={tmp_path}",
        "--config.total_steps=6",
        "--config.log_every=3",
        "--config.ckpt.every=3",
        "--config.data.source=world:64",
        "--config.data.global_batch_size=8",
        "--config.eval.seeds=(0,)",
        "--config.eval.steps=2",
    ]
    code = f"{WITHOUT_TORCH}import runpy; sys.argv = {argv!r}; runpy.run_path('train.py', run_name='__main__')"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    print(out.stdout)
    assert "preparing world:64" in out.stdout and "evaluation (world-single" in out.stdout
    assert "export: python convert_weights.py to-diffusers" in out.stdout
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert set(report["models"]) == {"teacher", "student"} and len(report["items"]) == 18
    assert (tmp_path / "eval" / "grid.png").is_file() and (tmp_path / "data" / "dataset_info.json").is_file()
    assert len(out.stdout.splitlines()) < 40 and "[transformers]" not in out.stdout + out.stderr  # quiet libraries
    assert np.isfinite(report["models"]["student"]["agreement"]["latent_mse"])
