"""The tiny random SDXL teacher loads like the real one, with SDXL's shapes and settings."""

from __future__ import annotations

import os
import time

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from koala_jax.pipelines.tiny import (
    TINY_CROSS_ATTENTION_DIM,
    TINY_POOLED_DIM,
    save_tiny_sdxl_components,
)


def test_tiny_components_load_with_diffusers_layout(tmp_path):
    start = time.perf_counter()
    save_tiny_sdxl_components(str(tmp_path), seed=0)
    assert time.perf_counter() - start < 2.0
    assert sorted(os.listdir(tmp_path)) == [
        "scheduler",
        "text_encoder",
        "text_encoder_2",
        "tokenizer",
        "tokenizer_2",
        "vae",
    ]
    vae = AutoencoderKL.from_pretrained(str(tmp_path / "vae"))
    assert vae.config.latent_channels == 4 and vae.config.scaling_factor == 0.13025
    te1 = CLIPTextModel.from_pretrained(str(tmp_path / "text_encoder"))
    te2 = CLIPTextModelWithProjection.from_pretrained(str(tmp_path / "text_encoder_2"))
    assert te1.config.hidden_size + te2.config.hidden_size == TINY_CROSS_ATTENTION_DIM
    assert te2.config.projection_dim == TINY_POOLED_DIM
    scheduler = EulerDiscreteScheduler.from_pretrained(str(tmp_path / "scheduler"))
    expected = {
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "num_train_timesteps": 1000,
        "steps_offset": 1,
        "timestep_spacing": "leading",
    }
    assert {key: scheduler.config[key] for key in expected} == expected


def test_tokenizers_take_any_english_caption(tmp_path):
    save_tiny_sdxl_components(str(tmp_path))
    caption = "A Golden-Retriever puppy, 3 months old, naïve & happy — on a couch!"
    for name, pad in (("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")):
        tokenizer = CLIPTokenizer.from_pretrained(str(tmp_path / name))
        assert tokenizer.model_max_length == 77 and tokenizer.pad_token == pad
        ids = tokenizer(caption, padding="max_length", max_length=77, truncation=True).input_ids
        words = ids[1 : ids.index(tokenizer.eos_token_id)]  # unknown text would map to eos early
        assert len(ids) == 77 and ids[0] == tokenizer.bos_token_id
        assert tokenizer.decode(words).replace(" ", "") == caption.lower().replace(" ", "")


def test_same_seed_same_weights(tmp_path):
    save_tiny_sdxl_components(str(tmp_path / "a"), seed=1)
    save_tiny_sdxl_components(str(tmp_path / "b"), seed=1)
    save_tiny_sdxl_components(str(tmp_path / "c"), seed=2)
    weights = [CLIPTextModel.from_pretrained(str(tmp_path / d / "text_encoder")).state_dict() for d in "abc"]
    key = "embeddings.token_embedding.weight"
    assert torch.equal(weights[0][key], weights[1][key])
    assert not torch.equal(weights[0][key], weights[2][key])
