"""Every attention implementation computes what plain XLA attention computes, outputs and gradients, on
its own and inside the U-Net's modules (feature capture included); chunked attention's backward pass
holds no (q_tokens x k_tokens) buffer; `auto` picks per backend and says so once."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from koala_jax.errors import ConfigError
from koala_jax.models import ForwardOptions, UNet2DConditionModel, UNetConfig, random_params
from koala_jax.models import attention_kernels as kernels
from koala_jax.models.attention import Transformer2DModel
from koala_jax.models.attention_kernels import auto_choice, dot_product_attention, tpu_interpret_mode
from koala_jax.train.config import base_config
from koala_jax.train.step_builder import Models, make_models, step_settings

from tests.conftest import MICRO, ROOT, make_inputs, rel_err

FP32_TOL = 1e-5
BF16_TOL = 3e-2


def qkv_and_cotangent(tq: int, tk: int, heads: int, dim: int, dtype=jnp.float32, batch: int = 2):
    ks = jax.random.split(jax.random.key(tq * 1000 + tk), 4)
    q = jax.random.normal(ks[0], (batch, tq, heads, dim))
    k, v = (jax.random.normal(key, (batch, tk, heads, dim)) for key in ks[1:3])
    # Keys correlated with the queries, so some rows' softmax is peaked and others flat.
    k = k.at[:, : min(tq, tk)].add(2.0 * q[:, : min(tq, tk)])
    cotangent = jax.random.normal(ks[3], (batch, tq, heads, dim))
    return (*(x.astype(dtype) for x in (q, k, v)), cotangent)


def value_and_grads(impl: str, q, k, v, cotangent, block_q: int, block_kv: int):
    """Output and d<out, cotangent>/d(q, k, v), in float32 for comparison."""

    def f(q, k, v):
        out = dot_product_attention(q, k, v, impl, block_q, block_kv)
        return jnp.sum(out.astype(jnp.float32) * cotangent), out

    grads, out = jax.jit(jax.grad(f, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return [np.asarray(x, np.float32) for x in (out, *grads)]


def assert_matches_xla(impl, q, k, v, cotangent, block_q, block_kv, tol, label):
    want = value_and_grads("xla", q, k, v, cotangent, block_q, block_kv)
    got = value_and_grads(impl, q, k, v, cotangent, block_q, block_kv)
    errs = {name: rel_err(g, w) for name, g, w in zip(("out", "dq", "dk", "dv"), got, want)}
    print(f"{impl} {label}: " + " ".join(f"{n} {e:.1e}" for n, e in errs.items()))
    assert got[0].shape == want[0].shape
    assert max(errs.values()) <= tol, errs


# (q tokens, k tokens, block_q, block_kv): an odd token count in padded blocks, the 77 text tokens as
# padded blocks and as one block (blocks larger than the sequence), and blocks of a few tokens.
CHUNKED_CASES = [
    (63, 63, 16, 32),
    (70, 77, 16, 32),
    (96, 77, 512, 512),
    (37, 5, 8, 8),
]


@pytest.mark.parametrize("tq,tk,block_q,block_kv", CHUNKED_CASES)
def test_chunked_matches_xla_fp32(tq, tk, block_q, block_kv):
    q, k, v, ct = qkv_and_cotangent(tq, tk, heads=3, dim=8)
    assert_matches_xla(
        "chunked", q, k, v, ct, block_q, block_kv, FP32_TOL, f"fp32 {tq}x{tk} blocks {block_q}/{block_kv}"
    )


def test_chunked_matches_xla_bf16():
    q, k, v, ct = qkv_and_cotangent(70, 77, heads=2, dim=16, dtype=jnp.bfloat16)
    assert_matches_xla("chunked", q, k, v, ct, 16, 32, BF16_TOL, "bf16 70x77 blocks 16/32")


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["flash", "splash"])
def test_tpu_kernels_match_xla_in_interpret_mode(impl):
    """The Pallas TPU kernels, run by JAX's TPU interpreter on CPU: 200 tokens (padded to 256, two
    128-token query blocks) attending to themselves and to 77 text tokens (padded to 128, masked)."""
    with tpu_interpret_mode():
        for tk in (200, 77):
            q, k, v, ct = qkv_and_cotangent(200, tk, heads=2, dim=8, batch=1)
            assert_matches_xla(impl, q, k, v, ct, 128, 128, FP32_TOL, f"interpret 200x{tk}")


def test_chunked_backward_holds_no_score_matrix():
    """jax.grad of attention over 4,096 tokens (SDXL's 640-channel stage at 1024 px, one head): XLA's
    temporaries hold (4096 x 4096) score matrices, chunked's only 512 x 512 tiles and token-sized arrays."""
    tokens, heads = 4096, 1
    spec = jax.ShapeDtypeStruct((1, tokens, heads, 64), jnp.float32)

    def temp_bytes(impl: str) -> int:
        loss = lambda q, k, v: jnp.sum(dot_product_attention(q, k, v, impl) ** 2)
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(spec, spec, spec).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    scores = heads * tokens * tokens * 4
    xla, chunked = temp_bytes("xla"), temp_bytes("chunked")
    print(f"grad temporaries at {tokens} tokens: xla {xla / 2**20:.1f} MiB, chunked {chunked / 2**20:.1f} MiB")
    assert xla >= scores
    assert chunked < scores / 4


def transformer_inputs(dtype):
    """Non-square latents (7 x 9 = 63 tokens: padded blocks) and 77 text tokens (padded to 78)."""
    g = np.random.default_rng(0)
    x = jnp.asarray(g.standard_normal((2, 7, 9, 16)), dtype)
    context = jnp.asarray(g.standard_normal((2, 77, 24)), dtype)
    return x, context


@pytest.mark.parametrize(
    "dtype,tol", [(jnp.float32, FP32_TOL), pytest.param(jnp.bfloat16, BF16_TOL, marks=pytest.mark.slow)]
)
def test_transformer2d_chunked_matches_xla(dtype, tol):
    """Transformer2DModel (a rematerialised BasicTransformerBlock) with its self-attention captured:
    output, captured attn1 feature and gradients w.r.t. params, latents and text."""
    x, context = transformer_inputs(dtype)

    def model(impl: str) -> Transformer2DModel:
        opts = ForwardOptions(
            dtype=dtype,
            attention_impl=impl,
            attention_block_q=16,
            attention_block_kv=32,
            remat=("transformer_block",),
            capture=("attn1",),
        )
        return Transformer2DModel(heads=2, head_dim=8, depth=1, groups=8, use_linear_projection=True, opts=opts)

    params = jax.jit(model("xla").init)(jax.random.key(0), x, context)["params"]

    def run(impl: str):
        def loss(p, x, c):
            out, state = model(impl).apply({"params": p}, x, c, mutable=["features"])
            (feat,) = jax.tree.leaves(state["features"])
            return jnp.sum(out.astype(jnp.float32) ** 2) + jnp.sum(feat.astype(jnp.float32) ** 2), (out, feat)

        grad_fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
        (_, (out, feat)), grads = grad_fn(params, x, context)
        return out, feat, grads

    (want_out, want_feat, want_grads), (got_out, got_feat, got_grads) = run("xla"), run("chunked")
    errs = {
        "out": rel_err(got_out, want_out),
        "attn1": rel_err(got_feat, want_feat),
        "grads": max(rel_err(g, w) for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads))),
    }
    print(f"Transformer2DModel {jnp.dtype(dtype).name} chunked vs xla: {errs}")
    assert max(errs.values()) <= tol, errs


@pytest.mark.slow
def test_unet_chunked_matches_xla_with_attn1_capture():
    """The micro U-Net at 10 x 14 latents (5 x 7 = 35 tokens in its attention stage, three 12-token
    blocks): output, every captured attn1 feature and the gradient of a feature-KD-like loss."""
    config = UNetConfig.from_diffusers(MICRO)
    params = jax.tree.map(jnp.asarray, random_params(config, seed=0))
    inputs = make_inputs(MICRO, 2, 10, 14, per_sample_t=True)

    def run(impl: str):
        opts = ForwardOptions(attention_impl=impl, attention_block_q=16, attention_block_kv=16, capture=("attn1",))
        unet = UNet2DConditionModel(config, opts)

        def loss(p):
            out, feats = unet.apply_with_features({"params": p}, **inputs)
            return jnp.sum(out**2) + sum(jnp.sum(f**2) for f in feats.values()), (out, feats)

        (_, (out, feats)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        return out, feats, grads

    (want_out, want_feats, want_grads), (got_out, got_feats, got_grads) = run("xla"), run("chunked")
    assert sorted(got_feats) == sorted(want_feats) and got_feats
    errs = {
        "out": rel_err(got_out, want_out),
        "attn1": max(rel_err(got_feats[k], want_feats[k]) for k in want_feats),
        "grads": max(rel_err(g, w) for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads))),
    }
    print(f"micro U-Net chunked vs xla: {errs}")
    assert max(errs.values()) <= FP32_TOL, errs


def test_auto_choice_per_backend():
    small = jnp.zeros((1, 64, 2, 8), jnp.bfloat16)
    large = jnp.zeros((1, 4096, 10, 64), jnp.float32)  # 168M score elements: SDXL's 640-channel stage
    vae = jnp.zeros((1, 4096, 1, 512), jnp.bfloat16)  # the VAE's one-head attention: more than cuDNN takes
    assert auto_choice(small, "tpu") == "splash"
    assert auto_choice(small, "gpu") == "cudnn"
    assert auto_choice(large, "gpu") == "xla"
    assert auto_choice(vae, "gpu") == "xla"
    assert auto_choice(small, "cpu") == auto_choice(large, "cpu") == "chunked"


def test_auto_says_once_what_it_picks(capsys):
    kernels._announce.cache_clear()
    q = jnp.zeros((1, 8, 1, 4))
    for _ in range(3):
        dot_product_attention(q, q, q, "auto")
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"attention_impl=auto on cpu: {kernels._AUTO_RULES['cpu']}"]


@pytest.mark.parametrize("impl", ["flash", "splash", "cudnn"])
def test_accelerator_kernel_on_cpu_is_a_config_error(impl):
    q = jnp.zeros((1, 8, 1, 4))
    with pytest.raises(ConfigError, match=f"attention_impl '{impl}' needs a"):
        dot_product_attention(q, q, q, impl)


@pytest.mark.parametrize("field", ["attention_block_q", "attention_block_kv"])
def test_block_sizes_must_be_positive(field):
    with pytest.raises(ConfigError, match=field):
        ForwardOptions(**{field: 0})


def test_block_sizes_reach_the_models_from_the_training_config():
    cfg = base_config()
    cfg.compute.attention_impl, cfg.compute.attention_block_q, cfg.compute.attention_block_kv = "chunked", 256, 128
    cfg.kd.feat = 0.0  # no feature pairs: nothing is traced
    config = UNetConfig.from_diffusers(MICRO)
    teacher, student, _ = make_models(step_settings(cfg).opts, "", Models(config, config, {}))
    for unet in (teacher, student):
        assert (unet.opts.attention_impl, unet.opts.attention_block_q, unet.opts.attention_block_kv) == (
            "chunked",
            256,
            128,
        )


MESH_SCRIPT = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from koala_jax.models.attention_kernels import _on_mesh, chunked_attention, dot_product_attention

mesh = Mesh(np.array(jax.devices()).reshape(2, 1), ("data", "fsdp"))
for batch in (2, 3):  # split over the mesh; replicated where the batch does not divide
    q, k, v, ct = (jax.random.normal(jax.random.key(i), (batch, 40, 2, 8)) for i in range(4))
    kernel = lambda q, k, v: chunked_attention(q, k, v, 16, 16)
    loss = lambda attend: lambda q, k, v: jnp.sum(attend(q, k, v) * ct)
    want = jax.value_and_grad(loss(lambda q, k, v: dot_product_attention(q, k, v)), (0, 1, 2))(q, k, v)
    with jax.set_mesh(mesh):
        f = jax.jit(jax.value_and_grad(loss(lambda q, k, v: _on_mesh(kernel, q, k, v)), (0, 1, 2)))
        assert "manual_computation" in f.lower(q, k, v).as_text()
        got = f(q, k, v)
    err = max(float(jnp.max(jnp.abs(g - w))) for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
    print(batch, err)
    assert err < 1e-4
"""


@pytest.mark.slow
def test_pallas_kernels_run_per_device_under_a_mesh():
    """Under `jax.set_mesh` (as the training loop compiles), a Pallas kernel is shard_mapped over the
    batch; checked on two CPU devices with chunked attention standing in for the kernel (JAX's TPU
    interpreter does not run across several CPU devices)."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-c", MESH_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    print(result.stdout)
    assert result.returncode == 0, result.stderr[-3000:]
