"""Single-file checkpoints (original Stability/LDM keys, U-Net-only or whole, safetensors or an allowed pickle)
load to the same params as the diffusers model they were made from.

diffusers' package has no diffusers -> original converter for U-Nets (only its repository scripts do), so
the original-format files are written by inverting diffusers' own `convert_ldm_unet_checkpoint`: each
diffusers key gets its original key by the block arithmetic below, and `to_original` first proves the
inversion exact by running diffusers' converter on the result and getting every key back.
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
from koala_jax.weights.state_dict import torch_to_flax

from tests.conftest import NO_MID_CONV_PROJ, TINY_TEACHER, assert_trees_equal, numpy_state, randomize_, run

LDM = "model.diffusion_model."
TOP = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
MID = {("resnets", 0): 0, ("attentions", 0): 1, ("resnets", 1): 2}
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
# Keys of the other models in a whole SDXL checkpoint, which the U-Net reader must ignore.
OTHER_MODELS = {
    "first_stage_model.decoder.conv_in.weight": np.ones((4, 4, 3, 3), np.float32),
    "conditioner.embedders.1.model.positional_embedding": np.ones((77, 8), np.float32),
}


def original_key(key: str, layers: int, up_with_attention: set[int]) -> str:
    """The original key of a diffusers U-Net key (uniform `layers_per_block`)."""
    module, leaf = key.rsplit(".", 1)
    if module in TOP:
        return f"{TOP[module]}.{leaf}"
    parts = module.split(".")
    if parts[0] == "mid_block":
        kind, rest = parts[1], parts[3:]
        block = f"middle_block.{MID[kind, int(parts[2])]}"
    else:
        stage, kind, rest = int(parts[1]), parts[2], parts[4:]
        j = layers if kind in ("downsamplers", "upsamplers") else int(parts[3])
        if parts[0] == "down_blocks":
            block = f"input_blocks.{1 + stage * (layers + 1) + j}.{'1' if kind == 'attentions' else '0'}"
            rest = ["op"] if kind == "downsamplers" else rest
        else:
            slot = {"resnets": "0", "attentions": "1", "upsamplers": "2" if stage in up_with_attention else "1"}[kind]
            block = f"output_blocks.{stage * (layers + 1) + j}.{slot}"
    if kind == "resnets":
        rest = [RESNET.get(rest[0], rest[0]), *rest[1:]]
    return ".".join([block, *rest, leaf])


def to_original(state: dict[str, np.ndarray], layers: int) -> dict[str, np.ndarray]:
    """`state` under original whole-checkpoint keys, checked against diffusers' own converter."""
    up_with_attention = {int(k.split(".")[1]) for k in state if k.startswith("up_blocks.") and ".attentions." in k}
    keys = {k: original_key(k, layers, up_with_attention) for k in state}
    back = convert_ldm_unet_checkpoint(
        {LDM + o: o for o in keys.values()}, {"layers_per_block": layers, "addition_embed_type": "text_time"}
    )
    assert back == keys  # diffusers maps every original key back to the diffusers key it came from.
    return {LDM + keys[k]: v for k, v in state.items()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    """A TINY_TEACHER U-Net folder (for --config) and its diffusers state dict."""
    unet = randomize_(TorchUNet(**TINY_TEACHER), seed=4)
    folder = tmp_path_factory.mktemp("tiny")
    unet.save_pretrained(folder)
    return folder, numpy_state(unet)


def test_whole_original_checkpoint_with_config(tiny, tmp_path):
    folder, state = tiny
    save_file({**to_original(state, layers=2), **OTHER_MODELS}, tmp_path / "sd_xl_tiny.safetensors")
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


@pytest.mark.parametrize("keys", ["original U-Net only", "diffusers"])
def test_config_inferred_from_a_single_file(keys, tmp_path):
    """(The CLI path from a source to a JAX dir is the same for every source: tested above.)"""
    state = numpy_state(randomize_(TorchUNet(**INFERABLE), seed=5))
    tensors = {k[len(LDM) :]: v for k, v in to_original(state, 2).items()} if keys.startswith("original") else state
    save_file(tensors, tmp_path / "unet.safetensors")
    config, params = read_source(tmp_path / "unet.safetensors")
    assert config == UNetConfig.from_diffusers(INFERABLE)
    assert_trees_equal(materialize(params, np.float32), torch_to_flax(state))


def test_pickle_only_when_allowed(tiny, tmp_path, capsys):
    folder, state = tiny
    bf16 = {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in to_original(state, 2).items()}
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
