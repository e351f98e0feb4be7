"""The Flax U-Net computes what diffusers' UNet2DConditionModel computes (float32, CPU), features included."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from diffusers import UNet2DConditionModel as TorchUNet

from koala_jax import ForwardOptions, UNet2DConditionModel, UNetConfig
from koala_jax.models import abstract_params
from koala_jax.models.common import CAPTURE_KINDS
from koala_jax.weights.state_dict import torch_to_flax

from tests.conftest import (
    MICRO,
    NO_MID_CONV_PROJ,
    PER_PAIR,
    PER_PAIR_MID,
    SDXL_LIKE,
    make_inputs,
    randomize_,
    rel_err,
    torch_forward,
)

TOL = 1e-5


@pytest.fixture(scope="module", params=["sdxl_like", "no_mid_conv_proj"])
def pair(request):
    cfg = {"sdxl_like": SDXL_LIKE, "no_mid_conv_proj": NO_MID_CONV_PROJ}[request.param]
    torch_model = randomize_(TorchUNet(**cfg), seed=1)
    config = UNetConfig.from_diffusers(dict(torch_model.config))
    params = torch_to_flax({k: v.numpy() for k, v in torch_model.state_dict().items()})
    return cfg, torch_model, config, params


# 16x24: per-sample timesteps; 12x20: one scalar timestep and sizes that are not a multiple of the
# U-Net's total stride (diffusers then forwards explicit upsample sizes).
@pytest.mark.parametrize("batch,h,w,per_sample_t", [(2, 16, 24, True), (2, 12, 20, False)])
def test_output_matches_diffusers(pair, batch, h, w, per_sample_t):
    cfg, torch_model, config, params = pair
    x = make_inputs(cfg, batch, h, w, per_sample_t)
    want, _ = torch_forward(torch_model, x, capture=False)
    got = jax.jit(UNet2DConditionModel(config).apply)({"params": params}, **x)
    err = rel_err(got, want)
    print(f"{cfg['block_out_channels']} batch={batch} {h}x{w} per-sample-t={per_sample_t}: max rel err {err:.2e}")
    assert got.shape == want.shape
    assert err <= TOL


def test_features_match_diffusers(pair):
    cfg, torch_model, config, params = pair
    x = make_inputs(cfg, 2, 16, 24, True, seed=3)
    want_out, want = torch_forward(torch_model, x, capture=True)
    unet = UNet2DConditionModel(config, ForwardOptions(capture=CAPTURE_KINDS))
    out, got = jax.jit(unet.apply_with_features)({"params": params}, **x)
    assert sorted(got) == sorted(want)
    assert any(k.endswith("attn1") for k in got) and any(k.startswith("up_blocks") for k in got)
    worst = max(rel_err(got[k], want[k]) for k in want)
    print(f"{len(want)} features, worst max rel err {worst:.2e}")
    assert worst <= TOL
    assert rel_err(out, want_out) <= TOL


# Per-pair depths without a mid block, over 4 stages with conv projections.
PER_PAIR_NO_MID = {
    **NO_MID_CONV_PROJ,
    "transformer_layers_per_block": [[1], [2, 1], 0, 1],
    "reverse_transformer_layers_per_block": [1, [1, 2], [2, 0, 1], 1],
}


@pytest.mark.parametrize(
    "name",
    [
        "single-resnet mid",
        pytest.param("attention mid", marks=pytest.mark.slow),
        pytest.param("no mid", marks=pytest.mark.slow),
    ],
)
def test_per_pair_depths_match_diffusers(name):
    """Per-pair (nested) transformer depths, depth-0 attentions and each kind of mid block: the output and
    every feature equal diffusers' (the model is built from diffusers' own full config.json)."""
    cfg = {"single-resnet mid": PER_PAIR, "attention mid": PER_PAIR_MID, "no mid": PER_PAIR_NO_MID}[name]
    torch_model = randomize_(TorchUNet(**cfg), seed=5)
    config = UNetConfig.from_diffusers(dict(torch_model.config))
    params = torch_to_flax({k: v.numpy() for k, v in torch_model.state_dict().items()}, abstract_params(config))
    x = make_inputs(cfg, 1, 8, 8, per_sample_t=False, seed=2)
    want_out, want = torch_forward(torch_model, x, capture=True)
    unet = UNet2DConditionModel(config, ForwardOptions(capture=CAPTURE_KINDS))
    out, got = jax.jit(unet.apply_with_features)({"params": params}, **x)
    assert sorted(got) == sorted(want)
    worst = max(rel_err(got[k], want[k]) for k in want)
    print(f"{name}: {len(want)} features, worst max rel err {worst:.2e}, output {rel_err(out, want_out):.2e}")
    assert worst <= TOL and rel_err(out, want_out) <= TOL


@pytest.mark.slow
def test_capture_does_not_change_default_outputs(pair):
    cfg, _, config, params = pair
    x = make_inputs(cfg, 1, 8, 8, False)
    plain = jax.jit(UNet2DConditionModel(config).apply)({"params": params}, **x)
    capturing = UNet2DConditionModel(config, ForwardOptions(capture=("attn1",)))
    captured, feats = jax.jit(capturing.apply_with_features)({"params": params}, **x)
    assert feats and all(k.endswith("attn1") for k in feats)
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(captured))
    # Without mutable features, a capturing module still returns just the output.
    again = jax.jit(capturing.apply)({"params": params}, **x)
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(again))


@pytest.mark.slow
def test_remat_and_bf16_compute():
    """Rematerialisation changes no value or gradient; bf16 compute with fp32 params stays close."""
    config = UNetConfig.from_diffusers(MICRO)
    params = torch_to_flax({k: v.numpy() for k, v in randomize_(TorchUNet(**MICRO), seed=2).state_dict().items()})
    x = make_inputs(MICRO, 1, 8, 8, False)
    remat = ForwardOptions(remat=("resnet", "transformer_block", "attention_block"))

    def loss(p, opts):
        return jnp.mean(UNet2DConditionModel(config, opts).apply({"params": p}, **x) ** 2)

    grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    l0, g0 = grad(params, ForwardOptions())
    l1, g1 = grad(params, remat)
    assert abs(float(l0) - float(l1)) <= 1e-6 * abs(float(l0))
    assert max(rel_err(a, b) for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0))) <= 1e-4
    out32 = jax.jit(UNet2DConditionModel(config).apply)({"params": params}, **x)
    out16 = jax.jit(UNet2DConditionModel(config, ForwardOptions(dtype=jnp.bfloat16)).apply)({"params": params}, **x)
    assert out16.dtype == jnp.bfloat16
    err = rel_err(out16.astype(jnp.float32), out32)
    print(f"bf16 compute vs fp32: max rel err {err:.2e}")
    assert err < 0.1
