"""evaluate.py end to end on tiny random pipelines: the same prompts and seeds for every model, a report with
the detector's accuracy and the agreement with the reference, a side-by-side grid; and one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from koala_jax.cli import evaluate
from koala_jax.data import world
from koala_jax.evaluation import report as report_module

from tests.conftest import build_teacher_pipeline, run


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    """(teacher pipeline folder, student pipeline folder: the teacher's KOALA-700M, exported with its pipeline)."""
    root = tmp_path_factory.mktemp("eval")
    build_teacher_pipeline(root / "teacher")
    assert (
        run(
            "student",
            "--teacher",
            root / "teacher",
            "--variant",
            "koala-700m",
            "--format",
            "diffusers",
            "--pipeline",
            root / "teacher",
            "--out",
            root / "student",
        )
        == 0
    )
    return root / "teacher", root / "student"


def test_identical_models_agree_exactly_and_a_student_differs(pipelines, tmp_path, capsys):
    teacher, student = pipelines
    argv = [
        "--model",
        f"teacher={teacher}",
        "--model",
        f"copy={teacher}",
        "--model",
        f"student={student}",
        "--prompts",
        "world-single",
        "--seeds",
        "3,4",
        "--steps",
        "2",
        "--out",
        str(tmp_path),
    ]
    assert evaluate.main(argv) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    items = len(world.single_object_prompts()) * 2
    assert report["reference"] == "teacher" and len(report["items"]) == items
    copy, stud = report["models"]["copy"]["agreement"], report["models"]["student"]["agreement"]
    print(f"copy: {copy}; student: {stud}")
    assert copy["psnr_db"] == float("inf") and copy["latent_mse"] == 0.0  # Same weights, same noise: same images.
    assert np.isfinite(stud["psnr_db"]) and stud["latent_mse"] > 0.0
    for model in ("teacher", "copy", "student"):
        accuracy = report["models"][model]["accuracy"]
        assert accuracy["n"] == items and 0.0 <= accuracy["colour_shape"] <= 1.0
    grid = Image.open(tmp_path / "grid.png")  # A row per prompt; per model, a column per seed.
    cell = report_module.grid_cell(items // 2)
    assert grid.size == (
        report_module.LABEL_WIDTH + 3 * 2 * cell + 2 * report_module.GAP,
        report_module.HEADER + 18 * cell,
    )
    assert "| teacher |" in (tmp_path / "report.md").read_text() and "| student |" in capsys.readouterr().out


def test_diffusers_backend_draws_the_same_images(pipelines, tmp_path):
    teacher, _ = pipelines
    for backend in ("jax", "diffusers"):
        argv = [
            "--model",
            f"teacher={teacher}",
            "--prompts",
            "world-single",
            "--seeds",
            "1",
            "--steps",
            "2",
            "--backend",
            backend,
            "--out",
            str(tmp_path / backend),
        ]
        assert evaluate.main(argv) == 0
    grids = [np.asarray(Image.open(tmp_path / b / "grid.png"), np.float64) for b in ("jax", "diffusers")]
    psnr = 10 * np.log10(255**2 / max(np.mean((grids[0] - grids[1]) ** 2), 1e-12))
    print(f"grid PSNR jax vs diffusers: {psnr:.1f} dB")
    assert psnr >= 35


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "teacher"], "expected NAME=PATH"),
        (["--model", "t=/no/such/folder"], "no such file or folder"),
        (["--model", "t={teacher}/unet"], "give --pipeline"),
        (["--model", "t={teacher}", "--prompts", "cats"], "unknown prompt set"),
        (["--model", "t={teacher}", "--seeds", "a,b"], "comma-separated integers"),
        (["--model", "t={teacher}", "--model", "t={teacher}"], "given twice"),
        (["--model", "t={teacher}", "--steps", "0"], "--steps 0 must be between 1 and 1000"),
    ],
)
def test_mistakes_are_one_line(pipelines, tmp_path, capsys, argv, message):
    teacher, _ = pipelines
    argv = [a.format(teacher=teacher) for a in argv] + ["--out", str(tmp_path / "out")]
    assert evaluate.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_the_grid_is_prompts_by_models_with_the_seeds_side_by_side():
    """Issue 22: the grid was one column of 36 rows (368x4624 px). The main job's evaluation (18 prompts x 4 seeds
    x 2 models of 64 px) now fits under 2,000 px, each image where its prompt, model and seed say."""
    prompts, seeds = [p.text for p in world.single_object_prompts()], [0, 1, 2, 3]
    assert len(prompts) == 18
    colour = lambda m, p, s: (40 * m + 20, 10 * p + 5, 50 * s + 30)  # every (model, prompt, seed) its own
    images = {
        name: [np.full((64, 64, 3), colour(m, p, s), np.uint8) for p in range(len(prompts)) for s in seeds]
        for m, name in enumerate(("teacher", "student"))
    }
    grid = report_module.side_by_side(images, prompts, seeds)
    cell = report_module.grid_cell(len(prompts))
    width = report_module.LABEL_WIDTH + 2 * 4 * cell + report_module.GAP
    assert grid.size == (width, report_module.HEADER + 18 * cell) and grid.height < 2000 and cell > 64
    pixels = np.asarray(grid)
    for m in range(2):
        for p in range(len(prompts)):
            for s in range(len(seeds)):
                x = report_module.LABEL_WIDTH + m * (4 * cell + report_module.GAP) + s * cell + cell // 2
                y = report_module.HEADER + p * cell + cell // 2
                assert tuple(pixels[y, x]) == colour(m, p, s), (m, p, s)
    label_column = pixels[report_module.HEADER :, : report_module.LABEL_WIDTH]
    header = pixels[: report_module.HEADER, report_module.LABEL_WIDTH :]
    assert (label_column < 128).any() and (header < 128).any()  # the prompts, model names and seeds are drawn
    few = report_module.side_by_side(
        {m: i[:8] for m, i in images.items()}, prompts[:2], seeds
    )  # few prompts: larger images, within bounds
    assert few.height == report_module.HEADER + 2 * report_module.CELL_RANGE[1]
