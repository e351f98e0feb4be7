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
        lines += ["", "Student config (diffusers `config.json`):", "", "```json"]
        lines += [json.dumps(facts.config.to_diffusers(), indent=2), "```", ""]
    else:
        lines += ["Not exported from a training run (no training steps recorded).", ""]
    lines += ["## Evaluation", ""]
    if facts.evaluation:
        lines += ["| metric | value |", "|---|---|", *(f"| {k} | {v:g} |" for k, v in facts.evaluation.items())]
    else:
        lines += [f"<!-- EVALUATION PLACEHOLDER -->\n{TODO}: not evaluated yet (e.g. HPSv2, CLIP score, FID)."]
    lines += ["", "## Usage", "", *_usage(facts.kind), "", "## License", "", f"{TODO}: set the license."]
    return lines


_KINDS = {
    "unet": "diffusers U-Net folder",
    "pipeline": "diffusers StableDiffusionXLPipeline folder",
    "single-file-unet": "single original-format (SGM) .safetensors file, U-Net only",
    "single-file-pipeline": "single original-format (SGM) .safetensors file with VAE and text encoders",
}


def _usage(kind: str) -> list[str]:
    if kind.startswith("single-file"):
        where = "models/checkpoints" if kind == "single-file-pipeline" else "models/unet"
        return [
            f"ComfyUI: put the file in `{where}`; A1111 / Forge load it as a checkpoint. diffusers:",
            "",
            "```python",
            "from diffusers import StableDiffusionXLPipeline",
            'pipe = StableDiffusionXLPipeline.from_single_file("model.safetensors", config="<SDXL pipeline folder>")',
            "```",
        ]
    load = (
        'pipe = StableDiffusionXLPipeline.from_pretrained("<this repo>")'
        if kind == "pipeline"
        else 'pipe = StableDiffusionXLPipeline.from_pretrained("<SDXL pipeline>", unet=UNet2DConditionModel.'
        'from_pretrained("<this repo>"))'
    )
    return ["```python", "from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel", load, "```"]


def write_card(path: Path, facts: CardFacts) -> Path:
    """Write the card to `path` (through a temporary name); returns `path`."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(render(facts))
    tmp.replace(path)
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
