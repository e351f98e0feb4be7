"""The PyTorch / diffusers side: text-to-image with StableDiffusionXLPipeline, VAE decoding of JAX
latents, and tiny random pipeline components for tests. The only package (with data preparation and
the opt-in pickle reader) that imports torch; import it lazily from the JAX paths."""
