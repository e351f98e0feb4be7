"""Single-file checkpoints (original Stability/LDM keys, U-Net-only or whole, safetensors or an allowed pickle)
load to the same params as the diffusers model they were made from.

The original-format files are written with our own diffusers -> original mapping
(`koala_jax.weights.single_file.unet_to_original`), which is first proven against diffusers' own reader:
`convert_ldm_unet_checkpoint` maps every original key we write back to the diffusers key it came from
(for one `layers_per_block`, all diffusers' converter can number; per-stage counts are read by ours).
"""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel as TorchUNet
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

from koala_jax import UNetConfig
from koala_jax.weights import read_source
from koala_jax.weights.export import materialize
from koala_jax.weights.params_dir import load_params
from koala_jax.weights.safetensors import save_file
from koala_jax.weights.single_file import LDM_PREFIX, unet_to_original
from koala_jax.weights.state_dict import torch_to_flax

from tests.conftest import (
    NO_MID_CONV_PROJ,
    PER_PAIR,
    TINY_TEACHER,
    assert_trees_equal,
    numpy_state,
    randomize_,
    run,
)

# Everything the weights do not determine is SDXL-Base's here (32 norm groups, 64 channels per head, 256-d
# time ids), so the architecture can be inferred from the file alone.
INFERABLE = {
    "block_out_channels": [64, 128],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "layers_per_block": 2,
    "transformer_layers_per_block": [1, 2],
    "attention_head_dim": [1, 2],
    "cross_attention_dim": 32,
    "use_linear_projection": True,
    "norm_num_groups": 32,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 16 + 6 * 256,
}
# The same with a different number of pairs per stage, per-pair depths (a depth-0 attention) and an
# attention mid block whose depth is the deepest down block's first (2).
INFERABLE_PER_PAIR = {
    **INFERABLE,
    "layers_per_block": [1, 2],
    "transformer_layers_per_block": [1, [2, 1]],
    "reverse_transformer_layers_per_block": [[2, 0, 1], 1],
}
# Keys of the other models in a whole SDXL checkpoint, which the U-Net reader must ignore.
OTHER_MODELS = {
    "first_stage_model.decoder.conv_in.weight": np.ones((4, 4, 3, 3), np.float32),
    "conditioner.embedders.1.model.positional_embedding": np.ones((77, 8), np.float32),
}


def to_original(state: dict[str, np.ndarray], config: dict) -> dict[str, np.ndarray]:
    """`state` under original whole-checkpoint keys, by our mapping."""
    return unet_to_original(state, UNetConfig.from_diffusers(config))


@pytest.mark.parametrize("cfg", [TINY_TEACHER, PER_PAIR], ids=["tiny teacher", "per-pair depths"])
def test_our_original_names_are_the_ones_diffusers_reads(cfg):
    with torch.device("meta"):
        keys = list(TorchUNet(**cfg).state_dict())
    original = to_original({k: k for k in keys}, cfg)  # original key -> the diffusers key it came from
    assert len(original) == len(keys)
    back = convert_ldm_unet_checkpoint(
        {o: o for o in original}, {"layers_per_block": cfg["layers_per_block"], "addition_embed_type": "text_time"}
    )
    assert back == {d: o for o, d in original.items()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    """A TINY_TEACHER U-Net folder (for --config) and its diffusers state dict."""
    unet = randomize_(TorchUNet(**TINY_TEACHER), seed=4)
    folder = tmp_path_factory.mktemp("tiny")
    unet.save_pretrained(folder)
    return folder, numpy_state(unet)


def test_whole_original_checkpoint_with_config(tiny, tmp_path):
    folder, state = tiny
    save_file({**to_original(state, TINY_TEACHER), **OTHER_MODELS}, tmp_path / "sd_xl_tiny.safetensors")
    assert (
        run(
            "to-jax",
            "--src",
            tmp_path / "sd_xl_tiny.safetensors",
            "--config",
            folder / "config.json",
            "--out",
            tmp_path / "jax",
        )
        == 0
    )
    config, params = load_params(tmp_path / "jax")
    assert config == UNetConfig.from_diffusers(TINY_TEACHER)
    assert_trees_equal(params, torch_to_flax(state))


@pytest.mark.parametrize(
    "keys,cfg",
    [("original U-Net only", INFERABLE), ("diffusers", INFERABLE), ("original U-Net only", INFERABLE_PER_PAIR)],
    ids=["original", "diffusers", "original per-pair"],
)
def test_config_inferred_from_a_single_file(keys, cfg, tmp_path):
    """(The CLI path from a source to a JAX dir is the same for every source: tested above.)"""
    state = numpy_state(randomize_(TorchUNet(**cfg), seed=5))
    original = {k[len(LDM_PREFIX) :]: v for k, v in to_original(state, cfg).items()}
    save_file(original if keys.startswith("original") else state, tmp_path / "unet.safetensors")
    config, params = read_source(tmp_path / "unet.safetensors")
    assert config == UNetConfig.from_diffusers(cfg)
    assert_trees_equal(materialize(params, np.float32), torch_to_flax(state))


def test_pickle_only_when_allowed(tiny, tmp_path, capsys):
    folder, state = tiny
    bf16 = {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in to_original(state, TINY_TEACHER).items()}
    torch.save({"state_dict": {**bf16, "global_step": 7}}, tmp_path / "model.ckpt")
    assert run("to-jax", "--src", tmp_path / "model.ckpt", "--config", folder, "--out", tmp_path / "refused") == 1
    assert "--allow-pickle" in capsys.readouterr().err and not (tmp_path / "refused").exists()

    _, params = read_source(tmp_path / "model.ckpt", folder, allow_pickle=True)
    want = {k: v.astype(ml_dtypes.bfloat16) for k, v in state.items()}
    assert_trees_equal(params, torch_to_flax(want))


def test_single_file_errors(tmp_path, capsys):
    state = numpy_state(TorchUNet(**NO_MID_CONV_PROJ))
    save_file(state, tmp_path / "conv_proj.safetensors")  # 16-channel attention stage: not SDXL's head size.
    save_file(OTHER_MODELS, tmp_path / "vae_only.safetensors")
    (tmp_path / "weights.npz").write_bytes(b"")
    cases = {
        "conv_proj.safetensors": "not a multiple of SDXL's 64 channels per head; pass --config",
        "vae_only.safetensors": "no U-Net weights found",
        "weights.npz": "unknown weights format '.npz'",
    }
    for name, message in cases.items():
        assert run("to-jax", "--src", tmp_path / name, "--out", tmp_path / "o") == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and "Traceback" not in err
