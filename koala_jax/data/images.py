"""Image decoding and SDXL-style resize + center crop.

Decoding is strict on purpose: a truncated file raises instead of being padded with
grey (PIL's LOAD_TRUNCATED_IMAGES stays off), so a broken image is counted as
unreadable rather than trained on.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps

# What PIL raises on undecodable input: UnidentifiedImageError and truncation are
# OSErrors; some plugins raise SyntaxError or ValueError on malformed headers.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def decode_rgb(data: bytes) -> Image.Image:
    """Fully decode `data` to an upright RGB image; raises one of `DECODE_ERRORS` if corrupt.

    EXIF orientation is applied so that sizes, filters and crops see the image as
    shown; alpha is dropped by the RGB conversion.
    """
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return ImageOps.exif_transpose(image).convert("RGB")


def resize_center_crop(image: Image.Image, size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Resize the short side to `size`, center-crop a square, scale to [-1, 1].

    Returns float32 pixels [3, size, size] and the crop's (top, left) in the resized
    image: SDXL's `crops_coords_top_left` micro-conditioning, computed as the
    diffusers SDXL training script does.
    """
    scale = size / min(image.width, image.height)
    width = max(size, round(image.width * scale))
    height = max(size, round(image.height * scale))
    resized = image.resize((width, height), Image.Resampling.BICUBIC)
    top, left = round((height - size) / 2), round((width - size) / 2)
    cropped = np.asarray(resized.crop((left, top, left + size, top + size)), dtype=np.float32)
    pixels = cropped.transpose(2, 0, 1) / 127.5 - 1.0
    return pixels, (top, left)
