"""Flax modules of the SDXL-family U-Net, one file per concept as in diffusers."""

from koala_jax.models.common import ForwardOptions
from koala_jax.models.config import UNetConfig, UnsupportedConfigError
from koala_jax.models.unet import UNet2DConditionModel

__all__ = ["ForwardOptions", "UNet2DConditionModel", "UNetConfig", "UnsupportedConfigError"]
