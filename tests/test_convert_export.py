"""Exports: single original-format files (U-Net alone or the whole pipeline) that diffusers and our own
reader read back bit-identically, per-pair U-Net folders round-tripped, model cards and hub uploads, NaN /
overflow checks on import and export, and the progress line."""

from __future__ import annotations

import io
import json
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from diffusers import UNet2DConditionModel as TorchUNet

from koala_jax import UNetConfig
from koala_jax.weights import read_source
from koala_jax.weights.checks import BadValuesError
from koala_jax.weights.model_card import CardFacts, render
from koala_jax.weights.progress import Progress
from koala_jax.weights.safetensors import load_file, save_file
from koala_jax.weights.single_file import read_original_components
from koala_jax.weights.state_dict import torch_to_flax
from koala_jax.weights.training_run import checkpoint_steps

from tests.conftest import (
    MICRO,
    PER_PAIR,
    PER_PAIR_MID,
    assert_trees_equal,
    numpy_state,
    random_sdxl_pipeline,
    randomize_,
    run,
)

WEIGHTS = "diffusion_pytorch_model.safetensors"
FILES = {"unet": WEIGHTS, "vae": WEIGHTS, "text_encoder": "model.safetensors", "text_encoder_2": "model.safetensors"}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> tuple[Path, StableDiffusionXLPipeline]:
    """A tiny SDXL pipeline folder whose U-Net has per-pair depths and a single-resnet mid block (PER_PAIR),
    with random non-trivial weights in every part."""
    folder = tmp_path_factory.mktemp("pipeline")
    return folder, random_sdxl_pipeline(folder, PER_PAIR)


def _flat_clip(state: dict) -> dict:
    """CLIP keys with or without transformers' `text_model.` level (>= 5.6 saves CLIPTextModel without it)."""
    return {k.removeprefix("text_model."): v for k, v in state.items()}


def test_whole_pipeline_single_file_reads_back_in_diffusers_and_ours(pipeline, tmp_path, capsys):
    folder, pipe = pipeline
    out = tmp_path / "model.safetensors"
    assert run("to-single-file", "--checkpoint", folder, "--pipeline", folder, "--out", out) == 0
    assert capsys.readouterr().err == ""  # A short conversion off a terminal prints no progress.

    back = StableDiffusionXLPipeline.from_single_file(str(out), config=str(folder), local_files_only=True)
    for name in FILES:
        want, got = getattr(pipe, name).state_dict(), getattr(back, name).state_dict()
        assert got.keys() == want.keys(), name
        assert all(torch.equal(got[k], want[k]) for k in want), name
    ours = read_original_components(out)
    for name, weights in FILES.items():
        want, got = _flat_clip(load_file(folder / name / weights)), _flat_clip(ours[name])
        assert sorted(got) == sorted(want), name
        for k in want:
            assert got[k].dtype == want[k].dtype and np.asarray(got[k]).tobytes() == want[k].tobytes(), k
    card = (tmp_path / "model.README.md").read_text()
    assert card.startswith("---\nlibrary_name: diffusers\n") and "with VAE and text encoders" in card


def test_unet_single_file_in_fp16_and_pushed_to_the_hub(pipeline, tmp_path, monkeypatch):
    """A JAX params dir -> an fp16 U-Net file that diffusers reads as ours; our reader gives the same bits;
    --push-to-hub uploads the file and its card (the upload calls are replaced: no network)."""
    folder, pipe = pipeline
    calls = []
    monkeypatch.setattr(huggingface_hub, "create_repo", lambda repo_id, **kw: f"https://hf.co/{repo_id}")
    monkeypatch.setattr(huggingface_hub, "upload_file", lambda **kw: calls.append(kw))
    assert run("to-jax", "--src", folder, "--out", tmp_path / "jax") == 0
    out = tmp_path / "unet.safetensors"
    argv = ["--out", out, "--dtype", "fp16", "--push-to-hub", "me/tiny", "--base-model", "org/teacher"]
    assert run("to-single-file", "--checkpoint", tmp_path / "jax", *argv) == 0

    want = {k: v.numpy().astype(np.float16) for k, v in pipe.unet.state_dict().items()}
    got = TorchUNet.from_single_file(
        str(out), config=str(folder), subfolder="unet", local_files_only=True, torch_dtype=torch.float16
    ).state_dict()
    assert all(np.array_equal(got[k].numpy(), v) for k, v in want.items()) and got.keys() == want.keys()
    config, params = read_source(out, folder / "unet")
    assert config == UNetConfig.from_diffusers(PER_PAIR)
    assert_trees_equal(params, torch_to_flax(want))
    assert [(c["path_in_repo"], Path(c["path_or_fileobj"]).name) for c in calls] == [
        ("unet.safetensors", "unet.safetensors"),
        ("README.md", "unet.README.md"),
    ]
    assert "base_model: org/teacher" in (tmp_path / "unet.README.md").read_text()


def test_per_pair_folder_round_trips_through_jax_and_a_single_file(tmp_path):
    """Per-stage pair counts (which diffusers' own single-file reader cannot number): folder -> single file
    -> JAX -> folder, bit-identical, with a config that reads back equal."""
    unet = randomize_(TorchUNet(**PER_PAIR_MID), seed=8)
    unet.save_pretrained(tmp_path / "unet")
    assert run("to-single-file", "--checkpoint", tmp_path / "unet", "--out", tmp_path / "u.safetensors") == 0
    src = ["--src", tmp_path / "u.safetensors", "--config", tmp_path / "unet"]
    assert run("to-jax", *src, "--out", tmp_path / "jax") == 0
    assert run("to-diffusers", "--checkpoint", tmp_path / "jax", "--out", tmp_path / "back") == 0
    want, got = load_file(tmp_path / "unet" / WEIGHTS), load_file(tmp_path / "back" / WEIGHTS)
    assert sorted(got) == sorted(want)
    assert all(got[k].dtype == want[k].dtype and got[k].tobytes() == want[k].tobytes() for k in want)
    config = UNetConfig.from_diffusers(json.loads((tmp_path / "back" / "config.json").read_text()))
    assert config == UNetConfig.from_diffusers(dict(unet.config))


def test_model_card_of_a_pipeline_export(pipeline, tmp_path, monkeypatch):
    folder, pipe = pipeline
    uploads = []
    monkeypatch.setattr(huggingface_hub, "create_repo", lambda repo_id, **kw: f"https://hf.co/{repo_id}")
    monkeypatch.setattr(huggingface_hub, "upload_folder", lambda **kw: uploads.append(kw))
    out = tmp_path / "export"
    assert run("to-diffusers", "--checkpoint", folder, "--pipeline", folder, "--out", out, "--push-to-hub", "me/x") == 0
    assert uploads == [{"repo_id": "me/x", "folder_path": str(out), "repo_type": "model"}]
    card = (out / "README.md").read_text()
    front, body = card.split("\n---\n", 1)
    assert front.splitlines()[:2] == ["---", "library_name: diffusers"] and "- stable-diffusion-xl" in front
    assert "# base_model: TODO" in front and "license: other  # TODO" in front
    n = sum(p.numel() for p in pipe.unet.parameters())
    assert f"parameters: {n:,}" in body and "UNetMidBlock2D" in body and "2,1,3" in body
    assert "EVALUATION PLACEHOLDER" in body and "Not exported from a training run" in body
    assert 'StableDiffusionXLPipeline.from_pretrained("<this repo>")' in body


def test_model_card_of_a_training_run(tmp_path):
    """What a run records (student_config.json, step folders) fills the card's training section."""
    (tmp_path / "checkpoints" / "500").mkdir(parents=True)
    (tmp_path / "checkpoints" / "1000").mkdir()
    (tmp_path / "checkpoints" / "1500.orbax-checkpoint-tmp-3").mkdir()  # an unfinished save
    assert checkpoint_steps(tmp_path) == [500, 1000]
    config = UNetConfig.from_diffusers(MICRO)
    facts = CardFacts(
        "run",
        config,
        "unet",
        "fp16",
        "runs/x",
        teacher="org/sdxl",
        base_model="org/sdxl",
        training={"training steps (exported checkpoint)": 1000},
        evaluation={"HPSv2": 27.5},
    )
    card = render(facts)
    assert "base_model: org/sdxl" in card and "- training steps (exported checkpoint): 1000" in card
    assert '"_class_name": "UNet2DConditionModel"' in card and "| HPSv2 | 27.5 |" in card
    assert "EVALUATION PLACEHOLDER" not in card


@pytest.fixture
def micro_folder(tmp_path) -> tuple[Path, dict]:
    unet = randomize_(TorchUNet(**MICRO), seed=9)
    unet.save_pretrained(tmp_path / "micro")
    return tmp_path / "micro", numpy_state(unet)


def test_nan_and_inf_are_reported_by_tensor_name(micro_folder, tmp_path, capsys):
    folder, state = micro_folder
    bad = {k: np.array(v) for k, v in state.items()}
    bad["conv_in.weight"][0, 0, 0, 0] = np.nan
    bad["conv_out.bias"][:2] = [np.inf, np.nan]
    save_file(bad, folder / WEIGHTS)  # valid names and shapes
    assert run("to-jax", "--src", folder, "--out", tmp_path / "o") == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {folder}: 2 bad tensor(s): ") and len(err.strip().splitlines()) == 1
    assert "'conv_in.weight' has 1 NaN and 0 Inf values" in err and "'conv_out.bias' has 1 NaN and 1 Inf" in err
    assert not (tmp_path / "o").exists()
    with pytest.raises(BadValuesError, match="'conv_in.weight' has 1 NaN"):  # What the trainer reads through.
        read_source(folder)


def test_down_casts_that_overflow_are_errors(micro_folder, tmp_path, capsys):
    folder, state = micro_folder
    big = {**state, "conv_out.weight": state["conv_out.weight"] * 1e6}  # finite in fp32, not in fp16
    save_file(big, folder / WEIGHTS)
    assert run("to-diffusers", "--checkpoint", folder, "--out", tmp_path / "fp16", "--dtype", "fp16") == 1
    err = capsys.readouterr().err
    assert "'conv_out.weight' overflows float16: |value| up to" in err and "65504" in err.replace("6.55e+04", "65504")
    assert not (tmp_path / "fp16").exists()
    assert run("to-diffusers", "--checkpoint", folder, "--out", tmp_path / "bf16", "--dtype", "bf16") == 0


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_progress_line(monkeypatch):
    clock = _Clock()
    tty = io.StringIO()
    monkeypatch.setattr(tty, "isatty", lambda: True)
    progress = Progress("converting", 4 * 2**20, 4, stream=tty, clock=clock)
    for _ in range(2):
        clock.now += 1.0
        progress.update(2**20)
    assert tty.getvalue().endswith("converting: 2.0 MB / 4.0 MB, 2/4 tensors, 1.0 MB/s, ETA 2 s")
    assert tty.getvalue().startswith("\r\033[K")  # redrawn in place
    log = io.StringIO()
    quiet = Progress("writing", 100, 3, stream=log, clock=clock)
    quiet.update(10)
    clock.now += 11.0
    quiet.update(10)
    quiet.close()
    assert log.getvalue().splitlines() == ["writing: 20 B / 100 B, 2/3 tensors, 2 B/s, ETA 44 s"]
