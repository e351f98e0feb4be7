"""Text-to-image with an SDXL-family pipeline in JAX, no torch: sample.py's `--backend jax`.

StableDiffusionXLPipeline's steps, reproduced: prompts through both CLIP encoders as encode_prompt does
(penultimate states concatenated, pooled from text_encoder_2); with classifier-free guidance (guidance > 1)
the negative prompt's embeddings, or zeros when there is none and the pipeline's model_index.json keeps
diffusers' force_zeros_for_empty_prompt; micro-conditioning time_ids (original size = target size = the
image size, crop top-left (0, 0)); Euler with the pipeline's own scheduler config ("leading" with
steps_offset for SDXL-Base, "trailing" on request: KOALA-Lightning's 10 steps at guidance 3.5); VAE
decoding; pixels rounded as diffusers' postprocess does. A batch's images are split over the local devices,
and image i starts from `sampling.initial_noise(seed_i)`, the noise the diffusers backend is given too.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from PIL import Image

from koala_jax.data.encoders_jax import JaxTeacherEncoders, cast
from koala_jax.dtypes import dtype as dtype_of
from koala_jax.errors import ConfigError
from koala_jax.models import ForwardOptions, UNet2DConditionModel, UNetConfig
from koala_jax.pipelines.euler import Conditioning, EulerSchedule, euler_sample
from koala_jax.pipelines.sampling import Settings, initial_noise
from koala_jax.pipelines.vae import decode_to_pixels
from koala_jax.weights.pipeline_dir import SDXLPipelineFolder, read_pipeline
from koala_jax.weights.sources import read_source

# sample.py's scheduler names -> overrides of the pipeline's scheduler config (what diffusers' backend does).
SCHEDULER_OVERRIDES = {"euler": {}, "euler-trailing": {"timestep_spacing": "trailing"}}


@dataclasses.dataclass
class JaxSDXLPipeline:
    """The U-Net (any `read_source` source) with the rest of a diffusers SDXL pipeline folder."""

    unet: UNet2DConditionModel
    unet_params: Any
    encoders: JaxTeacherEncoders  # both text encoders and the VAE
    scheduler_config: dict
    force_zeros_for_empty_prompt: bool

    @classmethod
    def load(
        cls, model: str | os.PathLike, unet: str | os.PathLike | None = None, dtype: str = "fp32", ema: bool = False
    ):
        """Components of the pipeline folder `model`; the U-Net from `unet` (a JAX params dir, a train.py run, a
        diffusers U-Net or pipeline folder) or else `model`'s own unet/ (`ema`: a run's EMA params). Everything
        is checked before any weight is read; `dtype` is the compute (and weight) dtype, the VAE staying
        float32 when its config says force_upcast."""
        from transformers import CLIPTokenizer  # Tokenizers only: transformers needs no torch for them.

        parts = read_pipeline(model)
        EulerSchedule.from_diffusers(parts.scheduler_config)  # Refuses scheduler options we do not implement.
        config, params = read_source(unet or model, ema=ema)
        _check_compatible(config, parts, unet or model)
        tokenizers = [CLIPTokenizer.from_pretrained(path) for path in parts.tokenizers]
        encoders = JaxTeacherEncoders((parts.vae_config, parts.vae_params), parts.text, tokenizers, dtype)
        compute = dtype_of(dtype)
        replicated = NamedSharding(encoders.mesh, PartitionSpec())
        return cls(
            unet=UNet2DConditionModel(
                config, ForwardOptions(dtype=compute, param_dtype=compute, attention_impl="auto")
            ),
            unet_params=jax.device_put(cast(params, compute), replicated),
            encoders=encoders,
            scheduler_config=parts.scheduler_config,
            force_zeros_for_empty_prompt=parts.force_zeros_for_empty_prompt,
        )

    def schedule(self, scheduler: str) -> EulerSchedule:
        """The pipeline's scheduler config as `scheduler` ('euler' or 'euler-trailing') uses it."""
        if scheduler not in SCHEDULER_OVERRIDES:
            raise ConfigError(f"--backend jax samples with {' or '.join(SCHEDULER_OVERRIDES)}, not {scheduler!r}")
        return EulerSchedule.from_diffusers(self.scheduler_config, **SCHEDULER_OVERRIDES[scheduler])

    def latent_shape(self, settings: Settings) -> tuple[int, int, int]:
        """(channels, height, width) of the latents of a `settings.height` x `settings.width` image."""
        factor = self.encoders.vae.config.downscale_factor
        if settings.height % factor or settings.width % factor:
            raise ConfigError(f"height and width must be multiples of {factor}, got {settings.height}x{settings.width}")
        return self.unet.config.in_channels, settings.height // factor, settings.width // factor

    def conditioning(
        self, prompts: Sequence[str], negative_prompt: str | None, guided: bool, settings: Settings
    ) -> tuple[Conditioning, Conditioning | None]:
        """(cond, uncond) as StableDiffusionXLPipeline.encode_prompt and _get_add_time_ids make them;
        uncond is None without guidance."""
        embeds, pooled = self.encoders.encode_captions(prompts)
        h, w = settings.height, settings.width
        time_ids = np.tile(np.asarray([[h, w, 0, 0, h, w]], np.float32), (len(prompts), 1))
        cond = Conditioning(embeds, pooled, time_ids)
        if not guided:
            return cond, None
        if negative_prompt is None and self.force_zeros_for_empty_prompt:
            return cond, Conditioning(np.zeros_like(embeds), np.zeros_like(pooled), time_ids)
        neg_embeds, neg_pooled = self.encoders.encode_captions([negative_prompt or ""] * len(prompts))
        return cond, Conditioning(neg_embeds, neg_pooled, time_ids)

    def __call__(
        self,
        prompts: Sequence[str],
        settings: Settings,
        seeds: Sequence[int] = (),
        negative_prompt: str | None = None,
        latents: np.ndarray | None = None,
    ) -> list[Image.Image]:
        """One image per prompt, starting from `latents` (B, C, h, w) when given, else from each seed's
        `initial_noise`."""
        pixels, _ = self.generate(prompts, settings, seeds, negative_prompt, latents)
        return [Image.fromarray(image) for image in pixels]

    def generate(
        self,
        prompts: Sequence[str],
        settings: Settings,
        seeds: Sequence[int] = (),
        negative_prompt: str | None = None,
        latents: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(uint8 images (B, H, W, 3), final latents (B, C, h, w) before decoding): what __call__ draws, with the
        latents an evaluation compares between models."""
        schedule = self.schedule(settings.scheduler)
        if latents is None:
            shape = (1, *self.latent_shape(settings))
            latents = np.concatenate([initial_noise(seed, shape) for seed in seeds])
        if len(latents) != len(prompts):
            raise ConfigError(f"{len(prompts)} prompts but {len(latents)} seeds or initial latents")
        guided = settings.guidance > 1.0
        cond, uncond = self.conditioning(prompts, negative_prompt, guided, settings)
        shard = lambda tree: None if tree is None else Conditioning(*(self.encoders.shard(x) for x in tree))
        out = euler_sample(
            self.unet,
            self.unet_params,
            self.encoders.shard(latents),
            shard(cond),
            schedule,
            settings.steps,
            settings.guidance,
            shard(uncond),
        )
        pixels = np.asarray(decode_to_pixels(self.encoders.vae, self.encoders.vae_params, out))[: len(prompts)]
        return (pixels * 255).round().astype(np.uint8), np.asarray(out)[: len(prompts)]


def _check_compatible(config: UNetConfig, parts: SDXLPipelineFolder, where: object) -> None:
    """The U-Net must take what the text encoders and the VAE give (checked before any weight is read)."""
    text = parts.text
    wanted = (config.cross_attention_dim[0], config.pooled_text_dim, config.in_channels)
    given = (
        text.config.hidden_size + text.config_2.hidden_size,
        text.config_2.projection_dim,
        parts.vae_config.latent_channels,
    )
    names = ("cross_attention_dim (text width)", "pooled text width", "latent channels")
    wrong = [f"{n}: U-Net {w}, pipeline {g}" for n, w, g in zip(names, wanted, given) if w != g]
    if wrong:
        raise ConfigError(f"{where}: the U-Net does not fit this pipeline's encoders ({'; '.join(wrong)})")
