"""Teacher-student agreement: how close two models' outputs are when they start from the same noise with
the same prompt. PSNR of images (uint8, peak 255) and MSE of images and final latents."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def mse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(np.square(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def psnr(a: np.ndarray, b: np.ndarray, peak: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB (inf for identical inputs)."""
    error = mse(a, b)
    return math.inf if error == 0 else 10.0 * math.log10(peak**2 / error)


def agreement(
    images: Sequence[np.ndarray],
    reference: Sequence[np.ndarray],
    latents: Sequence[np.ndarray] | None = None,
    reference_latents: Sequence[np.ndarray] | None = None,
) -> dict[str, float]:
    """Mean PSNR and MSE of each image against its reference (uint8 pixel units), and the mean MSE of the
    final latents when both are given."""
    out = {
        "psnr_db": float(np.mean([psnr(a, b) for a, b in zip(images, reference, strict=True)])),
        "image_mse": float(np.mean([mse(a, b) for a, b in zip(images, reference, strict=True)])),
    }
    if latents is not None and reference_latents is not None:
        out["latent_mse"] = float(np.mean([mse(a, b) for a, b in zip(latents, reference_latents, strict=True)]))
    return out
