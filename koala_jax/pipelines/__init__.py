"""Text-to-image: the diffusers backend (StableDiffusionXLPipeline, torch imported lazily), the JAX SDXL
pipeline and its Euler sampler (no torch; the sampler also makes the training previews), VAE decoding in
JAX, and tiny random pipeline components for tests (`tiny.py`, torch). With data preparation and the
opt-in pickle reader, the only package allowed to import torch."""
