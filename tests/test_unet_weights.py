"""Presets, config validation and the state-dict mapping (no forward passes: fast)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel as TorchUNet
from flax.traverse_util import flatten_dict

import koala_jax
from koala_jax.models import abstract_params
from koala_jax.models.config import UnsupportedConfigError
from koala_jax.students.presets import PARAM_COUNTS
from koala_jax.weights.state_dict import StateDictError, flax_to_torch, torch_shapes, torch_to_flax

from tests.conftest import NO_MID_CONV_PROJ, PER_PAIR, SDXL_LIKE, TINY_TEACHER, randomize_

# SSD-1B's U-Net as a diffusers config: SDXL's fields with per-pair depths and a single-resnet mid block
# (from a public reconstruction of segmind/SSD-1B's config; its count, 1,331,334,404, is the published
# "1.3B"). Segmind-Vega's is constructed the same way from ComfyUI's depths for it (encoder 0,0 / 1,1 / 2,2)
# and SSD-1B's kind of decoder; its count, 745,225,604, is the published 745M.
SDXL_CONFIG = koala_jax.preset("sdxl-base").to_diffusers()
SSD_1B = {
    **SDXL_CONFIG,
    "mid_block_type": "UNetMidBlock2D",
    "transformer_layers_per_block": [[1], [2, 2], [4, 4]],
    "reverse_transformer_layers_per_block": [[4, 4, 10], [2, 1, 1], 1],
}
VEGA = {
    **SDXL_CONFIG,
    "mid_block_type": "UNetMidBlock2D",
    "transformer_layers_per_block": [[1], [1, 1], [2, 2]],
    "reverse_transformer_layers_per_block": [[2, 2, 2], [1, 1, 1], 1],
}


@pytest.mark.parametrize("name", ["sdxl-base", "koala-1b", "koala-700m"])
def test_full_size_param_counts(name):
    count = koala_jax.param_count(koala_jax.preset(name))
    print(f"{name}: {count:,}")
    assert count == PARAM_COUNTS[name]


@pytest.mark.parametrize("name", ["sdxl-base", "koala-1b", "koala-700m"])
def test_full_size_shapes_match_diffusers(name):
    """Every full-size tensor shape equals diffusers' (built on the meta device: no memory)."""
    with torch.device("meta"):
        ref = TorchUNet(**koala_jax.preset(name).to_diffusers())
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert torch_shapes(abstract_params(koala_jax.preset(name))) == want


@pytest.mark.parametrize("name,cfg,count", [("ssd-1b", SSD_1B, 1_331_334_404), ("vega", VEGA, 745_225_604)])
def test_full_size_per_pair_models_match_diffusers(name, cfg, count):
    """SSD-1B- and Vega-shaped U-Nets: every tensor shape and the parameter count equal diffusers' (meta
    device), and the parsed config writes back a config diffusers builds the same model from."""
    config = koala_jax.UNetConfig.from_diffusers(cfg)
    with torch.device("meta"):
        ref = TorchUNet(**cfg)
        again = TorchUNet(**config.to_diffusers())
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    print(f"{name}: {koala_jax.param_count(config):,} parameters")
    assert torch_shapes(abstract_params(config)) == want
    assert koala_jax.param_count(config) == sum(p.numel() for p in ref.parameters()) == count
    assert {k: tuple(v.shape) for k, v in again.state_dict().items()} == want
    assert koala_jax.UNetConfig.from_diffusers(config.to_diffusers()) == config and hash(config)


def test_per_pair_depths_are_read_as_diffusers_reads_them():
    """Nested depth lists no longer end in `unhashable type: 'list'`; equal architectures compare equal."""
    config = koala_jax.UNetConfig.from_diffusers(PER_PAIR)
    assert config.transformer_layers_per_block == (1, (2, 1), (2, 0))  # [1]: one depth for every pair
    assert config.down_depths(0) == () and config.down_depths(1) == (2, 1) and config.up_depths(0) == (2, 1, 3)
    assert config.up_depths(2) == () and config.mid_depths() == () and config.mid_block_type == "UNetMidBlock2D"
    uniform = koala_jax.UNetConfig.from_diffusers(
        {**SDXL_LIKE, "transformer_layers_per_block": [1, [2, 2], 3], "reverse_transformer_layers_per_block": [3, 2, 1]}
    )
    assert uniform == koala_jax.UNetConfig.from_diffusers(SDXL_LIKE)
    # The mid block's depth: the deepest down block's first (diffusers' transformer_layers_per_block[-1]).
    mid = koala_jax.UNetConfig.from_diffusers(
        {**SDXL_LIKE, "transformer_layers_per_block": [1, 2, [3, 1]], "reverse_transformer_layers_per_block": [1, 2, 1]}
    )
    assert mid.mid_depths() == (3,)
    with torch.device("meta"):
        ref = TorchUNet(**mid.to_diffusers())
    assert len(ref.mid_block.attentions[0].transformer_blocks) == 3


UNSUPPORTED = {
    "lists without decoder depths": (
        {"transformer_layers_per_block": [1, [2, 1], 3]},
        "'reverse_transformer_layers_per_block' is required",
    ),
    "one depth too many": (
        {"transformer_layers_per_block": [1, [2, 1, 1], 3], "reverse_transformer_layers_per_block": [3, 2, 1]},
        "down_blocks.1 (CrossAttnDownBlock2D) has 2 resnet/attention pairs",
    ),
    "decoder list too short": (
        {"reverse_transformer_layers_per_block": [[3, 3], 2, 1]},
        "up_blocks.0 (CrossAttnUpBlock2D) has 3 resnet/attention pairs",
    ),
    "negative depth": ({"transformer_layers_per_block": [1, -1, 3]}, "entry 1 = -1 is not an int >= 0"),
    "too many entries": ({"transformer_layers_per_block": [1, 2, 3, 4]}, "'transformer_layers_per_block'"),
    "decoder depths not a list": (
        {"reverse_transformer_layers_per_block": 2},
        "'reverse_transformer_layers_per_block'",
    ),
    "empty mid depth": (
        {
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            "transformer_layers_per_block": [1, 2, []],
            "reverse_transformer_layers_per_block": [1, 2, 1],
        },
        "the mid block takes its depth from it",
    ),
    "mid with attention variant": ({"mid_block_type": "UNetMidBlock2DSimpleCrossAttn"}, "'mid_block_type'"),
    "groups": ({"norm_num_groups": 5}, "'norm_num_groups'"),
    "cross widths": ({"cross_attention_dim": [48, 48, 32]}, "'cross_attention_dim'"),
    "layers as text": ({"layers_per_block": "2"}, "'layers_per_block'"),
    "no pooled width": ({"projection_class_embeddings_input_dim": 48}, "projection_class_embeddings_input_dim"),
}


@pytest.mark.parametrize("case", sorted(UNSUPPORTED))
def test_configs_we_cannot_build_are_refused_by_field(case):
    change, message = UNSUPPORTED[case]
    with pytest.raises(UnsupportedConfigError, match=re.escape(message)):
        koala_jax.UNetConfig.from_diffusers({**SDXL_LIKE, **change})


def test_student_derivation_from_tiny_teacher():
    teacher = koala_jax.UNetConfig.from_diffusers(TINY_TEACHER)
    s1b, s700 = (koala_jax.derive_student_config(teacher, v) for v in ("koala-1b", "koala-700m"))
    assert s1b.layers_per_block == (1, 1, 1) and s1b.mid_block_type == "UNetMidBlock2DCrossAttn"
    assert s1b.transformer_layers_per_block == (1, 2, 2) and s1b.reverse_transformer_layers_per_block == (2, 2, 1)
    assert s700.mid_block_type is None and s700.transformer_layers_per_block == (1, 2, 2)
    assert koala_jax.param_count(s700) < koala_jax.param_count(s1b) < koala_jax.param_count(teacher)
    # The tiny students are valid diffusers models too.
    for s in (s1b, s700):
        n_torch = sum(p.numel() for p in TorchUNet(**s.to_diffusers()).parameters())
        assert n_torch == koala_jax.param_count(s)


@pytest.mark.parametrize("cfg", [SDXL_LIKE, NO_MID_CONV_PROJ])
def test_state_dict_round_trip_is_bit_identical(cfg):
    model = randomize_(TorchUNet(**cfg))
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    config = koala_jax.UNetConfig.from_diffusers(dict(model.config))
    params = torch_to_flax(sd, expected=abstract_params(config))
    assert (
        flatten_dict(params)[("down_blocks_1", "attentions_0", "transformer_blocks_1", "attn1", "to_q", "kernel")].shape
        == sd["down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q.weight"].T.shape
    )
    back = flax_to_torch(params)
    assert back.keys() == sd.keys()
    for k in sd:
        assert back[k].dtype == sd[k].dtype and np.array_equal(back[k], sd[k]), k


def test_state_dict_errors_name_key_and_shapes():
    config = koala_jax.UNetConfig.from_diffusers(SDXL_LIKE)
    sd = {k: v.numpy() for k, v in TorchUNet(**SDXL_LIKE).state_dict().items()}
    expected = abstract_params(config)
    missing = dict(sd)
    del missing["conv_in.bias"]
    with pytest.raises(StateDictError, match=r"missing key 'conv_in.bias' \(model expects shape \(32,\)\)"):
        torch_to_flax(missing, expected)
    extra = {**sd, "mid_block.resnets.2.conv1.weight": np.zeros((1, 1, 3, 3), np.float32)}
    with pytest.raises(StateDictError, match=r"unexpected key 'mid_block.resnets.2.conv1.weight'"):
        torch_to_flax(extra, expected)
    bad = {**sd, "conv_out.weight": np.zeros((4, 32, 1, 1), np.float32)}
    with pytest.raises(
        StateDictError,
        match=r"shape mismatch for 'conv_out.weight': checkpoint \(4, 32, 1, 1\) "
        r"vs model \(4, 32, 3, 3\)",
    ):
        torch_to_flax(bad, expected)


def test_unsupported_config_fields_are_refused_by_name():
    with pytest.raises(UnsupportedConfigError, match="'upcast_attention'"):
        koala_jax.UNetConfig.from_diffusers({**SDXL_LIKE, "upcast_attention": True})
    with pytest.raises(UnsupportedConfigError, match="'some_new_option'"):
        koala_jax.UNetConfig.from_diffusers({**SDXL_LIKE, "some_new_option": 3})
    with pytest.raises(UnsupportedConfigError, match="'down_block_types'.*'SimpleCrossAttnDownBlock2D'"):
        koala_jax.UNetConfig.from_diffusers(
            {**SDXL_LIKE, "down_block_types": ["DownBlock2D", "SimpleCrossAttnDownBlock2D", "CrossAttnDownBlock2D"]}
        )
    with pytest.raises(UnsupportedConfigError, match="'layers_per_block' has 2 entries"):
        koala_jax.UNetConfig.from_diffusers({**SDXL_LIKE, "layers_per_block": [1, 2]})
    # A full diffusers config.json (every field written out at its default) is accepted.
    full = dict(TorchUNet(**SDXL_LIKE).config)
    assert koala_jax.UNetConfig.from_diffusers(full) == koala_jax.UNetConfig.from_diffusers(SDXL_LIKE)


@pytest.mark.parametrize("shard", [False, True])
def test_load_unet_from_diffusers_folder(tmp_path, shard):
    model = randomize_(TorchUNet(**SDXL_LIKE))
    model.save_pretrained(
        tmp_path / "pipe" / "unet", safe_serialization=True, **({"max_shard_size": "200KB"} if shard else {})
    )
    if shard:
        assert (tmp_path / "pipe" / "unet" / "diffusion_pytorch_model.safetensors.index.json").exists()
    unet, params = koala_jax.load_unet(tmp_path / "pipe")  # a pipeline folder: finds unet/
    assert unet.config == koala_jax.UNetConfig.from_diffusers(
        json.loads((tmp_path / "pipe/unet/config.json").read_text())
    )
    back = flax_to_torch(params)
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(back[k], v.numpy())


def test_load_unet_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        koala_jax.load_unet(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        koala_jax.load_unet(tmp_path / "empty")
    TorchUNet(**SDXL_LIKE).save_pretrained(tmp_path / "u", safe_serialization=True)
    weights = tmp_path / "u" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match="truncated"):
        koala_jax.load_unet(tmp_path / "u")
