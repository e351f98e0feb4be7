"""sample.py on CPU with the tiny pipeline (random components + our exported U-Net): PNGs with their prompt
and settings, grids, seeds, --unet, and the per-family presets."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler
from PIL import Image

from koala_jax.cli import sample
from koala_jax.pipelines.sampling import PRESETS, make_scheduler

from tests.conftest import ROOT, build_teacher_pipeline, run


@pytest.fixture(autouse=True)
def no_gpu(monkeypatch):
    """The CPU fallback is what runs here, GPU or not."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory) -> tuple[Path, Path]:
    """(teacher pipeline folder, pipeline folder exported by convert_weights.py with the teacher's U-Net)."""
    teacher = tmp_path_factory.mktemp("teacher")
    build_teacher_pipeline(teacher)
    exported = tmp_path_factory.mktemp("exported") / "pipeline"
    assert run("to-diffusers", "--checkpoint", teacher, "--pipeline", teacher, "--out", exported) == 0
    return teacher, exported


def test_images_carry_prompt_and_settings(pipelines, tmp_path, capsys):
    _, exported = pipelines
    out = tmp_path / "samples"
    assert (
        sample.main(
            [
                "--model",
                str(exported),
                "--prompt",
                "a koala",
                "--prompt",
                "a cat",
                "--steps",
                "2",
                "--height",
                "64",
                "--width",
                "64",
                "--seed",
                "3",
                "--out",
                str(out),
                "--grid",
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    assert "no GPU found" in captured.err and "s per image" in captured.out
    assert sorted(p.name for p in out.iterdir()) == ["0000.png", "0001.png", "grid.png"]
    for index, prompt in enumerate(["a koala", "a cat"]):
        image = Image.open(out / f"{index:04d}.png")
        assert image.size == (64, 64) and image.text["prompt"] == prompt
        settings = json.loads(image.text["parameters"])
        assert settings["seed"] == 3 + index and settings["steps"] == 2 and settings["dtype"] == "fp32"
        assert (settings["guidance"], settings["scheduler"]) == (7.5, "euler")  # The koala preset's.
    assert Image.open(out / "grid.png").size == (128, 64)
    first, second = (np.asarray(Image.open(out / f"000{i}.png")) for i in range(2))
    assert first.std() > 0 and not np.array_equal(first, second)


def test_unet_flag_prompts_file_and_seed_reproduce_the_image(pipelines, tmp_path):
    """The teacher pipeline with the exported U-Net swapped in, same prompt and seed: the same pixels as the
    exported pipeline (the export is bit-identical and the seed fixes the noise)."""
    teacher, exported = pipelines
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\na koala\n\n")
    common = ["--steps", "2", "--height", "64", "--width", "64", "--seed", "3"]
    assert sample.main(["--model", str(exported), "--prompt", "a koala", *common, "--out", str(tmp_path / "a")]) == 0
    assert (
        sample.main(
            [
                "--model",
                str(teacher),
                "--unet",
                str(exported / "unet"),
                "--prompts-file",
                str(prompts),
                *common,
                "--out",
                str(tmp_path / "b"),
            ]
        )
        == 0
    )
    a, b = (np.asarray(Image.open(tmp_path / d / "0000.png")) for d in "ab")
    np.testing.assert_array_equal(a, b)


def test_presets_and_overrides():
    args = argparse.Namespace(preset="lightning", steps=None, guidance=None, scheduler=None, height=None, width=None)
    assert sample.resolve_settings(args) == PRESETS["lightning"]
    assert (PRESETS["lightning"].steps, PRESETS["lightning"].guidance) == (10, 3.5)
    args = argparse.Namespace(preset="turbo", steps=2, guidance=None, scheduler="dpm++", height=None, width=None)
    settings = sample.resolve_settings(args)
    assert (settings.steps, settings.scheduler, settings.height, settings.guidance) == (2, "dpm++", 512, 0.0)
    assert (PRESETS["koala"].steps, PRESETS["koala"].guidance, PRESETS["koala"].scheduler) == (25, 7.5, "euler")

    base = EulerDiscreteScheduler(timestep_spacing="leading", steps_offset=1).config
    trailing = make_scheduler("euler-trailing", base)
    assert isinstance(trailing, EulerDiscreteScheduler) and trailing.config.timestep_spacing == "trailing"
    assert make_scheduler("euler", base).config.timestep_spacing == "leading"
    assert isinstance(make_scheduler("dpm++", base), DPMSolverMultistepScheduler)


def test_missing_model_is_one_error(tmp_path, capsys):
    assert sample.main(["--model", str(tmp_path / "nope"), "--prompt", "x"]) == 1
    assert capsys.readouterr().err.splitlines()[-1].startswith(f"error: {tmp_path / 'nope'}")


TINY_WORLD_TEACHER = ROOT / "assets" / "tiny_world" / "teacher"  # sample_size 16, VAE factor 4


def configs_only(folder: Path, sample_size: int, vae_blocks: int) -> Path:
    """The tiny-world teacher's U-Net and VAE configs (no weights) with another sample_size and VAE depth: what
    the size defaults read."""
    for part, changes in (
        ("unet", {"sample_size": sample_size}),
        ("vae", {"block_out_channels": [16] * vae_blocks, "down_block_types": ["DownEncoderBlock2D"] * vae_blocks}),
    ):
        config = json.loads((TINY_WORLD_TEACHER / part / "config.json").read_text()) | changes
        if part == "vae":
            config["up_block_types"] = ["UpDecoderBlock2D"] * vae_blocks
        (folder / part).mkdir(parents=True)
        (folder / part / "config.json").write_text(json.dumps(config))
    return folder


def settings_for(*argv: str) -> tuple[int, int]:
    args = sample.build_parser().parse_args([*argv, "--prompt", "x", "--backend", "jax"])
    settings, _ = sample.check_arguments(args)
    return settings.height, settings.width


def test_images_default_to_the_models_own_size(tmp_path):
    """Issue 22: the tiny pipeline drew at the koala preset's 1024 px (14 minutes); now at its own 64 px, as
    diffusers does, with any preset. Full-size models keep the preset's (the paper's) size, and given sizes win."""
    tiny = str(TINY_WORLD_TEACHER)
    for preset in PRESETS:
        assert settings_for("--model", tiny, "--preset", preset) == (64, 64)
    assert settings_for("--model", tiny, "--height", "32") == (32, 64)
    full = str(configs_only(tmp_path / "full", sample_size=128, vae_blocks=4))  # SDXL: 128 x 8
    assert settings_for("--model", full) == (1024, 1024)
    assert settings_for("--model", full, "--preset", "turbo") == (512, 512)
    assert settings_for("--model", full, "--width", "768") == (1024, 768)
    half = str(configs_only(tmp_path / "half", sample_size=64, vae_blocks=4))  # SDXL-Turbo's own 512 px
    assert settings_for("--model", half, "--preset", "lightning") == (512, 512)


def test_a_model_without_a_readable_size_asks_for_one(tmp_path, capsys):
    folder = configs_only(tmp_path / "no_size", sample_size=16, vae_blocks=3)
    config = json.loads((folder / "unet" / "config.json").read_text())
    del config["sample_size"]
    (folder / "unet" / "config.json").write_text(json.dumps(config))
    assert sample.main(["--model", str(folder), "--prompt", "x", "--backend", "jax"]) == 1
    err = capsys.readouterr().err
    assert "has no sample_size" in err and "give --height and --width" in err
    assert settings_for("--model", str(folder), "--height", "32", "--width", "32") == (32, 32)
