"""koala-jax: KOALA distillation of SDXL-family U-Nets in JAX/Flax.

Public API:
    unet, params = koala_jax.load_unet("path/to/diffusers/unet")
    out = unet.apply({"params": params}, sample, timesteps, encoder_hidden_states, text_embeds, time_ids)
"""

from koala_jax.loading import init_params, load_unet, param_count
from koala_jax.models import ForwardOptions, UNet2DConditionModel, UNetConfig, UnsupportedConfigError
from koala_jax.presets import derive_student_config, preset

__all__ = ["ForwardOptions", "UNet2DConditionModel", "UNetConfig", "UnsupportedConfigError",
           "derive_student_config", "init_params", "load_unet", "param_count", "preset"]
