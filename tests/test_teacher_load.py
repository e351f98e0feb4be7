"""Loading the teacher as train.py does, sliced: a host reads only the slices its devices hold (one read per
slice, in the layout that makes each slice one run of the file), casts them slice by slice, and refuses NaN/Inf
values in what it placed by tensor name. benchmarks/bench_teacher_load.py measures the host memory."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from jax.tree_util import DictKey

from koala_jax.models import UNetConfig, random_params
from koala_jax.train import sharding
from koala_jax.train.config import base_config
from koala_jax.train.setup import load_models, place
from koala_jax.weights.checks import BadValuesError
from koala_jax.weights.diffusers_dir import CONFIG_NAME, WEIGHTS_NAME
from koala_jax.weights.safetensors import load_file, read_slice, save_file
from koala_jax.weights.state_dict import flax_to_torch

from tests.conftest import MICRO_TEACHER


def read_bytes() -> int:
    return next(
        int(line.split()[1]) for line in Path("/proc/self/io").read_text().splitlines() if line.startswith("rchar")
    )


def test_a_slice_of_a_memory_mapped_tensor_is_one_read_of_its_bytes(tmp_path):
    weight = np.random.default_rng(0).standard_normal((512, 384), np.float32)  # PyTorch layout (out, in)
    save_file({"w": weight}, tmp_path / "w.safetensors")
    kernel = np.transpose(load_file(tmp_path / "w.safetensors")["w"])  # Flax layout (in, out): a view
    index = (slice(None), slice(128, 256))  # the checkpoint-major axis: rows 128..255 of the file's tensor
    before = read_bytes()
    part = read_slice(kernel, index)
    read = read_bytes() - before
    np.testing.assert_array_equal(part, weight.T[index])
    assert 128 * 384 * 4 <= read < 128 * 384 * 4 + 4096  # that slice's bytes, nothing around them


def test_checkpoints_are_read_along_their_outermost_axis():
    kernel, bias = (DictKey("proj"), DictKey("kernel")), (DictKey("proj"), DictKey("bias"))
    assert sharding.checkpoint_major_axis(kernel) == -1 and sharding.checkpoint_major_axis(bias) == 0
    assert sharding.fsdp_spec((1280, 640), 4) == P("fsdp", None)  # compute layout: the largest axis
    assert sharding.fsdp_spec((1280, 640), 4, prefer=-1) == P(None, "fsdp")  # reading: the file's outermost
    assert sharding.fsdp_spec((3, 3, 640, 4), 8, prefer=-1) == P(None, None, "fsdp", None)  # 4 outputs: fall back
    # A device's slice of the out axis of a transposed (out, in) tensor is contiguous rows of the file.
    flax_view = np.transpose(np.zeros((1280, 640), np.float32))
    assert flax_view[:, 320:640].T.flags.c_contiguous and not flax_view[160:320, :].T.flags.c_contiguous


@pytest.fixture(scope="module")
def nan_teacher(tmp_path_factory) -> Path:
    """A micro teacher as a diffusers folder, with one NaN in conv_in.weight and one huge value in conv_out.bias."""
    folder = tmp_path_factory.mktemp("teacher")
    config = UNetConfig.from_diffusers(MICRO_TEACHER)
    params = random_params(config, seed=0)
    params["conv_in"]["kernel"][0, 0, 0, 0] = np.nan
    params["conv_out"]["bias"][0] = 1e6  # finite in float32, Inf in float16
    save_file(flax_to_torch(params), folder / WEIGHTS_NAME)  # our exporter would refuse it
    (folder / CONFIG_NAME).write_text(json.dumps(config.to_diffusers()))
    return folder


def test_train_loading_refuses_nan_in_what_it_places(nan_teacher):
    cfg = base_config()
    cfg.teacher.source = str(nan_teacher)
    # memory maps and shapes only: no value is read yet
    _, teacher, built = load_models(cfg.teacher, cfg.student, cfg.seed)
    mesh = sharding.make_mesh(1, 1, jax.devices()[:1])
    with pytest.raises(BadValuesError, match=r"1 bad tensor\(s\): 'conv_in.weight' has 1 NaN and 0 Inf values"):
        place(teacher, sharding.tree_shardings(teacher, mesh), ml_dtypes.bfloat16, check=cfg.teacher.source)
    with pytest.raises(BadValuesError, match=r"2 bad tensor\(s\): .*'conv_out.bias' has 0 NaN and 1 Inf values"):
        place(teacher, sharding.tree_shardings(teacher, mesh), np.float16, check=cfg.teacher.source)


def test_place_casts_slices_to_the_same_values(nan_teacher):
    cfg = base_config()
    cfg.teacher.source = str(nan_teacher)
    _, teacher, _ = load_models(cfg.teacher, cfg.student, cfg.seed)
    mesh = sharding.make_mesh(1, 1, jax.devices()[:1])
    placed = place(teacher, sharding.tree_shardings(teacher, mesh), ml_dtypes.bfloat16)
    for got, want in zip(jax.tree.leaves(placed), jax.tree.leaves(teacher)):
        assert got.dtype == ml_dtypes.bfloat16
        want = np.asarray(want).astype(ml_dtypes.bfloat16).astype(np.float32)
        np.testing.assert_array_equal(np.asarray(got).astype(np.float32), want)  # the NaN included
