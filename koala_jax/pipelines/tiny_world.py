"""The tiny world's SDXL-family pipeline, built from scratch on CPU: word-level CLIP tokenizers and two
frozen tiny CLIP text encoders, a small VAE trained to reconstruct the world's images and SDXL's scheduler;
the teacher U-Net (`configs/tiny_world_unet.json`) is trained on top by `configs/tiny_world_teacher.py`.

Why these choices:
- Tokens are whole words of the world's vocabulary (byte fallback for anything else), so the frozen random
  encoders see "red" as one token whose embedding the U-Net's cross-attention can key on; the token
  embeddings are drawn with std 1 (CLIP's init uses 0.02, which leaves a random frozen encoder's outputs
  nearly the same for every caption).
- The VAE downsamples 64 px images by 4 to 16x16x4 latents: SDXL's latent layout at a size a 2-core CPU
  trains in minutes. It is trained with a reconstruction loss and a small KL term, and its `scaling_factor`
  is set, as SDXL's was, to 1 / std of the latents of the training images.

Writes diffusers layout: `StableDiffusionXLPipeline.from_pretrained` loads the folder once a unet/ is added
(`convert_weights.py to-diffusers --pipeline <this folder>` does that).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import diffusers
import numpy as np
import torch
from diffusers import AutoencoderKL

from koala_jax.data import world
from koala_jax.pipelines.tiny import save_tiny_sdxl_components

RESOLUTION = 64
_PIPELINE_INDEX = {
    "_class_name": "StableDiffusionXLPipeline",
    "force_zeros_for_empty_prompt": True,
    "vae": ["diffusers", "AutoencoderKL"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    "unet": [None, None],
    "image_encoder": [None, None],
    "feature_extractor": [None, None],
}


def world_vae() -> AutoencoderKL:
    """An untrained 3-stage AutoencoderKL (64 px -> 16x16x4), SDXL's VAE design in miniature."""
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=RESOLUTION,
        force_upcast=False,
    )


def world_images(n: int, seed: int) -> np.ndarray:
    """(n, 3, 64, 64) float32 images in [-1, 1] of the world's scenes 0..n-1 (seed `seed`)."""
    images = np.stack([world.render(scene, RESOLUTION) for scene in world.scenes(n, seed)])
    return images.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0


def train_vae(
    vae: AutoencoderKL,
    images: np.ndarray,
    steps: int,
    batch_size: int = 32,
    crop: int = 32,
    lr: float = 2e-3,
    kl_weight: float = 1e-6,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> list[float]:
    """Train `vae` in place to reconstruct `images` (`reconstruction_loss` + kl_weight * KL, AdamW, one-cycle
    schedule); returns the reconstruction loss every 250 steps.

    Each step takes the same random `crop` x `crop` window (aligned to the 4x downsampling) of a random batch: a
    convolutional VAE learns the same mapping from windows at a quarter of the cost, and measured on whole
    64 px images the crop-trained VAE reconstructs better for the same time (docs/tiny_world.md)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    data = torch.from_numpy(images)
    side = images.shape[-1]
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.05)
    vae.train()
    history, start = [], time.perf_counter()
    for step in range(steps):
        top, left = rng.integers(0, side - crop + 1, 2) // 4 * 4
        x = data[rng.integers(0, len(data), batch_size)][:, :, top : top + crop, left : left + crop]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        rec = reconstruction_loss(recon, x)
        loss = rec + kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if (step + 1) % 250 == 0:
            history.append(rec.item())
            log(f"vae step {step + 1}/{steps}: reconstruction {rec.item():.4f} ({time.perf_counter() - start:.0f} s)")
    vae.eval()
    return history


def reconstruction_loss(recon: torch.Tensor, x: torch.Tensor, object_weight: float = 10.0) -> torch.Tensor:
    """MSE + L1, with the objects' pixels (saturated: chroma above a quarter of its range) weighted
    `object_weight` times the neutral background's: objects cover a few percent of an image, and their colour
    and shape are what a caption states (unweighted, a VAE that blurs and desaturates them scores well)."""
    chroma = x.amax(dim=1, keepdim=True) - x.amin(dim=1, keepdim=True)  # 0 (grey) .. 2 in [-1, 1] pixels
    weight = 1.0 + (object_weight - 1.0) * (chroma > 0.5).float()
    error = recon - x
    return ((error.square() + error.abs()) * weight).sum() / (weight.sum() * x.shape[1])


@torch.no_grad()
def reconstruct(vae: AutoencoderKL, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """uint8 (n, 64, 64, 3) reconstructions (posterior mean) of float images in [-1, 1]."""
    out = []
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(images[i : i + batch_size])
        out.append(vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1).numpy())
    return np.round((np.concatenate(out).transpose(0, 2, 3, 1) + 1) * 127.5).astype(np.uint8)


@torch.no_grad()
def latent_std(vae: AutoencoderKL, images: np.ndarray, batch_size: int = 64) -> float:
    """Standard deviation of the posterior means: SDXL's scaling_factor is 1 / this, measured the same way."""
    means = [
        vae.encode(torch.from_numpy(images[i : i + batch_size])).latent_dist.mean for i in range(0, len(images), 64)
    ]
    return float(torch.cat(means).std())


def build_components(
    folder: str | Path,
    seed: int = 0,
    vae_steps: int = 4000,
    vae_images: int = 8192,
    torch_threads: int = 1,
    log: Callable[[str], None] = print,
) -> tuple[dict, AutoencoderKL]:
    """Write the tiny world's pipeline minus its U-Net into `folder` (created): a trained VAE, frozen word-level
    text encoders, tokenizers, scheduler and model_index.json. Returns what was measured, and the VAE."""
    folder = Path(folder)
    torch.set_num_threads(torch_threads)  # 1 is fastest on a busy 2-core CPU (no spinning OpenMP threads).
    images = world_images(vae_images, seed=seed + 1000)  # Scenes other than the training data's (seed 0).
    vae = world_vae()
    history = train_vae(vae, images, vae_steps, seed=seed, log=log)
    vae.register_to_config(scaling_factor=round(1.0 / latent_std(vae, images[:2048]), 5))
    save_tiny_sdxl_components(str(folder), seed=seed, words=world.vocabulary(), vae=vae, token_std=1.0)
    index = {**_PIPELINE_INDEX, "_diffusers_version": diffusers.__version__}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return {"vae_reconstruction_loss": history, "scaling_factor": vae.config.scaling_factor}, vae
