"""convert_weights.py on tiny random models: diffusers folder <-> JAX round trips, KOALA students initialised
from the teacher, exported folders and pipelines that diffusers loads and runs, and one clear error per
bad input."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from diffusers import UNet2DConditionModel as TorchUNet
from flax.traverse_util import flatten_dict

from koala_jax import UNet2DConditionModel, UNetConfig
from koala_jax.models import abstract_params
from koala_jax.models.naming import flax_path_to_torch_module
from koala_jax.students import build_student, derive_student_config
from koala_jax.students.mapping import teacher_path_for
from koala_jax.weights.params_dir import load_params, save_params
from koala_jax.weights.safetensors import load_file, save_file
from koala_jax.weights.state_dict import torch_to_flax

from tests.conftest import (
    MICRO,
    TINY_TEACHER,
    assert_trees_equal,
    build_teacher_pipeline,
    make_inputs,
    numpy_state,
    randomize_,
    rel_err,
    run,
    torch_forward,
)

WEIGHTS = "diffusion_pytorch_model.safetensors"
MICRO_CROSS_24 = {**MICRO, "cross_attention_dim": 24}  # A student whose attn2 projections cannot come from MICRO.


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> tuple[Path, TorchUNet]:
    folder = tmp_path_factory.mktemp("teacher")
    return folder, build_teacher_pipeline(folder)


@pytest.fixture(scope="module")
def teacher_jax(teacher, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("jax") / "teacher"
    assert run("to-jax", "--src", teacher[0], "--out", out) == 0
    return out


def test_folder_to_jax_to_folder_is_bit_identical(teacher, teacher_jax, tmp_path):
    folder, unet = teacher
    config, params = load_params(teacher_jax)
    assert config == UNetConfig.from_diffusers(dict(unet.config))
    assert_trees_equal(params, torch_to_flax(numpy_state(unet)))

    assert run("to-diffusers", "--checkpoint", teacher_jax, "--out", tmp_path / "back") == 0
    want, got = load_file(folder / "unet" / WEIGHTS), load_file(tmp_path / "back" / WEIGHTS)
    assert sorted(got) == sorted(want)
    for key in want:
        assert got[key].dtype == want[key].dtype and got[key].tobytes() == want[key].tobytes(), key
    exported = json.loads((tmp_path / "back" / "config.json").read_text())
    assert UNetConfig.from_diffusers(exported) == config


def test_sharded_folder_and_dtype_casts(teacher, tmp_path):
    _, unet = teacher
    unet.save_pretrained(tmp_path / "sharded", max_shard_size="2MB")
    assert (tmp_path / "sharded" / f"{WEIGHTS}.index.json").is_file()
    assert run("to-jax", "--src", tmp_path / "sharded", "--out", tmp_path / "bf16", "--dtype", "bf16") == 0
    _, params = load_params(tmp_path / "bf16")
    want = jax.tree.map(lambda x: x.astype(ml_dtypes.bfloat16), torch_to_flax(numpy_state(unet)))
    assert_trees_equal(params, want)

    assert run("to-diffusers", "--checkpoint", tmp_path / "bf16", "--out", tmp_path / "fp16", "--dtype", "fp16") == 0
    exported = load_file(tmp_path / "fp16" / WEIGHTS)
    reference = numpy_state(unet)
    assert all(v.dtype == np.float16 for v in exported.values())
    key = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    np.testing.assert_array_equal(exported[key], reference[key].astype(ml_dtypes.bfloat16).astype(np.float16))


def predicted_fresh(teacher_params: dict, teacher_cfg: UNetConfig, student_cfg: UNetConfig) -> list[str]:
    """Student parameters without a same-shaped teacher source under `teacher_path_for`, computed from shapes."""
    teacher_shapes = {flax_path_to_torch_module(p): np.shape(v) for p, v in flatten_dict(teacher_params).items()}
    fresh = []
    for path, leaf in flatten_dict(abstract_params(student_cfg)).items():
        key = flax_path_to_torch_module(path)
        if teacher_shapes.get(teacher_path_for(key, teacher_cfg, student_cfg)) != leaf.shape:
            fresh.append(key)
    return fresh


def assert_student_from_teacher(student: dict, teacher_params: dict, mapping: dict[str, str]) -> None:
    teacher_flat = {flax_path_to_torch_module(p): v for p, v in flatten_dict(teacher_params).items()}
    student_flat = {flax_path_to_torch_module(p): v for p, v in flatten_dict(student).items()}
    for key, source in mapping.items():
        np.testing.assert_array_equal(np.asarray(student_flat[key]), np.asarray(teacher_flat[source]), err_msg=key)


def test_student_cli_init_export_and_forward_parity(teacher, tmp_path, capsys):
    """KOALA-700M from the tiny teacher: every tensor with a teacher source equals it, nothing else is fresh,
    and the exported diffusers folder computes what the JAX student computes."""
    out = tmp_path / "student"
    assert run("student", "--teacher", teacher[0], "--variant", "koala-700m", "--out", out, "--format", "both") == 0
    printed = capsys.readouterr().out
    assert "up_blocks.0.resnets.1 <- up_blocks.0.resnets.2" in printed and "fresh (random init): none" in printed

    teacher_cfg = UNetConfig.from_diffusers(dict(teacher[1].config))
    teacher_params = torch_to_flax(numpy_state(teacher[1]))
    config, params = load_params(out / "jax")
    assert config == derive_student_config(teacher_cfg, "koala-700m") and config.mid_block_type is None
    record = json.loads((out / "student_init.json").read_text())
    assert record["fresh"] == predicted_fresh(teacher_params, teacher_cfg, config) == []
    assert len(record["mapping"]) == len(flatten_dict(params))
    assert (
        record["mapping"]["up_blocks.0.attentions.1.transformer_blocks.1.attn1.to_q.kernel"]
        == "up_blocks.0.attentions.2.transformer_blocks.1.attn1.to_q.kernel"
    )
    assert_student_from_teacher(params, teacher_params, record["mapping"])

    torch_student = TorchUNet.from_pretrained(out / "unet").eval()
    assert sum(p.numel() for p in torch_student.parameters()) == sum(x.size for x in jax.tree.leaves(params))
    x = make_inputs(TINY_TEACHER, 1, 8, 8, per_sample_t=True)
    want, _ = torch_forward(torch_student, x, capture=False)
    got = jax.jit(UNet2DConditionModel(config).apply)({"params": params}, **x)
    assert rel_err(got, want) <= 1e-5


def test_koala_1b_student_keeps_the_mid_block(teacher):
    """(KOALA-700M is covered end to end above.)"""
    _, unet = teacher
    teacher_cfg = UNetConfig.from_diffusers(dict(unet.config))
    teacher_params = torch_to_flax(numpy_state(unet))
    student = build_student(teacher_cfg, teacher_params, "koala-1b")
    config, params, mapping, fresh = student.config, student.params, student.mapping, student.fresh
    assert fresh == predicted_fresh(teacher_params, teacher_cfg, config) == []
    assert sorted(mapping) == sorted(flax_path_to_torch_module(p) for p in flatten_dict(params))
    assert (
        mapping["mid_block.attentions.0.transformer_blocks.1.attn1.to_q.kernel"]
        == "mid_block.attentions.0.transformer_blocks.1.attn1.to_q.kernel"
    )
    assert_student_from_teacher(params, teacher_params, mapping)


def test_a_half_precision_teacher_gives_a_float32_student():
    """The student's parameters are master weights: float32 from an fp16 teacher (an fp16 export used as the
    teacher made an fp16 student whose first optimizer step came back float32, and the compiled step refused it)."""
    teacher_cfg = UNetConfig.from_diffusers(MICRO)
    teacher_params = jax.tree.map(
        lambda a: a.astype(np.float16), torch_to_flax(numpy_state(randomize_(TorchUNet(**MICRO), seed=3)))
    )
    student = build_student(teacher_cfg, teacher_params, "koala-700m")
    dtypes = {np.asarray(a).dtype for a in jax.tree.leaves(student.params)}
    assert dtypes == {np.dtype(np.float32)}, dtypes
    assert not student.fresh
    assert_student_from_teacher(student.params, teacher_params, student.mapping)


def test_parameters_without_a_teacher_source_start_fresh():
    """A student whose cross-attention width differs from the teacher's: exactly the key/value projections
    of attn2 (what the mapping predicts) get random values, everything else still comes from the teacher."""
    teacher_cfg = UNetConfig.from_diffusers(MICRO)
    teacher_params = torch_to_flax(numpy_state(randomize_(TorchUNet(**MICRO), seed=3)))
    config = UNetConfig.from_diffusers(MICRO_CROSS_24)
    student = build_student(teacher_cfg, teacher_params, config, seed=0)
    params, mapping, fresh = student.params, student.mapping, student.fresh
    assert fresh == predicted_fresh(teacher_params, teacher_cfg, config)
    assert fresh and all(k.split(".")[-2] in ("to_k", "to_v") and ".attn2." in k for k in fresh)
    assert not set(fresh) & set(mapping)
    assert_student_from_teacher(params, teacher_params, mapping)
    student_flat = {flax_path_to_torch_module(p): np.asarray(v) for p, v in flatten_dict(params).items()}
    expected = {flax_path_to_torch_module(p): v.shape for p, v in flatten_dict(abstract_params(config)).items()}
    for key in fresh:  # Flax's default (LeCun normal) initialisation of a (fan_in, fan_out) kernel.
        value = student_flat[key]
        assert value.shape == expected[key] and abs(np.std(value) * np.sqrt(value.shape[0]) - 1) < 0.2


def test_pipeline_export_runs_in_diffusers(teacher, teacher_jax, tmp_path):
    folder, _ = teacher
    out = tmp_path / "pipeline"
    assert run("to-diffusers", "--checkpoint", teacher_jax, "--out", out, "--pipeline", folder) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted([*(p.name for p in folder.iterdir()), "README.md"])
    assert (out / "vae" / WEIGHTS).read_bytes() == (folder / "vae" / WEIGHTS).read_bytes()
    pipe = StableDiffusionXLPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(
        "a koala",
        num_inference_steps=2,
        height=64,
        width=64,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert image.shape == (1, 64, 64, 3) and np.all(np.isfinite(image))


def test_info_prints_exact_counts(teacher, teacher_jax, capsys):
    folder, unet = teacher
    assert run("info", "koala-700m") == 0
    assert "parameters: 782,822,724" in capsys.readouterr().out
    n_teacher = sum(p.numel() for p in unet.parameters())
    for target in (folder, teacher_jax):
        assert run("info", target) == 0
        printed = capsys.readouterr().out
        assert f"parameters: {n_teacher:,}" in printed
        assert "down_blocks.2  CrossAttnDownBlock2D     128       2        4" in printed


# --------------------------------------------------------------------------------------------- errors


def _sd15_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "sd15"
    folder.mkdir()
    config = {k: v for k, v in TINY_TEACHER.items() if not k.startswith(("addition", "projection"))}
    (folder / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel", **config}))
    return folder


def _edited_copy(teacher: Path, tmp_path: Path, edit) -> Path:
    """The teacher's U-Net folder with its state dict passed through `edit`."""
    folder = tmp_path / "edited"
    folder.mkdir()
    (folder / "config.json").write_text((teacher / "unet" / "config.json").read_text())
    state = {k: np.array(v) for k, v in load_file(teacher / "unet" / WEIGHTS).items()}
    save_file(edit(state), folder / WEIGHTS)
    return folder


def _micro_jax(tmp_path: Path) -> Path:
    config = UNetConfig.from_diffusers(MICRO_CROSS_24)
    params = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), abstract_params(config))
    return save_params(tmp_path / "micro", params, config)


def _truncated(teacher: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "truncated"
    folder.mkdir()
    (folder / "config.json").write_text((teacher / "unet" / "config.json").read_text())
    (folder / WEIGHTS).write_bytes((teacher / "unet" / WEIGHTS).read_bytes()[:100_000])
    return folder


def _drop(key):
    return lambda s: {k: v for k, v in s.items() if k != key}


ERROR_CASES = {
    "wrong path": (lambda t, j, p: ["to-jax", "--src", p / "nope", "--out", p / "o"], "no such file or folder"),
    "non-SDXL config": (
        lambda t, j, p: ["to-jax", "--src", _sd15_folder(p), "--out", p / "o"],
        "not an SDXL-family U-Net",
    ),
    "other model class": (lambda t, j, p: ["to-jax", "--src", t / "vae", "--out", p / "o"], "_class_name"),
    "missing key": (
        lambda t, j, p: ["to-jax", "--src", _edited_copy(t, p, _drop("conv_in.bias")), "--out", p / "o"],
        "missing key 'conv_in.bias' (model expects shape (32,))",
    ),
    "mis-shaped key": (
        lambda t, j, p: [
            "to-jax",
            "--src",
            _edited_copy(t, p, lambda s: {**s, "conv_out.bias": np.zeros(3, np.float32)}),
            "--out",
            p / "o",
        ],
        "shape mismatch for 'conv_out.bias': checkpoint (3,) vs model (4,)",
    ),
    "truncated file": (lambda t, j, p: ["to-jax", "--src", _truncated(t, p), "--out", p / "o"], "truncated"),
    "pickle refused": (lambda t, j, p: ["to-jax", "--src", _pickle(p), "--out", p / "o"], "--allow-pickle"),
    "output exists": (lambda t, j, p: ["to-jax", "--src", t, "--out", j], "already exists"),
    "--ema without a run": (
        lambda t, j, p: ["to-diffusers", "--checkpoint", j, "--ema", "--out", p / "o"],
        "--ema and --step need a train.py working directory",
    ),
    "pipeline mismatch": (
        lambda t, j, p: ["to-diffusers", "--checkpoint", _micro_jax(p), "--pipeline", t, "--out", p / "o"],
        "text encoders give 64-d token embeddings",
    ),
    "unknown preset": (lambda t, j, p: ["info", "koala-2b"], "not a preset"),
    "single file not .safetensors": (
        lambda t, j, p: ["to-single-file", "--checkpoint", j, "--out", p / "o"],
        "a single file is written as .safetensors",
    ),
    "push a JAX student": (
        lambda t, j, p: ["student", "--teacher", j, "--variant", "koala-1b", "--push-to-hub", "a/b", "--out", p / "o"],
        "--push-to-hub uploads a diffusers export",
    ),
    "unknown student": (
        lambda t, j, p: ["student", "--teacher", j, "--spec", "koala-2b", "--out", p / "o"],
        "unknown student 'koala-2b': give a variant",
    ),
    "pipeline as JAX": (
        lambda t, j, p: ["student", "--teacher", t, "--variant", "koala-1b", "--pipeline", t, "--out", p / "o"],
        "use it with --format diffusers or both",
    ),
}


def _pickle(tmp_path: Path) -> Path:
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}}, path)
    return path


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_bad_inputs_give_one_clear_error(case, teacher, teacher_jax, tmp_path, capsys):
    argv, message = ERROR_CASES[case]
    assert run(*argv(teacher[0], teacher_jax, tmp_path)) == 1
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and message in captured.err
    assert "Traceback" not in captured.err + captured.out
    assert not (tmp_path / "o").exists()


def test_failed_write_leaves_previous_output_intact(teacher, tmp_path, monkeypatch, capsys):
    out = tmp_path / "export"
    assert run("to-diffusers", "--checkpoint", teacher[0], "--out", out) == 0
    before = (out / WEIGHTS).read_bytes()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("koala_jax.weights.export.save_file", disk_full)
    assert run("to-diffusers", "--checkpoint", teacher[0], "--out", out, "--overwrite", "--dtype", "fp16") == 1
    assert capsys.readouterr().err.startswith(f"error: {out}: no space left on the device (needs ")
    assert (out / WEIGHTS).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # No temporary folder left behind.


def test_hub_id_offline_is_a_clear_error(tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    assert run("to-jax", "--src", "koala-test/not-a-repo", "--out", tmp_path / "o") == 1
    assert "downloading it as a Hugging Face hub id failed" in capsys.readouterr().err
