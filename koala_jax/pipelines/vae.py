"""Decoding JAX latents to images with a diffusers `AutoencoderKL` (training previews)."""

from __future__ import annotations

import os

import numpy as np
import torch
from diffusers import AutoencoderKL


def decode_latents(latents: np.ndarray, vae_folder: str | os.PathLike) -> np.ndarray:
    """(B, C, h, w) scaled latents -> (B, H, W, 3) images in [0, 1] via the VAE at `vae_folder`."""
    vae = AutoencoderKL.from_pretrained(vae_folder).eval()
    with torch.no_grad():
        images = vae.decode(torch.from_numpy(np.asarray(latents, np.float32)) / vae.config.scaling_factor).sample
    return ((images.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()
