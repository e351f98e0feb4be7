"""The teacher's VAE and two CLIP text encoders in JAX, encoding as SDXL's pipeline does: prepare_data.py's
`--backend jax` (no torch: TPU hosts) and the JAX SDXL pipeline's prompt encoding.

Same interface as the PyTorch `prepare.TeacherEncoders`. Each batch is split over this process's devices
(padded to a multiple of their count) with the weights replicated on every one; in a multi-process run
each process encodes its own shards on its own devices, so nothing crosses hosts.

Tokenizers come from the caller (transformers' CLIPTokenizer; this layer does not import transformers):
anything called as `tokenizer(texts, padding=..., max_length=..., truncation=..., return_tensors="np")`.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from koala_jax.dtypes import dtype as dtype_of
from koala_jax.errors import DataError
from koala_jax.models import ForwardOptions
from koala_jax.models.clip import SDXLTextEncoders
from koala_jax.models.vae import AutoencoderKL, VAEConfig
from koala_jax.weights.checks import ValueChecker
from koala_jax.weights.pipeline_dir import TextEncoders, read_text_encoders, read_vae

BATCH_AXIS = "data"


def local_mesh() -> Mesh:
    """A 1-D mesh over this process's devices: batches are split along it, weights replicated."""
    return Mesh(np.asarray(jax.local_devices()), (BATCH_AXIS,))


def cast(params: Any, dtype: np.dtype) -> Any:
    """Every float leaf as `dtype` (host numpy: memory-mapped weights are read here, once); a value the cast
    turns into Inf (fp16 holds up to 65504) is refused by its parameter path, with any NaN/Inf."""
    checker = ValueChecker(f"weights cast to {np.dtype(dtype).name}")
    out = {path: checker.cast("/".join(path), leaf, dtype) for path, leaf in flatten_dict(params).items()}
    checker.done()
    return unflatten_dict(out)


class JaxTeacherEncoders:
    """The teacher's VAE and both text encoders, jitted, batches sharded over the local devices."""

    def __init__(self, vae: tuple[VAEConfig, dict], text: TextEncoders, tokenizers: Sequence[Any], dtype: str):
        """`vae` and `text` as `weights.pipeline_dir` reads them; `dtype` of the text encoders (and of the VAE
        unless its config asks for float32)."""
        self.mesh = local_mesh()
        replicated = NamedSharding(self.mesh, PartitionSpec())
        text_dtype = dtype_of(dtype)
        vae_config, vae_params = vae
        # SDXL's VAE overflows in float16 (force_upcast): keep it in float32 then, as the PyTorch encoders do.
        vae_dtype = np.dtype(np.float32) if vae_config.force_upcast else text_dtype
        vae_opts = ForwardOptions(dtype=vae_dtype, param_dtype=vae_dtype, attention_impl="auto")
        self.vae = AutoencoderKL(vae_config, vae_opts)
        self.vae_params = jax.device_put(cast(vae_params, vae_dtype), replicated)
        opts = ForwardOptions(dtype=text_dtype, param_dtype=text_dtype)
        self.text_encoders = SDXLTextEncoders(text.config, text.config_2, opts)
        self.text_params = jax.device_put(cast(text.params, text_dtype), replicated)
        self.tokenizers = tuple(tokenizers)

    @classmethod
    def from_folder(cls, teacher: str | os.PathLike, tokenizers: Sequence[Any], dtype: str = "float32"):
        """The encoders of an SDXL pipeline folder (vae/, text_encoder/, text_encoder_2/)."""
        return cls(read_vae(teacher), read_text_encoders(teacher), tokenizers, dtype)

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        factor = self.vae.config.downscale_factor
        if resolution % factor:
            raise DataError(f"resolution {resolution} is not a multiple of the VAE's {factor}")
        side = resolution // factor
        return (self.vae.config.latent_channels, side, side)

    @property
    def text_dim(self) -> int:
        return self.text_encoders.text_dim

    @property
    def pooled_dim(self) -> int:
        return self.text_encoders.pooled_dim

    def shard(self, batch: np.ndarray) -> jax.Array:
        """`batch` padded (repeating its last row) to a multiple of the device count and split over the
        devices; callers keep the first len(batch) rows of what they compute from it."""
        pad = -len(batch) % self.mesh.size
        padded = np.concatenate([batch, np.repeat(batch[-1:], pad, axis=0)]) if pad else batch
        return jax.device_put(padded, NamedSharding(self.mesh, PartitionSpec(BATCH_AXIS)))

    def encode_images(self, pixels: np.ndarray) -> np.ndarray:
        """Scaled latents [B, C, h, w] float32 of pixels [B, 3, H, W] in [-1, 1]: the posterior mean times
        the scaling factor (deterministic, as the PyTorch encoders)."""
        latents = _latents(self.vae, self.vae_params, self.shard(np.asarray(pixels, np.float32)))
        return np.asarray(latents, np.float32)[: len(pixels)]

    def token_ids(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Each tokenizer's ids, padded or truncated to its model_max_length (77), as encode_prompt."""
        return tuple(
            np.asarray(
                tokenizer(
                    list(texts),
                    padding="max_length",
                    max_length=tokenizer.model_max_length,
                    truncation=True,
                    return_tensors="np",
                ).input_ids,
                np.int32,
            )
            for tokenizer in self.tokenizers
        )

    def encode_captions(self, captions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(prompt_embeds [B, 77, D], pooled [B, P]) float32 as StableDiffusionXLPipeline.encode_prompt."""
        ids, ids_2 = (self.shard(i) for i in self.token_ids(captions))
        prompt_embeds, pooled = _text_embeddings(self.text_encoders, self.text_params, ids, ids_2)
        n = len(captions)
        return np.asarray(prompt_embeds, np.float32)[:n], np.asarray(pooled, np.float32)[:n]


# Jitted with the (hashable) module static: every encoder object of one architecture shares the compilations.
@functools.partial(jax.jit, static_argnums=0)
def _latents(vae: AutoencoderKL, params: dict, pixels: jax.Array) -> jax.Array:
    return vae.apply({"params": params}, pixels, method=AutoencoderKL.latents)


@functools.partial(jax.jit, static_argnums=0)
def _text_embeddings(
    encoders: SDXLTextEncoders, params: dict, ids: jax.Array, ids_2: jax.Array
) -> tuple[jax.Array, jax.Array]:
    return encoders.apply({"params": params}, ids, ids_2)
