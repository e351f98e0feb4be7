"""Metrics for real SDXL-family models, the paper's kinds: CLIP score (does the image show the prompt), FID
against a folder of reference images (do the images look like real ones), and HPSv2 (would people prefer them).

This is the one evaluation module on the PyTorch side (torch, torchmetrics, transformers). It imports them
inside its functions, so the tiny-world evaluation and the JAX pipeline never pay for them. Every model and
weight file is looked for before anything is computed, and nothing is downloaded at run time: whatever is
missing is named in one line (`MetricUnavailableError`) with the command or URL that fetches it.

- CLIP score, torchmetrics' definition: 100 * max(cos(image embedding, text embedding), 0) per image, and the
  mean over images, from a local transformers CLIP folder (safetensors weights only).
- FID: torchmetrics' `FrechetInceptionDistance` on the 2048 pool features of torch-fidelity's InceptionV3 (the
  TensorFlow FID weights, so values compare with published ones). Reference images are scaled and centre-
  cropped to the generated size. Any torch module mapping uint8 (N, 3, H, W) to (N, d) can stand in.
- HPSv2: the `hpsv2` package's scorer with a local HPS_v2.1 checkpoint, a pickle: refused without allow_pickle.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import pickle
from collections.abc import Iterator, Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from koala_jax.errors import ConfigError, DataError, KoalaError, MissingPathError

CLIP_REPO = "openai/clip-vit-large-patch14"
# Files a transformers CLIP folder needs, each as alternatives (older and newer layouts).
CLIP_FILES = {
    "safetensors weights (model.safetensors)": ("model.safetensors", "model.safetensors.index.json"),
    "tokenizer (tokenizer.json or vocab.json)": ("tokenizer.json", "vocab.json"),
    "image processor (preprocessor_config.json)": ("preprocessor_config.json", "processor_config.json"),
}
# What `hf download` fetches for CLIP score: the safetensors weights and configs, not the pickle/TF/Flax copies.
CLIP_DOWNLOAD = (
    "config.json",
    "model.safetensors",
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"
INCEPTION_FEATURES = 2048
HPS_REPO, HPS_FILE = "xswu/HPSv2", "HPS_v2.1_compressed.pt"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
METRICS = ("clip_score", "fid", "hps_v2")


class MetricUnavailableError(MissingPathError):
    """A metric's model, weights or package is not here; the message names what to download or install."""


@dataclasses.dataclass(frozen=True)
class ImageScores:
    """A metric with one value per image: the mean (the headline) and each image's value, in the order given."""

    mean: float
    per_image: list[float]


@dataclasses.dataclass(frozen=True)
class FidFeature:
    """What FID embeds images with: `module` (uint8 (N, 3, H, W) -> (N, d)), or when None torchmetrics'
    InceptionV3 built from the checked `weights` file."""

    module: Any = None
    weights: Path | None = None


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _batches(items: Sequence, size: int) -> Iterator[Sequence]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _check_pairs(images: Sequence, prompts: Sequence[str]) -> None:
    if not images or len(images) != len(prompts):
        raise ConfigError(f"{len(images)} images and {len(prompts)} prompts: give one prompt per image (at least one)")


# --- CLIP score ---------------------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    """The JSON object in `path`, or {} when it is missing or not JSON (the caller says what it expected)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def check_clip_dir(clip_dir: str | Path) -> Path:
    """The folder, if it holds a transformers CLIP model; checked by its files so that a mistake shows before any
    image is generated."""
    folder = Path(clip_dir)
    fetch = f"download one with: hf download {CLIP_REPO} {' '.join(CLIP_DOWNLOAD)} --local-dir {folder}"
    if not folder.is_dir():
        raise MetricUnavailableError(f"CLIP folder {folder}: no such folder; {fetch}")
    if _read_json(folder / "config.json").get("model_type") != "clip":
        raise MetricUnavailableError(
            f"{folder}: not a transformers CLIP folder (config.json, model_type clip); {fetch}"
        )
    missing = [what for what, names in CLIP_FILES.items() if not any((folder / n).is_file() for n in names)]
    if missing:
        raise MetricUnavailableError(f"CLIP folder {folder} has no {', '.join(missing)}; {fetch}")
    return folder


@lru_cache(maxsize=1)
def load_clip(clip_dir: str, device: str) -> tuple[Any, Any]:
    """(CLIPModel, CLIPProcessor) from a checked local folder, kept for the next model of the same evaluation."""
    from transformers import CLIPModel, CLIPProcessor

    folder = check_clip_dir(clip_dir)
    model = CLIPModel.from_pretrained(folder, local_files_only=True, use_safetensors=True)
    return model.eval().to(device), CLIPProcessor.from_pretrained(folder, local_files_only=True)


def clip_cosines(model: Any, processor: Any, images: Sequence[np.ndarray], prompts: Sequence[str]) -> list[float]:
    """Cosine of each image's CLIP embedding with its prompt's. Prompts longer than CLIP's context are
    truncated by the tokenizer, which keeps the end-of-text token the text embedding is pooled from."""
    import torch

    device = model.device
    max_length = model.config.text_config.max_position_embeddings
    text = processor.tokenizer(
        list(prompts), padding=True, truncation=True, max_length=max_length, return_tensors="pt"
    ).to(device)
    pixels = processor.image_processor(images=[np.asarray(i, np.uint8) for i in images], return_tensors="pt")
    with torch.no_grad():
        out = model(**text, pixel_values=pixels["pixel_values"].to(device))
    # CLIPModel normalises both embeddings.
    return (out.image_embeds * out.text_embeds).sum(-1).double().cpu().tolist()


def clip_score(
    images: Sequence[np.ndarray], prompts: Sequence[str], clip_dir: str | Path, batch_size: int = 32
) -> ImageScores:
    """CLIP score of uint8 (H, W, 3) images against their prompts (one each): 100 * max(cos, 0) per image,
    and the mean. torchmetrics clamps the mean instead of each image; the two differ only when a cosine
    is negative, which a real CLIP model does not give an image and its caption."""
    _check_pairs(images, prompts)
    model, processor = load_clip(str(check_clip_dir(clip_dir)), _device())
    cosines = [
        c
        for i in range(0, len(images), batch_size)
        for c in clip_cosines(model, processor, images[i : i + batch_size], prompts[i : i + batch_size])
    ]
    per_image = [100.0 * max(c, 0.0) for c in cosines]
    return ImageScores(float(np.mean(per_image)), per_image)


# --- FID ----------------------------------------------------------------------------------------


def reference_images(reference_dir: str | Path) -> list[Path]:
    """The image files (png, jpg, webp) of a reference folder, sorted; at least two, as FID needs a covariance."""
    folder = Path(reference_dir)
    if not folder.is_dir():
        raise MissingPathError(f"FID reference folder {folder}: no such folder")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if len(paths) < 2:
        raise DataError(
            f"FID reference folder {folder} has {len(paths)} images ({'/'.join(IMAGE_SUFFIXES)}): FID needs at "
            f"least 2 (a covariance), and thousands for a stable value"
        )
    return paths


def read_image(path: Path, width: int, height: int) -> np.ndarray:
    """A reference image as uint8 (height, width, 3): scaled so it covers the size, then centre-cropped (no
    distortion when aspect ratios differ)."""
    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: not a readable image ({e})") from e
    scale = max(width / rgb.width, height / rgb.height)
    size = (max(width, round(rgb.width * scale)), max(height, round(rgb.height * scale)))
    if size != rgb.size:
        rgb = rgb.resize(size, Image.Resampling.BICUBIC)
    left, top = (size[0] - width) // 2, (size[1] - height) // 2
    return np.asarray(rgb.crop((left, top, left + width, top + height)), np.uint8)


def inception_weights_path() -> Path:
    """Where torch-fidelity (through torch hub) looks for its InceptionV3 weights: <torch hub dir>/checkpoints."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE


def check_weights_only(path: Path) -> None:
    """Refuse a weights file that holds anything but tensors and containers. torch-fidelity loads its weights
    with weights_only=False (a full unpickle, which can run code); a file that loads with weights_only=True
    only rebuilds tensors when unpickled in full."""
    import torch

    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        raise DataError(
            f"{path}: torch.load(weights_only=True) refused it ({str(e).splitlines()[0]}); download it again "
            f"from {INCEPTION_URL}"
        ) from e


def resolve_fid_feature(inception_weights: str | Path | None = None) -> FidFeature:
    """The InceptionV3 FID runs on, once its package and a safe weights file are here (default: torch hub's
    cache, where torch-fidelity would download it)."""
    weights = Path(inception_weights) if inception_weights else inception_weights_path()
    if weights.is_file():
        check_weights_only(weights)
    missing = []
    if importlib.util.find_spec("torch_fidelity") is None:
        missing.append("pip install torch-fidelity")
    if not weights.is_file():
        missing.append(f"download {INCEPTION_URL} to {weights}")
    if missing:
        raise MetricUnavailableError(f"FID's InceptionV3 is not here: {'; and '.join(missing)}")
    return FidFeature(weights=weights)


def _as_batch(images: Sequence[np.ndarray]) -> Any:
    """uint8 (N, 3, H, W), what torchmetrics' InceptionV3 takes (it resizes to 299 itself)."""
    import torch

    return torch.from_numpy(np.stack([np.asarray(i, np.uint8) for i in images])).permute(0, 3, 1, 2).contiguous()


def fid_scores(
    generated: Mapping[str, Sequence[np.ndarray]],
    reference_dir: str | Path,
    feature: Any = None,
    inception_weights: str | Path | None = None,
    batch_size: int = 32,
) -> dict[str, float]:
    """FID of each model's uint8 (H, W, 3) images (all one size) against the reference folder, whose features
    are computed once. `feature`: a torch module (uint8 (N, 3, H, W) -> (N, d)) instead of InceptionV3."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    paths = reference_images(reference_dir)
    for name, images in generated.items():
        if len(images) < 2:
            raise DataError(f"{name}: FID needs at least 2 generated images (a covariance), got {len(images)}")
    spec = FidFeature(module=feature) if feature is not None else resolve_fid_feature(inception_weights)
    height, width = np.asarray(next(iter(generated.values()))[0]).shape[:2]
    metric = FrechetInceptionDistance(
        feature=INCEPTION_FEATURES if spec.module is None else spec.module,
        reset_real_features=False,
        input_img_size=(3, height, width),
        feature_extractor_weights_path=None if spec.weights is None else str(spec.weights),
    ).to(_device())
    for batch in _batches(paths, batch_size):
        metric.update(_as_batch([read_image(p, width, height) for p in batch]).to(metric.device), real=True)
    scores = {}
    for name, images in generated.items():
        for batch in _batches(images, batch_size):
            metric.update(_as_batch(batch).to(metric.device), real=False)
        scores[name] = float(metric.compute())
        metric.reset()  # The reference features stay (reset_real_features=False).
    return scores


def fid(
    images: Sequence[np.ndarray],
    reference_dir: str | Path,
    feature: Any = None,
    inception_weights: str | Path | None = None,
    batch_size: int = 32,
) -> float:
    """FID of one set of uint8 (H, W, 3) images against the reference folder (see `fid_scores`)."""
    return fid_scores({"images": images}, reference_dir, feature, inception_weights, batch_size)["images"]


# --- HPSv2 --------------------------------------------------------------------------------------


def check_hps(checkpoint: str | Path, allow_pickle: bool) -> Path:
    """The HPSv2 checkpoint, once it and the hpsv2 package are here and pickles are allowed."""
    path = Path(checkpoint)
    install = "pip install hpsv2" if importlib.util.find_spec("hpsv2") is None else None
    if not path.is_file():
        fetch = f"hf download {HPS_REPO} {HPS_FILE} --local-dir {path.parent}"
        raise MetricUnavailableError(
            f"HPSv2 checkpoint {path}: no such file; {fetch}" + (f"; and {install}" if install else "")
        )
    if not allow_pickle:
        raise ConfigError(
            f"{path}: HPSv2 checkpoints are Python pickles, which can run code when loaded. Pass --allow-pickle "
            f"to let the hpsv2 package load it with torch.load (only for a file you trust, e.g. from {HPS_REPO})"
        )
    if install:
        raise MetricUnavailableError(f"HPSv2 needs the hpsv2 package: {install}")
    return path


def hps_v2(
    images: Sequence[np.ndarray], prompts: Sequence[str], checkpoint: str | Path, allow_pickle: bool = False
) -> ImageScores:
    """HPSv2 of uint8 (H, W, 3) images against their prompts, by the hpsv2 package (which scores one prompt
    at a time and reloads the checkpoint each call, so images are grouped by prompt). hpsv2 also builds
    OpenCLIP ViT-H-14 (laion2B-s32B-b79K) from the Hugging Face cache, downloading it on first use."""
    _check_pairs(images, prompts)
    path = check_hps(checkpoint, allow_pickle)
    from hpsv2 import img_score

    per_image = [0.0] * len(images)
    for prompt in dict.fromkeys(prompts):
        indices = [i for i, p in enumerate(prompts) if p == prompt]
        pictures = [Image.fromarray(np.asarray(images[i], np.uint8)) for i in indices]
        for i, value in zip(indices, img_score.score(pictures, prompt, cp=str(path)), strict=True):
            per_image[i] = float(value)
    return ImageScores(float(np.mean(per_image)), per_image)


# --- all of them, for evaluate.py --------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RealMetricInputs:
    """What evaluate.py scores real models with (None: that metric is off)."""

    clip_dir: Path | None = None
    fid_reference: Path | None = None
    hps_checkpoint: Path | None = None
    allow_pickle: bool = False

    def names(self) -> tuple[str, ...]:
        """The metrics asked for, in METRICS order (the report's extra columns)."""
        given = (self.clip_dir, self.fid_reference, self.hps_checkpoint)
        return tuple(name for name, value in zip(METRICS, given) if value is not None)

    def check(self) -> None:
        """Every model, weight file and folder the metrics need, before any image is generated: whatever is
        missing, all of it in one error (one download after another would otherwise find them one by one)."""
        checks = []
        if self.clip_dir is not None:
            checks.append(lambda: check_clip_dir(self.clip_dir))
        if self.fid_reference is not None:
            checks += [lambda: reference_images(self.fid_reference), resolve_fid_feature]
        if self.hps_checkpoint is not None:
            checks.append(lambda: check_hps(self.hps_checkpoint, self.allow_pickle))
        errors = []
        for check in checks:
            try:
                check()
            except KoalaError as e:
                errors.append(e)
        if len(errors) == 1:
            raise errors[0]
        if errors:
            raise MetricUnavailableError(
                f"{len(errors)} problems: " + "; ".join(f"({i}) {e}" for i, e in enumerate(errors, 1))
            )


def score_models(
    generated: Mapping[str, Sequence[np.ndarray]], prompts: Sequence[str], inputs: RealMetricInputs, batch_size: int
) -> dict[str, dict[str, dict]]:
    """Per model: {"metrics": {name: value}, "per_item": {name: [value per image]}} for the metrics asked for;
    `prompts` has one entry per image."""
    out: dict[str, dict[str, dict]] = {name: {"metrics": {}, "per_item": {}} for name in generated}
    if inputs.fid_reference is not None:
        for name, value in fid_scores(generated, inputs.fid_reference, batch_size=batch_size).items():
            out[name]["metrics"]["fid"] = value
    for name, images in generated.items():
        scores = {}
        if inputs.clip_dir is not None:
            scores["clip_score"] = clip_score(images, prompts, inputs.clip_dir, batch_size)
        if inputs.hps_checkpoint is not None:
            scores["hps_v2"] = hps_v2(images, prompts, inputs.hps_checkpoint, inputs.allow_pickle)
        out[name]["metrics"].update({metric: s.mean for metric, s in scores.items()})
        out[name]["per_item"].update({metric: s.per_image for metric, s in scores.items()})
    return out
