"""U-Net weights in and out: safetensors files, the diffusers <-> Flax state-dict mapping, diffusers
folders, JAX params dirs, single files, training runs, the one source resolver, and exporters; and the
VAE and text encoders of a pipeline folder (`pipeline_dir`)."""

from koala_jax.weights.diffusers_dir import load_unet
from koala_jax.weights.sources import read_source, source_config

__all__ = ["load_unet", "read_source", "source_config"]
