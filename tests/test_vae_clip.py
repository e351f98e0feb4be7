"""The Flax VAE and CLIP text encoders compute what diffusers' AutoencoderKL and transformers' CLIPTextModel /
CLIPTextModelWithProjection compute (float32 tight, bfloat16 loose), have their full-size shapes, and their
weights convert both ways bit for bit."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchVAE
from transformers import CLIPTextConfig as TorchCLIPTextConfig
from transformers import CLIPTextModel as TorchCLIPTextModel
from transformers import CLIPTextModelWithProjection as TorchCLIPTextModelWithProjection

from koala_jax.models import ForwardOptions
from koala_jax.models.clip import (
    NAMING,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    abstract_text_params,
)
from koala_jax.models.config import UnsupportedConfigError
from koala_jax.models.vae import AutoencoderKL, VAEConfig, abstract_vae_params
from koala_jax.weights.state_dict import flax_to_torch, torch_shapes, torch_to_flax

from tests.conftest import numpy_state, randomize_, rel_err

# SDXL-Base 1.0's vae/, text_encoder/ and text_encoder_2/ config.json, as published (no download).
SDXL_VAE = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
_CLIP_COMMON = {
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "model_type": "clip_text_model",
    "pad_token_id": 1,
    "torch_dtype": "float16",
    "transformers_version": "4.32.0.dev0",
    "vocab_size": 49408,
}
SDXL_TEXT_ENCODER = {
    **_CLIP_COMMON,
    "architectures": ["CLIPTextModel"],
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "projection_dim": 768,
}
SDXL_TEXT_ENCODER_2 = {
    **_CLIP_COMMON,
    "architectures": ["CLIPTextModelWithProjection"],
    "hidden_act": "gelu",
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "projection_dim": 1280,
}

# Small VAEs: three stages with channel changes (shortcut convs), two resnets per stage; and the variant
# without quant convs and without the mid-block attention.
TINY_VAE = {
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    "block_out_channels": [8, 16, 32],
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 4,
    "scaling_factor": 0.13025,
}
TINY_VAE_BARE = {**TINY_VAE, "use_quant_conv": False, "use_post_quant_conv": False, "mid_block_add_attention": False}

# Tiny text encoders, each with one pooling rule of transformers: eos_token_id 2 pools at the largest token id
# (checkpoints converted before transformers PR #24773, SDXL's), any other id at its first occurrence.
VOCAB, BOS = 100, 98
TINY_CLIP = {
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "max_position_embeddings": 12,
    "projection_dim": 24,
    "bos_token_id": BOS,
}
LEGACY_EOS = {**TINY_CLIP, "hidden_act": "quick_gelu", "eos_token_id": 2, "pad_token_id": 2}
FIRST_EOS = {**TINY_CLIP, "hidden_act": "gelu", "eos_token_id": 50, "pad_token_id": 50}
# Token ids where the two rules disagree: the largest id is not where the first end-of-text (2 or 50) is.
TOKEN_IDS = np.array(
    [
        [BOS, 70, 2, 50, 2, 2, 2, 2, 50, 50, 50, 50],
        [BOS, 5, 60, 97, 12, 50, 2, 50, 2, 2, 50, 2],
    ]
)

F32_TOL, BF16_TOL = 1e-5, 5e-2


def vae_pair(cfg: dict) -> tuple[TorchVAE, VAEConfig, dict]:
    model = randomize_(TorchVAE(**cfg), seed=3)
    config = VAEConfig.from_diffusers(dict(model.config))
    return model, config, torch_to_flax(numpy_state(model), expected=abstract_vae_params(config))


@pytest.mark.parametrize(
    "cfg,dtypes",
    [
        (TINY_VAE, (jnp.float32, jnp.bfloat16)),
        (TINY_VAE_BARE, (jnp.float32,)),
    ],
    ids=["sdxl_like", "bare"],
)
def test_vae_matches_diffusers(cfg, dtypes):
    """Encoder (posterior mean and log-variance) and decoder, on a non-square image."""
    model, config, params = vae_pair(cfg)
    pixels = np.random.default_rng(0).uniform(-1, 1, (2, 3, 24, 40)).astype(np.float32)
    with torch.no_grad():
        posterior = model.encode(torch.from_numpy(pixels)).latent_dist
        decoded = model.decode(posterior.mean).sample.numpy()
    want = (posterior.mean.numpy(), posterior.logvar.numpy(), decoded)

    def encode_decode(vae, p, x, z):
        return (
            *vae.apply({"params": p}, x, method=AutoencoderKL.encode),
            vae.apply({"params": p}, z, method=AutoencoderKL.decode),
        )

    errors = {}
    for dtype in dtypes:
        vae = AutoencoderKL(config, ForwardOptions(dtype=dtype))
        got = jax.jit(encode_decode, static_argnums=0)(vae, params, pixels, want[0])
        errors[dtype.__name__] = [rel_err(g, w) for g, w in zip(got, want)]
    print(f"max rel err (mean, logvar, decode): {errors}")
    assert max(errors["float32"]) <= F32_TOL
    assert max(errors.get("bfloat16", [0.0])) <= BF16_TOL


@pytest.mark.parametrize(
    "cfg,projection", [(LEGACY_EOS, False), (FIRST_EOS, True)], ids=["plain_legacy_eos", "projection_first_eos"]
)
def test_text_encoders_match_transformers(cfg, projection):
    """CLIPTextModel (quick_gelu, SDXL's legacy pooling rule) and CLIPTextModelWithProjection (gelu, the
    first-eos rule): last and penultimate hidden states, pooled output or its projection."""
    torch_cls, flax_cls = (
        (TorchCLIPTextModelWithProjection, CLIPTextModelWithProjection)
        if projection
        else (TorchCLIPTextModel, CLIPTextModel)
    )
    model = randomize_(torch_cls(TorchCLIPTextConfig(**cfg)), seed=4)
    config = CLIPTextConfig.from_transformers(cfg)
    params = torch_to_flax(numpy_state(model), abstract_text_params(config, projection), naming=NAMING)
    with torch.no_grad():
        out = model(torch.from_numpy(TOKEN_IDS), output_hidden_states=True)
    pooled = out.text_embeds if projection else out.pooler_output
    want = (out.last_hidden_state.numpy(), out.hidden_states[-2].numpy(), pooled.numpy())
    errors = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        got = jax.jit(flax_cls(config, ForwardOptions(dtype=dtype)).apply)({"params": params}, TOKEN_IDS)
        got_pooled = got.text_embeds if projection else got.pooler_output
        errors[dtype.__name__] = [
            rel_err(g, w) for g, w in zip((got.last_hidden_state, got.penultimate_hidden_state, got_pooled), want)
        ]
    print(f"{cfg['hidden_act']} eos={cfg['eos_token_id']}: max rel err (last, penultimate, pooled): {errors}")
    assert max(errors["float32"]) <= F32_TOL
    assert max(errors["bfloat16"]) <= BF16_TOL
    # The rules pick different tokens here, so a wrong rule could not pass.
    by_max, by_first = TOKEN_IDS.argmax(-1), (TOKEN_IDS == cfg["eos_token_id"]).argmax(-1)
    assert (by_max != by_first).all()


def test_full_size_shapes_match_diffusers_and_transformers():
    """SDXL's VAE and both text encoders: every tensor shape equals the PyTorch model's (meta device)."""
    with torch.device("meta"):
        references = {
            "vae": TorchVAE(**{k: v for k, v in SDXL_VAE.items() if not k.startswith("_")}),
            "text_encoder": TorchCLIPTextModel(TorchCLIPTextConfig(**SDXL_TEXT_ENCODER)),
            "text_encoder_2": TorchCLIPTextModelWithProjection(TorchCLIPTextConfig(**SDXL_TEXT_ENCODER_2)),
        }
    ours = {
        "vae": torch_shapes(abstract_vae_params(VAEConfig.from_diffusers(SDXL_VAE))),
        "text_encoder": torch_shapes(
            abstract_text_params(CLIPTextConfig.from_transformers(SDXL_TEXT_ENCODER), False), NAMING
        ),
        "text_encoder_2": torch_shapes(
            abstract_text_params(CLIPTextConfig.from_transformers(SDXL_TEXT_ENCODER_2), True), NAMING
        ),
    }
    for name, reference in references.items():
        want = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
        assert ours[name] == want, name
        print(f"{name}: {sum(int(np.prod(s)) for s in want.values()):,} parameters")


def test_weights_round_trip_bit_identical():
    for model, naming in (
        (randomize_(TorchVAE(**TINY_VAE), seed=5), None),
        (randomize_(TorchCLIPTextModelWithProjection(TorchCLIPTextConfig(**FIRST_EOS)), seed=6), NAMING),
    ):
        kwargs = {"naming": naming} if naming else {}
        state = numpy_state(model)
        back = flax_to_torch(torch_to_flax(state, **kwargs), **kwargs)
        assert back.keys() == state.keys()
        for key, value in state.items():
            assert back[key].dtype == value.dtype and np.array_equal(back[key], value), key


def test_unsupported_config_fields_are_refused_by_name():
    with pytest.raises(UnsupportedConfigError, match="'shift_factor'"):
        VAEConfig.from_diffusers({**SDXL_VAE, "shift_factor": 0.1159})
    with pytest.raises(UnsupportedConfigError, match="'down_block_types'.*'AttnDownEncoderBlock2D'"):
        VAEConfig.from_diffusers({**SDXL_VAE, "down_block_types": ["AttnDownEncoderBlock2D"] * 4})
    with pytest.raises(UnsupportedConfigError, match="'some_new_option'"):
        VAEConfig.from_diffusers({**SDXL_VAE, "some_new_option": 1})
    with pytest.raises(UnsupportedConfigError, match="'hidden_act' = 'relu'"):
        CLIPTextConfig.from_transformers({**SDXL_TEXT_ENCODER, "hidden_act": "relu"})
    with pytest.raises(UnsupportedConfigError, match="'projection_type'"):
        CLIPTextConfig.from_transformers({**SDXL_TEXT_ENCODER, "projection_type": "mlp"})
    # Every field diffusers writes out at its default is accepted.
    assert VAEConfig.from_diffusers(dict(TorchVAE(**TINY_VAE).config)) == VAEConfig.from_diffusers(TINY_VAE)
