"""A tiny random SDXL pipeline (everything but the U-Net) written in diffusers layout.

Tests and benchmarks need a teacher folder that loads with the same `from_pretrained`
calls as the real SDXL checkpoint, but nothing may be downloaded (the embedded default,
configs/tiny.py, uses the trained tiny-world teacher in assets/ instead).
This module builds one from random weights in well under a second: a small
`AutoencoderKL`, two small CLIP text encoders (the second with a projection, as in
SDXL), byte-level CLIP tokenizers generated locally, and SDXL's Euler scheduler.

Imports torch, diffusers and transformers: import it lazily, never from a module the
JAX training path imports at start-up.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)

TINY_TEXT_HIDDEN = 32
TINY_CROSS_ATTENTION_DIM = 2 * TINY_TEXT_HIDDEN  # hidden(te1) + hidden(te2), as SDXL's 768 + 1280
TINY_POOLED_DIM = 32  # projection_dim of text_encoder_2, as SDXL's 1280
TOKENIZER_MAX_LENGTH = 77
_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"


def _bytes_to_unicode() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for raw bytes, in CLIP's vocab order."""
    byte_values = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = byte_values[:]
    unprintable = [byte for byte in range(256) if byte not in byte_values]
    codes += [256 + offset for offset in range(len(unprintable))]
    return [chr(code) for code in codes]


def word_merges(words: Sequence[str]) -> list[tuple[str, str]]:
    """BPE merges that make every word of `words` a single token: a byte-pair encoding trained on the word
    list itself (merge the most frequent adjacent pair, repeat), so applying the merges in rank order
    rebuilds each listed word exactly; any other text still falls back to single bytes."""
    pieces = {w: [*w[:-1], w[-1] + "</w>"] for w in words if w}
    merges: list[tuple[str, str]] = []
    while True:
        pairs = Counter(pair for seq in pieces.values() for pair in zip(seq, seq[1:]))
        if not pairs:
            return merges
        best = max(pairs.items(), key=lambda item: (item[1], item[0]))[0]
        merges.append(best)
        pieces = {w: _merge(seq, best) for w, seq in pieces.items()}


def _merge(seq: list[str], pair: tuple[str, str]) -> list[str]:
    out, i = [], 0
    while i < len(seq):
        if seq[i : i + 2] == list(pair):
            out.append(pair[0] + pair[1])
            i += 2
        else:
            out.append(seq[i])
            i += 1
    return out


def tiny_clip_vocab(words: Sequence[str] = ()) -> dict[str, int]:
    """Every byte symbol alone and word-final, so any text tokenizes with no unknown tokens, plus the
    tokens `word_merges(words)` builds (whole words of a small world's vocabulary).

    The end-of-text token gets the largest id, as in CLIP, so both pooling rules
    (argmax of ids and first eos) agree.
    """
    symbols = _bytes_to_unicode()
    merged = [a + b for a, b in word_merges(words)]
    tokens = list(dict.fromkeys(symbols + [s + "</w>" for s in symbols] + merged)) + [_BOS, _EOS]
    return {token: index for index, token in enumerate(tokens)}


def _tiny_tokenizer(pad_token: str, words: Sequence[str] = ()) -> CLIPTokenizer:
    return CLIPTokenizer(
        vocab=tiny_clip_vocab(words),
        merges=word_merges(words),
        pad_token=pad_token,
        model_max_length=TOKENIZER_MAX_LENGTH,
    )


def _tiny_text_config(vocab_size: int, hidden_act: str) -> CLIPTextConfig:
    eos_id = vocab_size - 1
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TINY_TEXT_HIDDEN,
        intermediate_size=2 * TINY_TEXT_HIDDEN,
        num_hidden_layers=2,  # SDXL reads the penultimate layer, so at least two
        num_attention_heads=4,
        max_position_embeddings=TOKENIZER_MAX_LENGTH,
        hidden_act=hidden_act,
        projection_dim=TINY_POOLED_DIM,
        bos_token_id=eos_id - 1,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )


def _tiny_vae() -> AutoencoderKL:
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
        scaling_factor=0.13025,  # SDXL's
    )


def _sdxl_scheduler() -> EulerDiscreteScheduler:
    """The scheduler settings of stabilityai/stable-diffusion-xl-base-1.0."""
    return EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        interpolation_type="linear",
        use_karras_sigmas=False,
        timestep_spacing="leading",
        steps_offset=1,
    )


def save_tiny_sdxl_components(
    folder: str,
    seed: int = 0,
    words: Sequence[str] = (),
    vae: AutoencoderKL | None = None,
    token_std: float | None = None,
) -> None:
    """Write vae/, text_encoder(_2)/, tokenizer(_2)/ and scheduler/ of a tiny SDXL into `folder`.

    Weights are random but fixed by `seed`. The U-Net is left to the caller; its
    cross_attention_dim must be TINY_CROSS_ATTENTION_DIM and its pooled (text_embeds)
    input TINY_POOLED_DIM. The VAE downsamples by 2 (two blocks), not SDXL's 8, unless a (trained)
    `vae` is given. `words` become whole tokens (see `word_merges`); `token_std` rescales the token
    embeddings (CLIP's init draws them with std 0.02, which leaves a frozen random encoder's outputs
    nearly independent of the words).
    """
    torch.manual_seed(seed)
    # SDXL pads the first tokenizer with the end-of-text token and the second with "!".
    tokenizers = {"tokenizer": _tiny_tokenizer(_EOS, words), "tokenizer_2": _tiny_tokenizer("!", words)}
    vocab_size = len(tiny_clip_vocab(words))
    encoders = {
        "text_encoder": CLIPTextModel(_tiny_text_config(vocab_size, "quick_gelu")),
        "text_encoder_2": CLIPTextModelWithProjection(_tiny_text_config(vocab_size, "gelu")),
    }
    if token_std is not None:
        with torch.no_grad():
            for encoder in encoders.values():
                encoder.get_input_embeddings().weight.normal_(0.0, token_std)
    components = {"vae": vae or _tiny_vae(), **encoders, "scheduler": _sdxl_scheduler(), **tokenizers}
    for name, component in components.items():
        component.save_pretrained(os.path.join(folder, name))
