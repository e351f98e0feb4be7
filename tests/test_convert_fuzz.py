"""Fuzz: 50 random SDXL-family configs that diffusers accepts (per-pair and nested depths, mid blocks of
every kind, options we do not implement) each either convert through the CLI (diffusers folder -> JAX
layout -> diffusers folder, bit-identical, with a config diffusers builds the same model from; forward
parity for a sample) or are refused by the CLI with one line naming the config field, never a traceback."""

from __future__ import annotations

import inspect
import json
import re

import jax
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel as TorchUNet

from koala_jax import UNet2DConditionModel, UNetConfig
from koala_jax.weights.safetensors import load_file
from koala_jax.weights.state_dict import torch_to_flax

from tests.conftest import make_inputs, numpy_state, randomize_, rel_err, run, torch_forward

CONFIGS = 50
PARITY_SAMPLES = 4
TOL = 1e-5
FIELDS = set(inspect.signature(TorchUNet.__init__).parameters) - {"self"}
UNSUPPORTED_EXTRAS = [
    {"upcast_attention": True},
    {"time_cond_proj_dim": 8},
    {"conv_in_kernel": 5},
    {"resnet_time_scale_shift": "scale_shift"},
    {"cross_attention_norm": "group_norm"},
    {"mid_block_type": "UNetMidBlock2DSimpleCrossAttn"},
    {"attention_head_dim": 3},  # heads that do not divide the channels
]


def _depth(rng: np.random.Generator, pairs: int):
    """One block's depth entry: an int, one per pair, or (sometimes) a list of the wrong length."""
    r = rng.random()
    if r < 0.35:
        return int(rng.integers(0, 3))
    length = pairs if r < 0.85 else int(rng.integers(0, 4))
    return [int(d) for d in rng.integers(0, 3, size=length)]


def random_config(rng: np.random.Generator) -> dict:
    n = int(rng.integers(2, 4))
    uniform = rng.random() < 0.5
    layers = [int(rng.integers(1, 3))] * n if uniform else [int(k) for k in rng.integers(1, 3, size=n)]
    cfg = {
        "block_out_channels": [int(c) for c in rng.choice([8, 16, 24], size=n)],
        "down_block_types": [str(t) for t in rng.choice(["DownBlock2D", "CrossAttnDownBlock2D"], size=n)],
        "up_block_types": [str(t) for t in rng.choice(["UpBlock2D", "CrossAttnUpBlock2D"], size=n)],
        "mid_block_type": [None, "UNetMidBlock2D", "UNetMidBlock2DCrossAttn"][int(rng.integers(0, 3))],
        "layers_per_block": layers[0] if uniform else layers,
        "transformer_layers_per_block": [_depth(rng, k) for k in layers],
        "attention_head_dim": [int(h) for h in rng.choice([1, 2, 4], size=n)],
        "cross_attention_dim": 8,
        "use_linear_projection": bool(rng.random() < 0.5),
        "norm_num_groups": 4,
        "flip_sin_to_cos": bool(rng.random() < 0.5),
        "freq_shift": int(rng.integers(0, 2)),
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 4,
        "projection_class_embeddings_input_dim": 8 + 6 * 4,
    }
    if rng.random() < 0.6:
        cfg["reverse_transformer_layers_per_block"] = [_depth(rng, k + 1) for k in layers[::-1]]
    if rng.random() < 0.15:
        cfg.update(UNSUPPORTED_EXTRAS[int(rng.integers(0, len(UNSUPPORTED_EXTRAS)))])
    return cfg


def accepted_configs(count: int, seed: int = 0) -> list[dict]:
    """The first `count` random configs that diffusers builds (on the meta device: no memory)."""
    rng, found = np.random.default_rng(seed), []
    while len(found) < count:
        cfg = random_config(rng)
        try:
            with torch.device("meta"):
                TorchUNet(**cfg)
        except (ValueError, IndexError, TypeError):  # diffusers refuses it: not a config this test is about.
            continue
        found.append(cfg)
    return found


@pytest.mark.slow
def test_random_configs_convert_with_parity_or_are_refused_by_field(tmp_path, capsys):
    converted, refused, parity = 0, [], []
    for i, cfg in enumerate(accepted_configs(CONFIGS)):
        model = randomize_(TorchUNet(**cfg), seed=i)
        src, out = tmp_path / f"c{i}", tmp_path / f"c{i}-back"
        model.save_pretrained(src)
        status = run("to-diffusers", "--checkpoint", src, "--out", out)
        captured = capsys.readouterr()
        assert "Traceback" not in captured.err + captured.out, cfg
        if status == 1:
            assert captured.err.startswith("error: ") and len(captured.err.strip().splitlines()) == 1, captured.err
            named = {f for f in FIELDS if f"'{f}'" in captured.err}
            assert named, f"the error names no config field: {captured.err}"
            refused.append(sorted(named)[0])
            continue
        assert status == 0, captured.err
        converted += 1
        want, got = (
            load_file(src / "diffusion_pytorch_model.safetensors"),
            load_file(out / "diffusion_pytorch_model.safetensors"),
        )
        assert sorted(got) == sorted(want) and all(got[k].tobytes() == want[k].tobytes() for k in want), cfg
        written = json.loads((out / "config.json").read_text())
        config = UNetConfig.from_diffusers(cfg)
        assert UNetConfig.from_diffusers(written) == config
        with torch.device("meta"):
            rebuilt = TorchUNet(**{k: v for k, v in written.items() if not k.startswith("_")})
        assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
            k: v.shape for k, v in model.state_dict().items()
        }
        if len(parity) < PARITY_SAMPLES and converted % 5 == 1:
            x = make_inputs(cfg, 1, 8, 8, per_sample_t=False, seed=i)
            reference, _ = torch_forward(model, x, capture=False)
            params = torch_to_flax(numpy_state(model))
            parity.append(rel_err(jax.jit(UNet2DConditionModel(config).apply)({"params": params}, **x), reference))
    print(f"{converted} converted, {len(refused)} refused ({', '.join(refused)}); parity max rel err {parity}")
    assert converted >= 25 and len(refused) >= 5 and len(parity) == PARITY_SAMPLES
    assert max(parity) <= TOL
    assert any(re.search("transformer_layers_per_block", r) for r in refused)
