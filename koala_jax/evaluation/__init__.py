"""Evaluation of generated images: a deterministic detector for the tiny world
(`koala_jax.data.world`) that reads shapes, colours, sizes and positions back from an image, and
scores them against the prompt the image was generated from."""
