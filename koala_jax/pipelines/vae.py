"""Latents to images with the JAX VAE, as StableDiffusionXLPipeline decodes them (divide by the scaling
factor, decode, map [-1, 1] to [0, 1]): for the JAX pipeline (`jax_sdxl`) and the training previews
(`cfg.sample.vae`), with no torch anywhere."""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from koala_jax.models.vae import AutoencoderKL
from koala_jax.weights.pipeline_dir import read_vae


@functools.partial(jax.jit, static_argnums=0)
def decode_to_pixels(vae: AutoencoderKL, params: dict, latents: jnp.ndarray) -> jnp.ndarray:
    """Scaled latents (B, C, h, w) -> (B, H, W, 3) float32 images in [0, 1]."""
    images = vae.apply({"params": params}, latents, method=AutoencoderKL.images).astype(jnp.float32)
    return jnp.clip(images * 0.5 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1)


def decode_latents(latents: np.ndarray, vae_folder: str | os.PathLike) -> np.ndarray:
    """(B, C, h, w) scaled latents -> (B, H, W, 3) images in [0, 1] via the VAE at `vae_folder` (a diffusers
    vae/ folder or a pipeline folder), in float32."""
    config, params = read_vae(vae_folder)
    return np.asarray(decode_to_pixels(AutoencoderKL(config), params, jnp.asarray(latents, jnp.float32)))
