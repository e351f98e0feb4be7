"""Flax modules of the SDXL-family U-Net, one file per concept as in diffusers, with the naming that
maps them to diffusers keys and the shape-only / random parameters built from a config; SDXL's VAE
(`vae.py`) and text encoders (`clip.py`) beside it."""

from koala_jax.models.common import ForwardOptions
from koala_jax.models.config import UNetConfig, UnsupportedConfigError
from koala_jax.models.init import abstract_params, dummy_inputs, init_params, param_count, random_params
from koala_jax.models.unet import UNet2DConditionModel

__all__ = [
    "ForwardOptions",
    "UNet2DConditionModel",
    "UNetConfig",
    "UnsupportedConfigError",
    "abstract_params",
    "dummy_inputs",
    "init_params",
    "param_count",
    "random_params",
]
