"""Model cards (README.md in the Hugging Face form) for every export, and publishing to the hub.

The card says what a person or the hub needs to use the weights: YAML front matter (library_name,
tags, base_model), the architecture per stage with the exact parameter count, the teacher, the training
steps and the student config when the export comes from a training run, evaluation numbers when known,
and clearly marked placeholders for what only the author can fill in (evaluation, license).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from koala_jax.errors import ConvertError
from koala_jax.files import write_text
from koala_jax.models import UNetConfig, param_count
from koala_jax.models.init import describe

CARD_NAME = "README.md"
TODO = "**TODO**"
TAGS = ("text-to-image", "stable-diffusion-xl", "koala", "knowledge-distillation", "koala-jax")


@dataclasses.dataclass
class CardFacts:
    """What a card reports. `kind`: 'unet' (diffusers U-Net folder), 'pipeline' (StableDiffusionXLPipeline
    folder), 'single-file-unet' or 'single-file-pipeline' (original-format .safetensors)."""

    title: str
    config: UNetConfig
    kind: str
    dtype: str
    source: str
    teacher: str | None = None
    base_model: str | None = None  # A hub id for the front matter.
    training: dict | None = None  # step, ema, saved_steps of a training run.
    student: dict | None = None  # how a student was derived (variant or spec, tensors from the teacher).
    evaluation: dict[str, float] | None = None


def single_file_card_path(path: Path) -> Path:
    """Where the card of a single file goes: beside it, `<stem>.README.md`."""
    return path.with_name(f"{path.stem}.{CARD_NAME}")


def render(facts: CardFacts) -> str:
    """The README.md text of an export."""
    front = ["---", "library_name: diffusers", "tags:", *(f"- {t}" for t in TAGS)]
    front.append(f"base_model: {facts.base_model}" if facts.base_model else "# base_model: TODO (the teacher's hub id)")
    front += ["license: other  # TODO: the license of these weights (and of the teacher's)", "---", ""]
    return "\n".join(front + _body(facts)) + "\n"


def _body(facts: CardFacts) -> list[str]:
    count = param_count(facts.config)
    lines = [
        f"# {facts.title}",
        "",
        f"An SDXL-family U-Net ({count:,} parameters) exported by koala-jax as a {_KINDS[facts.kind]} in "
        f"{facts.dtype}, from `{facts.source}`.",
        "",
        "## Architecture",
        "",
        "```",
        *describe(facts.config),
        "```",
        "",
        "## Teacher",
        "",
        f"`{facts.teacher}`" if facts.teacher else f"{TODO}: not recorded by the source; name the teacher here.",
        "",
    ]
    if facts.student:
        lines += ["## Student initialisation", "", *(f"- {k}: {v}" for k, v in facts.student.items()), ""]
    lines += ["## Training", ""]
    if facts.training:
        lines += [f"- {k}: {v}" for k, v in facts.training.items()]
        if not facts.kind.startswith("single-file"):  # A single file's usage shows the config.
            lines += ["", "Student config (diffusers `config.json`):", "", "```json"]
            lines += [json.dumps(facts.config.to_diffusers(), indent=2), "```"]
        lines += [""]
    else:
        lines += ["Not exported from a training run (no training steps recorded).", ""]
    lines += ["## Evaluation", ""]
    if facts.evaluation:
        lines += ["| metric | value |", "|---|---|", *(f"| {k} | {v:g} |" for k, v in facts.evaluation.items())]
    else:
        lines += [f"<!-- EVALUATION PLACEHOLDER -->\n{TODO}: not evaluated yet (e.g. HPSv2, CLIP score, FID)."]
    lines += ["", "## Usage", "", *_usage(facts), "", "## License", "", f"{TODO}: set the license."]
    return lines


_KINDS = {
    "unet": "diffusers U-Net folder",
    "pipeline": "diffusers StableDiffusionXLPipeline folder",
    "single-file-unet": "single original-format (SGM) .safetensors file, U-Net only",
    "single-file-pipeline": "single original-format (SGM) .safetensors file with VAE and text encoders",
}


# Placeholders of the usage snippets, for the reader to fill in (tests/test_convert_clients.py runs every snippet
# with them filled in, so the card only shows what works).
REPO = "<this repo>"  # this export: a hub id or its local folder
PIPELINE = "<SDXL pipeline>"  # the teacher's StableDiffusionXLPipeline: a hub id or a local folder
FILE = "<this file>"
CONFIG_FOLDER = "<folder with this config.json>"
PIPELINE_CONFIG = "<pipeline folder of this model>"


def _usage(facts: CardFacts) -> list[str]:
    """What loads this export, as checked (docs/convert.md, "Which client reads what")."""
    if facts.kind.startswith("single-file"):
        return _single_file_usage(facts)
    load = (
        f'pipe = StableDiffusionXLPipeline.from_pretrained("{REPO}")'
        if facts.kind == "pipeline"
        else f'pipe = StableDiffusionXLPipeline.from_pretrained("{PIPELINE}", unet=UNet2DConditionModel.'
        f'from_pretrained("{REPO}"))'
    )
    return ["```python", "from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel", load, "```"]


def _single_file_usage(facts: CardFacts) -> list[str]:
    """diffusers guesses SDXL-Base from a single file's keys, so a KOALA file loads only with its own config (a
    folder holding the config.json below, or for a whole-pipeline file, a pipeline folder with it in unet/)."""
    whole = facts.kind == "single-file-pipeline"
    comfy = (
        "ComfyUI: put the file in `models/checkpoints` (Load Checkpoint)"
        if whole
        else "ComfyUI: put the file in `models/unet`"
    )
    if whole:
        config_help = (
            f"`{PIPELINE_CONFIG}`: a diffusers pipeline folder of this model (`convert_weights.py to-diffusers "
            "--pipeline`), or the teacher's pipeline folder with its `unet/config.json` replaced by the one below"
        )
        snippet = [
            "from diffusers import StableDiffusionXLPipeline",
            f'pipe = StableDiffusionXLPipeline.from_single_file("{FILE}", config="{PIPELINE_CONFIG}")',
        ]
    else:
        config_help = f"`{CONFIG_FOLDER}`: a folder holding the config.json below"
        snippet = [
            "from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel",
            f'unet = UNet2DConditionModel.from_single_file("{FILE}", config="{CONFIG_FOLDER}")',
            f'pipe = StableDiffusionXLPipeline.from_pretrained("{PIPELINE}", unet=unet)',
        ]
    return [
        f"{comfy}; it recognises full-size KOALA-700M and KOALA-1B by their keys (checked with ComfyUI 0.3.64), "
        "other architectures only if it lists them. A1111 / Forge: not checked.",
        "",
        f"diffusers cannot tell this U-Net from SDXL's by its keys, so it needs this model's config ({config_help}).",
        "",
        "```python",
        *snippet,
        "```",
        "",
        "This U-Net's `config.json`:",
        "",
        "```json",
        json.dumps(facts.config.to_diffusers(), indent=2),
        "```",
    ]


def write_card(path: Path, facts: CardFacts) -> Path:
    """Write the card to `path` whole or not at all (`files.write_text`); returns `path`."""
    write_text(path, render(facts))
    return path


def push_to_hub(repo_id: str, folder: Path | None = None, files: dict[str, Path] | None = None) -> str:
    """Upload an exported `folder`, or `files` ({path in the repo: local file}), to the hub model repo
    `repo_id` (created if needed); returns the repo URL. Hub errors (no token, no network, no rights)
    are one ConvertError."""
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError

    try:
        url = huggingface_hub.create_repo(repo_id, repo_type="model", exist_ok=True)
        if folder is not None:
            huggingface_hub.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model")
        for in_repo, local in (files or {}).items():
            huggingface_hub.upload_file(
                path_or_fileobj=str(local), path_in_repo=in_repo, repo_id=repo_id, repo_type="model"
            )
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise ConvertError(f"--push-to-hub {repo_id}: upload failed: {e}") from e
    return str(url)
