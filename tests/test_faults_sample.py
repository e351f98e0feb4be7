"""Fault injection for sample.py and evaluate.py (issues 22 and 23): no PyTorch, values out of range, a full disk,
a byte-order mark, a --unet diffusers cannot read, several missing metric folders. Each asserts the one-line
error, that it came before any model loaded, and that nothing 0-byte or half-written was left.

"No PyTorch" is an import guard (`sys.modules[name] = None`, which is how Python marks a blocked import), a full
disk an ENOSPC raised by `os.fsync` inside the atomic writer: deterministic, no tmpfs, no timing.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from koala_jax.cli import evaluate, requires, sample
from koala_jax.evaluation.world_eval import Generated
from koala_jax.files import read_prompts_file

from tests.conftest import ROOT, WITHOUT_TORCH

TINY_TEACHER = ROOT / "assets" / "tiny_world" / "teacher"  # VAE factor 4, sample_size 16: 64 px


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture
def without_torch(monkeypatch):
    """torch and diffusers cannot be imported (both already imported here come back afterwards)."""
    for name in requires.TORCH_PACKAGES:
        monkeypatch.setitem(sys.modules, name, None)


@pytest.fixture
def nothing_loads(monkeypatch):
    """Any model load fails the test: the checks must come first."""
    from koala_jax.pipelines import jax_sdxl

    fail = lambda *a, **k: pytest.fail("a model was loaded")
    monkeypatch.setattr(sample, "load_pipeline", fail)
    monkeypatch.setattr(jax_sdxl.JaxSDXLPipeline, "load", fail)
    monkeypatch.setattr(evaluate, "load_generator", fail)


@pytest.fixture
def full_disk(monkeypatch):
    """Every atomic write fails as a full disk does, at its flush to the device."""

    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)


# ---------------------------------------------------------------- no PyTorch


def test_the_torch_guard_sees_a_blocked_import(without_torch):
    assert not requires.torch_available()
    with pytest.raises(requires.TorchMissingError, match=r"torch and diffusers not installed.*or use the other way"):
        requires.require_torch("this", "the other way")


def test_without_torch_sample_falls_back_to_jax_and_diffusers_is_one_line(without_torch, nothing_loads, capsys):
    assert sample.resolve_backend(None) == "jax"
    assert capsys.readouterr().err.strip() == (
        f"note: PyTorch is not installed, so sampling with --backend jax (for diffusers: {requires.TORCH_INSTALL})"
    )
    assert sample.main(["--model", str(TINY_TEACHER), "--prompt", "x", "--backend", "diffusers"]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith("error: --backend diffusers needs PyTorch")
    assert requires.TORCH_INSTALL in line and "--backend jax" in line


def test_without_torch_evaluate_names_what_needs_it(without_torch, nothing_loads, tmp_path, capsys):
    base = ["--model", f"t={TINY_TEACHER}", "--out", str(tmp_path / "out")]
    for extra, what in (
        (["--backend", "diffusers"], "--backend diffusers needs PyTorch"),
        (["--clip", str(tmp_path), "--hps-checkpoint", "x.pt"], "--clip, --hps-checkpoint (real-model metrics) needs"),
    ):
        assert evaluate.main(base + extra) == 1
        line = one_error_line(capsys.readouterr().err)
        assert what in line and requires.TORCH_INSTALL in line
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_sample_without_torch_draws_the_tiny_red_circle_at_64_px(tmp_path):
    """Issue 22's done-when: the README's command, no size, no backend, no torch: a 64 px red circle."""
    from koala_jax.data import world
    from koala_jax.evaluation import detector

    argv = ["--model", str(TINY_TEACHER), "--prompt", "a red circle", "--out", str(tmp_path)]
    code = f"{WITHOUT_TORCH}from koala_jax.cli import sample; sys.exit(sample.main({argv!r}))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "note: PyTorch is not installed" in done.stderr
    image = Image.open(tmp_path / "0000.png")
    assert image.size == (64, 64) and json.loads(image.text["parameters"])["backend"] == "jax"
    red_circle = next(p for p in world.single_object_prompts() if p.text == "a red circle")
    # A red circle is drawn; at the koala preset's guidance 7.5 (the tiny world is scored at 5) its background
    # is tinted, so the detector's stricter "exactly one object" need not hold.
    assert detector.score(detector.detect(np.asarray(image)), red_circle.spec)["colour_shape"]


# ---------------------------------------------------------------- values out of range, before anything loads


def test_sample_values_out_of_range_are_one_line_before_loading(nothing_loads, tmp_path, capsys):
    argv = ["--model", str(TINY_TEACHER), "--prompt", "x", "--out", str(tmp_path / "out"), "--backend", "jax"]
    bad = ["--seed=-1", "--guidance", "1e30", "--steps", "1000000000", "--height", "4100", "--batch-size", "0"]
    assert sample.main(argv + bad) == 1
    line = one_error_line(capsys.readouterr().err)
    for expected in (
        "--seed -1 must be at least 0",
        "--guidance 1e+30 must be between 0.0 and 100.0",
        "--steps 1000000000 must be between 1 and 1000",
        "--height 4100 must be between 1 and 4096",
        "--batch-size 0 must be at least 1",
    ):
        assert expected in line
    assert sample.main(argv + ["--guidance", "nan"]) == 1
    assert "--guidance nan must be between" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_sizes_are_checked_for_the_backend_that_runs(nothing_loads, tmp_path, capsys):
    """The tiny pipeline's VAE factor is 4: 36 px is fine for JAX; diffusers wants multiples of 8."""
    argv = ["--model", str(TINY_TEACHER), "--prompt", "x", "--height", "36", "--width", "36", "--backend"]
    args = sample.build_parser().parse_args([*argv, "jax"])
    settings, _ = sample.check_arguments(args)
    assert (settings.height, settings.width) == (36, 36)
    assert sample.main([*argv, "diffusers", "--out", str(tmp_path)]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "--height 36 is not a multiple of 8, which diffusers needs; --backend jax draws multiples of" in line
    assert sample.main([*argv[:-1], "--width", "38", "--backend", "jax", "--out", str(tmp_path)]) == 1
    assert "--width 38 is not a multiple of the VAE's factor 4" in one_error_line(capsys.readouterr().err)


def test_evaluate_values_out_of_range_are_one_line_before_loading(nothing_loads, tmp_path, capsys):
    base = ["--model", f"t={TINY_TEACHER}", "--out", str(tmp_path / "out")]
    cases = [
        (["--seeds=-1,2,-3"], "--seeds -1,2,-3: seeds must be at least 0, not -1, -3"),
        (["--seeds", "1,1"], "give each seed once"),
        (["--steps", "0", "--guidance", "101", "--batch-size", "0"], "--steps 0 must be between 1 and 1000"),
        (["--guidance", "101"], "--guidance 101.0 must be between 0.0 and 100.0"),
        (["--size", "36", "--backend", "diffusers"], "--size 36 is not a multiple of 8, which diffusers needs"),
        (["--size", "-4"], "--size -4 must be between 1 and 4096"),
    ]
    for extra, message in cases:
        assert evaluate.main(base + extra) == 1
        assert message in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- a full disk


def fake_runner(args, settings):
    """Two plain images without loading a model: what is tested here is the writing."""

    def images(jobs):
        yield [Image.new("RGB", (settings.width, settings.height), "red") for _ in jobs], 0.1

    return images, "cpu", "fp32"


def test_a_full_disk_during_sample_is_one_line_and_leaves_no_file(full_disk, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(sample, "jax_runner", fake_runner)
    out = tmp_path / "samples"
    argv = ["--model", str(TINY_TEACHER), "--prompt", "a", "--prompt", "b", "--backend", "jax", "--out", str(out)]
    assert sample.main(argv + ["--grid"]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"error: {out / '0000.png'}: no space left on the device (needs ")
    assert line.endswith(" bytes free)")
    assert [p for p in out.rglob("*") if p.is_file()] == []  # no 0-byte PNG, no temporary file


def fake_generator(backend, pipeline, unet, settings, ema, batch_size):
    return lambda prompts, seeds: Generated([np.full((settings.height, settings.width, 3), s, np.uint8) for s in seeds])


def test_a_full_disk_during_evaluate_is_one_line_and_leaves_no_file(full_disk, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(evaluate, "load_generator", fake_generator)
    (tmp_path / "prompts.txt").write_text("a koala\n")
    out = tmp_path / "out"
    argv = ["--model", f"t={TINY_TEACHER}", "--prompts-file", str(tmp_path / "prompts.txt"), "--out", str(out)]
    assert evaluate.main(argv) == 1
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"error: {out / 'report.json'}: no space left on the device (needs ")
    assert [p.name for p in out.iterdir()] == []  # no report.json.tmp, nothing 0-byte


# ---------------------------------------------------------------- small things a user sees


def test_a_byte_order_mark_does_not_reach_the_prompt(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\ufeffa koala\n\n a cat \n", encoding="utf-8")
    args = sample.build_parser().parse_args(["--model", "m", "--prompt", "x", "--prompts-file", str(prompts)])
    assert sample.read_prompts(args) == ["x", "a koala", "a cat"] == ["x", *read_prompts_file(prompts)]
    assert evaluate.read_prompts_file is read_prompts_file  # one reader


def test_unet_errors_name_the_unet_and_suggest_the_jax_backend(tmp_path, capsys):
    params_dir = tmp_path / "params_dir"
    (params_dir / "params").mkdir(parents=True)
    (params_dir / "config.json").write_text("{}")
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "student_config.json").write_text("{}")
    for unet, kind in ((params_dir, "a JAX params dir"), (run, "a train.py run")):
        argv = ["--model", str(TINY_TEACHER), "--unet", str(unet), "--prompt", "x", "--backend", "diffusers"]
        assert sample.main(argv + ["--out", str(tmp_path / "out")]) == 1
        line = one_error_line(capsys.readouterr().err)
        assert f"--unet {unet} is {kind}, which diffusers does not read as a U-Net: use --backend jax" in line
    missing = tmp_path / "no_unet"
    argv = ["--model", str(TINY_TEACHER), "--unet", str(missing), "--prompt", "x", "--backend", "diffusers"]
    assert sample.main(argv + ["--height", "64", "--width", "64", "--out", str(tmp_path / "out")]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert line == f"error: --unet {missing}: no such file or folder"
    damaged = tmp_path / "damaged_unet"
    damaged.mkdir()
    (damaged / "config.json").write_text("not JSON")
    argv[3] = str(damaged)
    assert sample.main(argv + ["--height", "64", "--width", "64", "--out", str(tmp_path / "out")]) == 1
    line = one_error_line(capsys.readouterr().err)  # diffusers' own error, under --unet's path
    assert line.startswith(f"error: {damaged}: ") and str(TINY_TEACHER) not in line
    assert not (tmp_path / "out").exists()


def test_evaluate_names_every_missing_metric_input(nothing_loads, tmp_path, capsys):
    argv = ["--model", f"t={TINY_TEACHER}", "--clip", str(tmp_path / "clip"), "--out", str(tmp_path / "out")]
    argv += ["--fid-reference", str(tmp_path / "coco"), "--hps-checkpoint", str(tmp_path / "hps.pt")]
    assert evaluate.main(argv) == 1
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith("error: ") and "problems: (1) CLIP folder" in line
    for named in ("clip", "FID reference folder", "coco", "hps.pt"):
        assert named in line
