"""Our exports in the clients nobody on this project wrote: diffusers reads a KOALA-700M-shaped student's single
files with the config.json of our own export, bit-identically (U-Net and whole pipeline); every diffusers snippet
of the model cards runs as printed; and ComfyUI's detection rules, reproduced here, recognise the key layout our
single files use (so a layout change that would break ComfyUI fails here first).

The ComfyUI rules are those of `comfy/model_detection.py` (0.3.64): `input_blocks.0.0.weight` gives the model
width, `input_blocks.N.1.transformer_blocks.i` are counted per resnet block while the indices run without a
gap, the context width is read from `attn2.to_k`, and the middle block is a depth, -1 (resnet only) or -2
(absent). The entries they are matched against are `comfy/supported_models.py`'s (docs/convert.md).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from diffusers import UNet2DConditionModel as TorchUNet

from koala_jax import UNetConfig, preset
from koala_jax.weights import model_card
from koala_jax.weights.safetensors import read_header
from koala_jax.weights.single_file import LDM_PREFIX, unet_to_original

from tests.conftest import PER_PAIR_MID, SDXL_LIKE, random_sdxl_pipeline, run

# A tiny SDXL-shaped teacher with SDXL's depth 10 at the deepest stage, whose KOALA-700M student then has
# KOALA-700M's structure: one pair per encoder stage, transformer depths (0,) 2, 5 and no mid block. Its text
# encoders give 16 + 32 = 48-d tokens and a 24-d pooled embedding.
TEACHER = {
    **SDXL_LIKE,
    "block_out_channels": [32, 64, 64],
    "attention_head_dim": [2, 4, 4],
    "transformer_layers_per_block": [1, 2, 10],
    "cross_attention_dim": 48,
    "projection_class_embeddings_input_dim": 24 + 6 * 8,
}
# ComfyUI's entries (comfy/supported_models.py) for the two KOALA students.
COMFY_KOALA = {
    "koala-700m": {"transformer_depth": [0, 2, 5], "context_dim": 2048, "model_channels": 320, "adm_in_channels": 2816},
    "koala-1b": {"transformer_depth": [0, 2, 6], "context_dim": 2048, "model_channels": 320, "adm_in_channels": 2816},
}
PYTHON_BLOCK = re.compile(r"```python\n(.*?)```", re.S)
JSON_BLOCK = re.compile(r"```json\n(.*?)```", re.S)


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> dict[str, Path]:
    """The teacher pipeline (written by diffusers), our KOALA-700M student as a pipeline folder and a U-Net
    folder, and its U-Net-only and whole-pipeline single files, each with its card."""
    root = tmp_path_factory.mktemp("clients")
    teacher = root / "teacher"
    random_sdxl_pipeline(teacher, TEACHER)
    paths = {"teacher": teacher, "pipeline": root / "ours", "unet": root / "ours-unet"}
    paths |= {"unet file": root / "unet.safetensors", "pipeline file": root / "whole.safetensors"}
    student = ["student", "--teacher", teacher, "--variant", "koala-700m", "--format", "diffusers"]
    assert run(*student, "--pipeline", teacher, "--out", paths["pipeline"]) == 0
    assert run("to-diffusers", "--checkpoint", paths["pipeline"], "--out", paths["unet"]) == 0
    assert run("to-single-file", "--checkpoint", paths["pipeline"], "--out", paths["unet file"]) == 0
    whole = ["--pipeline", teacher, "--out", paths["pipeline file"]]
    assert run("to-single-file", "--checkpoint", paths["pipeline"], *whole) == 0
    return paths


def _assert_same_weights(got: torch.nn.Module, want: torch.nn.Module, name: str) -> None:
    got, want = got.state_dict(), want.state_dict()
    assert got.keys() == want.keys(), name
    assert all(torch.equal(got[k], want[k]) for k in want), name


def test_config_json_holds_layers_per_block_as_diffusers_does(export):
    """An int where every stage agrees (diffusers' single-file converter computes `layers_per_block + 1`), a list
    only where stages differ; our reader reads both to the same architecture."""
    ours = json.loads((export["pipeline"] / "unet" / "config.json").read_text())
    assert ours["layers_per_block"] == 1 and ours["mid_block_type"] is None
    assert ours["transformer_layers_per_block"][1:] == [2, 5]
    per_stage = UNetConfig.from_diffusers(PER_PAIR_MID)
    assert per_stage.to_diffusers()["layers_per_block"] == [1, 2, 2]
    for config in (UNetConfig.from_diffusers(ours), per_stage):
        assert UNetConfig.from_diffusers(config.to_diffusers()) == config


def test_diffusers_reads_our_koala_single_files_with_our_own_config(export):
    want = StableDiffusionXLPipeline.from_pretrained(export["pipeline"])
    unet = TorchUNet.from_single_file(str(export["unet file"]), config=str(export["pipeline"]), subfolder="unet")
    _assert_same_weights(unet, want.unet, "unet")
    whole = StableDiffusionXLPipeline.from_single_file(str(export["pipeline file"]), config=str(export["pipeline"]))
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        _assert_same_weights(getattr(whole, name), getattr(want, name), name)


def _card(export: dict[str, Path], kind: str) -> str:
    where = {
        "pipeline": export["pipeline"] / "README.md",
        "unet": export["unet"] / "README.md",
        "single-file-unet": export["unet file"].with_name("unet.README.md"),
        "single-file-pipeline": export["pipeline file"].with_name("whole.README.md"),
    }
    return where[kind].read_text()


@pytest.mark.parametrize("kind", ["pipeline", "unet", "single-file-unet", "single-file-pipeline"])
def test_every_diffusers_snippet_of_the_model_cards_runs(kind, export, tmp_path):
    """The placeholders are filled in as the card says; the config folders are built from the card's own
    config.json (a folder holding it; the teacher's pipeline folder with it as unet/config.json)."""
    card = _card(export, kind)
    config = (export["pipeline"] / "unet" / "config.json").read_text()
    if kind.startswith("single-file"):
        assert "A1111 / Forge: not checked" in card and json.loads(JSON_BLOCK.findall(card)[-1]) == json.loads(config)
        config = JSON_BLOCK.findall(card)[-1]
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.json").write_text(config)
    shutil.copytree(export["teacher"], tmp_path / "pipeline config")
    (tmp_path / "pipeline config" / "unet" / "config.json").write_text(config)
    fill = {
        model_card.REPO: export["unet" if kind == "unet" else "pipeline"],
        model_card.PIPELINE: export["teacher"],
        model_card.FILE: export["pipeline file" if kind == "single-file-pipeline" else "unet file"],
        model_card.CONFIG_FOLDER: tmp_path / "config",
        model_card.PIPELINE_CONFIG: tmp_path / "pipeline config",
    }
    snippets = PYTHON_BLOCK.findall(card)
    assert snippets
    want = TorchUNet.from_pretrained(export["pipeline"] / "unet")
    for snippet in snippets:
        for placeholder, value in fill.items():
            snippet = snippet.replace(placeholder, str(value))
        assert "<" not in snippet, snippet
        scope: dict = {}
        exec(snippet, scope)  # noqa: S102  (the card's own code, run as a reader would)
        _assert_same_weights(scope["pipe"].unet, want, kind)


def comfy_detect(shapes: dict[str, tuple[int, ...]]) -> dict:
    """ComfyUI's reading of an SGM U-Net (keys without `model.diffusion_model.`): the fields its KOALA entries are
    matched on, the middle block's depth and the output block count."""

    def count(prefix: str) -> int:  # consecutive indices from 0; a gap stops the count
        n = 0
        while any(k.startswith(prefix.format(n)) for k in shapes):
            n += 1
        return n

    found = {
        "model_channels": shapes["input_blocks.0.0.weight"][0],
        "adm_in_channels": shapes["label_emb.0.0.weight"][1],
    }
    depths = []
    for i in range(count("input_blocks.{}.")):
        if f"input_blocks.{i}.0.in_layers.0.weight" in shapes:  # a resnet block (not conv_in, not a downsampler)
            blocks = f"input_blocks.{i}.1.transformer_blocks."
            depths.append(count(blocks + "{}."))
            if depths[-1] and "context_dim" not in found:
                found["context_dim"] = shapes[blocks + "0.attn2.to_k.weight"][1]
    found["transformer_depth"] = depths
    if "middle_block.1.proj_in.weight" in shapes:
        found["middle"] = count("middle_block.1.transformer_blocks.{}.")
    else:
        found["middle"] = -1 if "middle_block.0.in_layers.0.weight" in shapes else -2
    found["output_blocks"] = count("output_blocks.{}.")
    return found


def _original_shapes(config: UNetConfig) -> dict[str, tuple[int, ...]]:
    """The shapes under the keys our single files use, from diffusers' U-Net on the meta device (no memory)."""
    with torch.device("meta"):
        state = {k: tuple(v.shape) for k, v in TorchUNet(**config.to_diffusers()).state_dict().items()}
    return {k.removeprefix(LDM_PREFIX): v for k, v in unet_to_original(state, config).items()}


@pytest.mark.parametrize("variant,middle,keys", [("koala-700m", -2, 584), ("koala-1b", 6, 790)])
def test_comfyui_detects_our_full_size_koala_layouts(variant, middle, keys):
    """The key counts are what ComfyUI loaded strictly from our full-size files (docs/convert.md)."""
    shapes = _original_shapes(preset(variant))
    found = comfy_detect(shapes)
    assert {k: found[k] for k in COMFY_KOALA[variant]} == COMFY_KOALA[variant]
    assert found["middle"] == middle and found["output_blocks"] == 6 and len(shapes) == keys
    sdxl = comfy_detect(_original_shapes(preset("sdxl-base")))  # ComfyUI's SDXL entry, for contrast
    assert sdxl["transformer_depth"] == [0, 0, 2, 2, 10, 10] and sdxl["middle"] == 10


def test_comfyui_reads_the_layout_of_a_file_we_wrote(export):
    """The same rules on the tiny KOALA-700M-shaped file to-single-file wrote."""
    header, _ = read_header(export["unet file"])
    shapes = {k.removeprefix(LDM_PREFIX): tuple(v["shape"]) for k, v in header.items()}
    assert all(k.startswith(LDM_PREFIX) for k in header) and "input_blocks.0.0.weight" in shapes
    found = comfy_detect(shapes)
    assert found["transformer_depth"] == [0, 2, 5] and found["middle"] == -2 and found["output_blocks"] == 6
    assert found["context_dim"] == TEACHER["cross_attention_dim"] and found["model_channels"] == 32
