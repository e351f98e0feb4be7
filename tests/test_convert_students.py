"""Custom students from a spec (file or inline JSON, CLI and trainer alike), KOALA presets of per-pair
teachers, and one clear error for every spec the teacher cannot provide."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from diffusers import UNet2DConditionModel as TorchUNet
from flax.traverse_util import flatten_dict

from koala_jax import UNetConfig
from koala_jax.models.naming import flax_path_to_torch_module
from koala_jax.students import build_student, derive_student_config, preset, student_architecture
from koala_jax.students.mapping import teacher_path_for
from koala_jax.train.losses import feature_pairs
from koala_jax.weights.params_dir import load_params
from koala_jax.weights.state_dict import torch_to_flax

from tests.conftest import PER_PAIR, TINY_TEACHER, numpy_state, randomize_, run

# SSD-1B's kind of student from the tiny teacher (depths 1 / 2 / 4, two pairs per down block): per-pair
# depths, listed teacher blocks ([0, 3]: the first and the last of four), the single-resnet mid block.
SSD_LIKE = {
    "name": "ssd-like",
    "down": [{"layers": 2}, {"layers": 2, "depth": [2, 1]}, {"layers": 2, "depth": [[0, 3], 2]}],
    "mid": "resnet",
    "up": [{"depth": [[3, 1], 2, 4]}, {"layers": 3, "depth": 1}, {}],
}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> tuple[Path, TorchUNet]:
    folder = tmp_path_factory.mktemp("teacher")
    unet = randomize_(TorchUNet(**TINY_TEACHER), seed=7)
    unet.save_pretrained(folder)
    return folder, unet


def test_spec_student_from_a_file(teacher, tmp_path, capsys):
    folder, unet = teacher
    (tmp_path / "ssd.json").write_text(json.dumps(SSD_LIKE))
    out = tmp_path / "student"
    assert run("student", "--teacher", folder, "--spec", tmp_path / "ssd.json", "--out", out, "--format", "both") == 0
    printed = capsys.readouterr().out
    assert (
        "down_blocks.2.attentions.0.transformer_blocks.1 <- down_blocks.2.attentions.0.transformer_blocks.3" in printed
    )

    config, params = load_params(out / "jax")
    assert config.mid_block_type == "UNetMidBlock2D" and config.layers_per_block == (2, 2, 2)
    assert config.transformer_layers_per_block == (1, (2, 1), 2)
    assert config.reverse_transformer_layers_per_block == ((2, 2, 4), 1, 1)
    record = json.loads((out / "student_init.json").read_text())
    assert record["selection"] == {"down_blocks.2.attentions.0": [0, 3], "up_blocks.0.attentions.0": [3, 1]}
    assert record["fresh"] == [] and UNetConfig.from_diffusers(record["config"]) == config
    assert record["mapping"]["mid_block.resnets.0.conv1.kernel"] == "mid_block.resnets.0.conv1.kernel"
    assert record["mapping"]["up_blocks.0.attentions.2.transformer_blocks.3.ff.net.2.kernel"] == (
        "up_blocks.0.attentions.2.transformer_blocks.3.ff.net.2.kernel"
    )
    teacher_flat = {flax_path_to_torch_module(p): v for p, v in flatten_dict(torch_to_flax(numpy_state(unet))).items()}
    for path, value in flatten_dict(params).items():
        key = flax_path_to_torch_module(path)
        np.testing.assert_array_equal(value, teacher_flat[record["mapping"][key]], err_msg=key)
    exported = TorchUNet.from_pretrained(out / "unet")  # diffusers builds the spec's architecture
    assert sum(p.numel() for p in exported.parameters()) == sum(v.size for v in flatten_dict(params).values())
    assert (out / "README.md").is_file()


def test_inline_spec_and_the_trainer_form(teacher):
    _, unet = teacher
    teacher_cfg = UNetConfig.from_diffusers(TINY_TEACHER)
    inline = '{"down": [{"layers": 1}, {"layers": 1}, {"layers": 1, "depth": 1}], "mid": "none", "up": [{}, {}, {}]}'
    student = build_student(teacher_cfg, torch_to_flax(numpy_state(unet)), inline)
    assert student.config.mid_block_type is None and student.config.transformer_layers_per_block == (1, 2, 1)
    assert student.config.reverse_transformer_layers_per_block == (4, 2, 1) and not student.fresh
    # The KOALA-700M preset is the spec "one pair fewer, deepest stage halved, no mid block".
    koala = derive_student_config(teacher_cfg, "koala-700m")
    assert koala.transformer_layers_per_block == (1, 2, 2) and koala.reverse_transformer_layers_per_block == (2, 2, 1)


def test_the_documented_specs_give_ssd_1b_and_vega_from_sdxl_base():
    """docs/convert.md's specs: SDXL-Base -> SSD-1B's and Segmind-Vega's architectures (no weights needed)."""
    sdxl = preset("sdxl-base")
    ssd = {
        "down": [{"layers": 2}, {"layers": 2, "depth": 2}, {"layers": 2, "depth": 4}],
        "mid": "resnet",
        "up": [{"depth": [4, 4, 10]}, {"depth": [2, 1, 1]}, {}],
    }
    vega = {**ssd, "down": [{"layers": 2}, {"layers": 2, "depth": 1}, {"layers": 2, "depth": 2}]}
    vega["up"] = [{"depth": 2}, {"depth": 1}, {}]
    per_pair = {**sdxl.to_diffusers(), "mid_block_type": "UNetMidBlock2D"}
    for spec, encoder, decoder in (
        (ssd, [[1], [2, 2], [4, 4]], [[4, 4, 10], [2, 1, 1], 1]),
        (vega, [[1], [1, 1], [2, 2]], [[2, 2, 2], [1, 1, 1], 1]),
    ):
        config, selection = student_architecture(sdxl, json.dumps(spec))
        want = {**per_pair, "transformer_layers_per_block": encoder, "reverse_transformer_layers_per_block": decoder}
        assert config == UNetConfig.from_diffusers(want) and selection == {}


def test_koala_presets_of_a_per_pair_teacher():
    """Per-pair teacher depths are cut pair by pair (decoder: the first pairs and the last)."""
    teacher = UNetConfig.from_diffusers(PER_PAIR)
    student = derive_student_config(teacher, "koala-1b")
    assert student.layers_per_block == (1, 1, 1) and student.mid_block_type == "UNetMidBlock2D"
    assert student.transformer_layers_per_block == (1, 2, 1)  # deepest (2, 0) -> first pair 2 -> 60%: 1
    assert student.reverse_transformer_layers_per_block == ((1, 2), 1, 1)  # (2, 1, 3): pairs 0 and 2, cut


def test_feature_pairs_follow_the_listed_blocks():
    teacher = UNetConfig.from_diffusers(TINY_TEACHER)
    student = UNetConfig.from_diffusers(
        {**TINY_TEACHER, "transformer_layers_per_block": [1, 2, 2], "reverse_transformer_layers_per_block": [4, 2, 1]}
    )
    selection = {"down_blocks.2.attentions.1": (0, 3)}
    name = "down_blocks.2.attentions.1.transformer_blocks.1.attn1"
    assert (
        teacher_path_for(name, teacher, student, selection) == "down_blocks.2.attentions.1.transformer_blocks.3.attn1"
    )
    source = "down_blocks.2.attentions.1.transformer_blocks.3.attn1"
    assert feature_pairs({name: (1, 4, 128)}, {source: (1, 4, 128)}, teacher, student, selection=selection) == {
        name: source
    }


SPEC_ERRORS = {
    "more pairs than the teacher": (
        {**SSD_LIKE, "down": [{"layers": 3}, {"layers": 2}, {"layers": 2}]},
        "down[0] keeps 3 pairs, the teacher's down_blocks.0 has 2",
    ),
    "deeper than the teacher": (
        {**SSD_LIKE, "down": [{"layers": 2}, {"layers": 2, "depth": 3}, {"layers": 2}]},
        "down[1]: pair 0 keeps 3 transformer blocks, the teacher's down_blocks.1.attentions.0 has 2",
    ),
    "wrong stage count": ({**SSD_LIKE, "up": [{}, {}]}, "3 down and 2 up stages given, the teacher has 3 of each"),
    "index out of range": (
        {**SSD_LIKE, "up": [{"depth": [[4], 1, 1]}, {}, {}]},
        "up[0]: pair 0 lists teacher blocks [4]; up_blocks.0.attentions.0 has blocks 0 to 3",
    ),
    "unknown key": ({**SSD_LIKE, "dwon": []}, "unknown key(s) ['dwon']"),
    "depth without attention": (
        {**SSD_LIKE, "down": [{"layers": 2, "depth": 1}, {"layers": 2}, {"layers": 2}]},
        "the teacher's down_blocks.0 has no attention, so 'depth' cannot be given",
    ),
    "decoder pairs": ({**SSD_LIKE, "up": [{"layers": 2}, {}, {}]}, "up[0] gives 2 pairs, but diffusers builds"),
    "depth list length": (
        {**SSD_LIKE, "up": [{"depth": [1, 1]}, {}, {}]},
        "up[0]: 'depth' lists 2 entries for 3 kept pairs",
    ),
    "mid choice": ({**SSD_LIKE, "mid": "half"}, "'mid' = 'half'; choose from keep, resnet, none"),
    "not JSON": ("{down: 1}", "not JSON"),
}


@pytest.mark.parametrize("case", sorted(SPEC_ERRORS))
def test_specs_the_teacher_cannot_provide_are_one_line_errors(case, teacher, tmp_path, capsys):
    spec, message = SPEC_ERRORS[case]
    (tmp_path / "spec.json").write_text(spec if isinstance(spec, str) else json.dumps(spec))
    assert run("student", "--teacher", teacher[0], "--spec", tmp_path / "spec.json", "--out", tmp_path / "o") == 1
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and message in captured.err, captured.err
    assert len(captured.err.strip().splitlines()) == 1 and "Traceback" not in captured.err + captured.out
    assert not (tmp_path / "o").exists()
