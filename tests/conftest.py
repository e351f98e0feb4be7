"""Shared test settings, the table of tiny U-Nets, and helpers every test module uses (no test module
imports another: they import from here).

XLA's CPU backend spends most of a small test's time compiling; a lower LLVM optimisation level halves
that and changes no result beyond float32 rounding. Tests that start their own training processes are
marked `slow` (and `multiprocess` when several processes cooperate): `pytest -m "not slow"` is the fast
lane, the README's plain `pytest` runs everything.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

_FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FAST_COMPILE}".strip()

import numpy as np  # noqa: E402  (after XLA_FLAGS: jax reads them when it starts)
import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline  # noqa: E402
from diffusers import UNet2DConditionModel as TorchUNet  # noqa: E402
from flax.traverse_util import flatten_dict  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer  # noqa: E402

from koala_jax.cli import convert  # noqa: E402
from koala_jax.pipelines.tiny import save_tiny_sdxl_components  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# Prepended to `python -c` code: torch and diffusers cannot be imported (as in a venv without them; transformers
# then finds no torch either), so a command that still runs never needed them.
WITHOUT_TORCH = "import sys; sys.modules.update(torch=None, diffusers=None); "


# SDXL layout in miniature: linear projections, per-block head counts, mid block, 3 stages.
SDXL_LIKE = {
    "block_out_channels": [32, 64, 128],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "layers_per_block": 2,
    "transformer_layers_per_block": [1, 2, 3],
    "attention_head_dim": [2, 4, 8],
    "cross_attention_dim": 48,
    "use_linear_projection": True,
    "norm_num_groups": 8,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 24 + 6 * 8,
    "sample_size": 16,
}

# Everything else: 4 stages, conv projections, int head count, per-block layer counts, an explicit
# decoder depth list and no mid block.
NO_MID_CONV_PROJ = {
    "block_out_channels": [16, 32, 32, 64],
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "mid_block_type": None,
    "layers_per_block": [1, 2, 1, 1],
    "transformer_layers_per_block": [1, 2, 1, 1],
    "reverse_transformer_layers_per_block": [1, 1, 2, 1],
    "attention_head_dim": 4,
    "cross_attention_dim": 40,
    "use_linear_projection": False,
    "norm_num_groups": 8,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 4,
    "projection_class_embeddings_input_dim": 16 + 6 * 4,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
}

# Per-pair transformer depths as SSD-1B and Segmind-Vega write them (nested lists; an entry for a block
# without attention that is not one per pair; a depth-0 attention; one decoder list per up block) with
# their single-resnet mid block.
PER_PAIR = {
    **SDXL_LIKE,
    "mid_block_type": "UNetMidBlock2D",
    "transformer_layers_per_block": [[1], [2, 1], [2, 0]],
    "reverse_transformer_layers_per_block": [[2, 1, 3], [1, 0, 1], 1],
}
# Per-pair depths with an attention mid block (whose depth diffusers takes from the deepest down block's
# first pair: 2 here) and a different number of pairs per stage.
PER_PAIR_MID = {
    **SDXL_LIKE,
    "layers_per_block": [1, 2, 2],
    "transformer_layers_per_block": [1, [1, 2], [2, 1]],
    "reverse_transformer_layers_per_block": [[1, 3, 2], [2, 0, 1], 1],
}

# A tiny SDXL-family teacher (two residual blocks per encoder stage, depth 4 at the deepest stage) from
# which KOALA students are derived in tests.
TINY_TEACHER = {
    **SDXL_LIKE,
    "transformer_layers_per_block": [1, 2, 4],
    "cross_attention_dim": 64,
    "projection_class_embeddings_input_dim": 32 + 6 * 8,
}


def randomize_(model, seed: int = 0):
    """Overwrite every parameter of a torch module with seeded random values of a sensible scale."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim >= 2:
                p.copy_(noise / math.sqrt(p[0].numel()))
            elif name.endswith("weight"):  # norm scales around 1
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(0.1 * noise)
    return model.eval()


# The smallest SDXL-shaped U-Net (2 stages), for tests that compile gradients.
MICRO = {
    "block_out_channels": [16, 32],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "layers_per_block": 1,
    "transformer_layers_per_block": [1, 2],
    "attention_head_dim": [2, 4],
    "cross_attention_dim": 16,
    "use_linear_projection": True,
    "norm_num_groups": 8,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 4,
    "projection_class_embeddings_input_dim": 8 + 6 * 4,
}
# The micro U-Net with two residual blocks per encoder stage, so its KOALA student drops some: the
# teacher of the training tests.
MICRO_TEACHER = {**MICRO, "layers_per_block": 2}


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def make_inputs(cfg: dict, batch: int, h: int, w: int, per_sample_t: bool, seed: int = 0) -> dict:
    g = np.random.default_rng(seed)
    pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
    t = g.uniform(0, 999, size=(batch,)) if per_sample_t else np.array(637.0)
    return {
        "sample": g.standard_normal((batch, cfg.get("in_channels", 4), h, w)).astype(np.float32),
        "timesteps": t.astype(np.float32),
        "encoder_hidden_states": g.standard_normal((batch, 7, cfg["cross_attention_dim"])).astype(np.float32),
        "text_embeds": g.standard_normal((batch, pooled)).astype(np.float32),
        "time_ids": np.tile(np.array([[h * 8, w * 8, 0, 0, h * 8, w * 8]], np.float32), (batch, 1))
        + g.integers(0, 64, size=(batch, 6)).astype(np.float32),
    }


def torch_forward(model: TorchUNet, x: dict, capture: bool) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Output and, via forward hooks, every feature kind keyed by module path (NHWC for spatial ones)."""
    feats, hooks = {}, []

    def hook(name):
        def fn(_module, _inputs, out):
            out = out[0] if isinstance(out, tuple) else out
            feats[name] = (out.permute(0, 2, 3, 1) if out.ndim == 4 else out).detach().numpy()

        return fn

    if capture:
        for name, module in model.named_modules():
            last = name.split(".")[-1]
            is_resnet = ".resnets." in name and last.isdigit()
            is_stage = name == "mid_block" or (
                name.count(".") == 1 and name.split(".")[0] in ("down_blocks", "up_blocks")
            )
            if last in ("attn1", "attn2", "ff") or is_resnet or is_stage:
                hooks.append(module.register_forward_hook(hook(name)))
    with torch.no_grad():
        out = model(
            torch.from_numpy(x["sample"]),
            torch.from_numpy(x["timesteps"]),
            torch.from_numpy(x["encoder_hidden_states"]),
            added_cond_kwargs={
                "text_embeds": torch.from_numpy(x["text_embeds"]),
                "time_ids": torch.from_numpy(x["time_ids"]),
            },
        ).sample
    for h in hooks:
        h.remove()
    return out.numpy(), feats


def tiny_clip_encoder(cls, folder: Path, hidden: int, projection: int, seed: int):
    """A tiny CLIP text encoder of the tiny pipeline's vocabulary (its config in `folder`) with its own width (CLIP-L
    and bigG must differ in width, as in SDXL, for diffusers' single-file reader to tell them apart)."""
    config = CLIPTextConfig.from_pretrained(folder)
    config.update({"hidden_size": hidden, "intermediate_size": 2 * hidden, "projection_dim": projection})
    return randomize_(cls(config), seed)


def build_teacher_pipeline(folder: Path) -> TorchUNet:
    """A complete tiny SDXL pipeline folder (model_index.json included, written by diffusers itself) whose
    U-Net is a random TINY_TEACHER; returns that U-Net."""
    save_tiny_sdxl_components(str(folder))
    unet = randomize_(TorchUNet(**TINY_TEACHER), seed=1)
    components = {
        "vae": AutoencoderKL,
        "text_encoder": CLIPTextModel,
        "text_encoder_2": CLIPTextModelWithProjection,
        "tokenizer": CLIPTokenizer,
        "tokenizer_2": CLIPTokenizer,
        "scheduler": EulerDiscreteScheduler,
    }
    loaded = {name: cls.from_pretrained(str(folder / name)) for name, cls in components.items()}
    StableDiffusionXLPipeline(unet=unet, **loaded).save_pretrained(str(folder))
    return unet


def run(*argv: object) -> int:
    """`python convert_weights.py *argv`, in this process; returns the exit status."""
    return convert.main([str(a) for a in argv])


def numpy_state(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def assert_trees_equal(got: dict, want: dict) -> None:
    got, want = flatten_dict(got), flatten_dict(want)
    assert sorted(got) == sorted(want)
    for path in want:
        assert np.asarray(got[path]).dtype == np.asarray(want[path]).dtype, path
        np.testing.assert_array_equal(np.asarray(got[path]), np.asarray(want[path]), err_msg=str(path))


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """On a small shared CPU, torch's spinning OpenMP threads make tiny models many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def components(tmp_path_factory) -> Path:
    """A tiny random SDXL pipeline folder without its U-Net (VAE, text encoders, tokenizers, scheduler)."""
    folder = tmp_path_factory.mktemp("tiny_sdxl")
    save_tiny_sdxl_components(str(folder), seed=0)
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Three random 40 px images with captions in .txt files beside them."""
    folder = tmp_path_factory.mktemp("images")
    for i in range(3):
        pixels = np.random.default_rng(i).integers(0, 256, (40, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a random picture number {i}")
    return folder


def random_sdxl_pipeline(folder: Path, unet: dict) -> StableDiffusionXLPipeline:
    """A tiny SDXL pipeline with random non-trivial weights in every part and a U-Net of config `unet`, saved to
    `folder` by diffusers."""
    save_tiny_sdxl_components(str(folder))
    pipe = StableDiffusionXLPipeline(
        vae=randomize_(AutoencoderKL.from_pretrained(folder / "vae"), seed=6),
        text_encoder=tiny_clip_encoder(CLIPTextModel, folder / "text_encoder", 16, 16, seed=4),
        text_encoder_2=tiny_clip_encoder(CLIPTextModelWithProjection, folder / "text_encoder_2", 32, 24, seed=5),
        tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
        tokenizer_2=CLIPTokenizer.from_pretrained(folder / "tokenizer_2"),
        scheduler=EulerDiscreteScheduler.from_pretrained(folder / "scheduler"),
        unet=randomize_(TorchUNet(**unet), seed=3),
    )
    pipe.save_pretrained(folder)
    return pipe
