"""koala-jax: KOALA distillation of SDXL-family U-Nets in JAX/Flax.

Public API:
    unet, params = koala_jax.load_unet("path/to/diffusers/unet")
    out = unet.apply({"params": params}, sample, timesteps, encoder_hidden_states, text_embeds, time_ids)

Layout (imports only run down this list): models -> students -> weights -> data -> pipelines -> train
-> evaluation -> cli; `errors` and `dtypes` are leaves every layer may use.
"""

from koala_jax.errors import KoalaError
from koala_jax.models import ForwardOptions, UNet2DConditionModel, UNetConfig, UnsupportedConfigError
from koala_jax.models.init import init_params, param_count
from koala_jax.students import derive_student_config, preset
from koala_jax.weights import load_unet

__all__ = [
    "ForwardOptions",
    "KoalaError",
    "UNet2DConditionModel",
    "UNetConfig",
    "UnsupportedConfigError",
    "derive_student_config",
    "init_params",
    "load_unet",
    "param_count",
    "preset",
]
