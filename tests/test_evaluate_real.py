"""The metrics of real SDXL-family models (koala_jax.evaluation.real_metrics) on tiny random models: CLIP score
from a tiny CLIP folder, FID with a tiny conv feature extractor in place of InceptionV3, the one-line errors
that name what to download, and evaluate.py with a prompts file end to end. Nothing is downloaded."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

from koala_jax.cli import evaluate
from koala_jax.errors import ConfigError, DataError
from koala_jax.evaluation import detector, real_metrics
from koala_jax.evaluation.real_metrics import MetricUnavailableError
from koala_jax.pipelines.tiny import tiny_clip_vocab

from tests.conftest import build_teacher_pipeline

SIDE = 32


class TinyFeature(torch.nn.Module):
    """A random conv feature extractor standing in for InceptionV3: uint8 (N, 3, H, W) -> (N, 8)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 4, stride=4)
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in self.conv.parameters():
                p.copy_(torch.randn(p.shape, generator=generator))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x.float() / 255)).mean((2, 3))


def random_images(seed: int, n: int, low: int = 0, high: int = 256) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(low, high, (SIDE, SIDE, 3), dtype=np.uint8) for _ in range(n)]


def save_images(folder, images) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:02d}.png")


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny random transformers CLIP folder (safetensors, byte-level tokenizer, 32 px image processor)."""
    folder = tmp_path_factory.mktemp("clip")
    vocab = tiny_clip_vocab()
    n = len(vocab)
    text = dict(
        vocab_size=n,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=n - 2,
        eos_token_id=n - 1,
        pad_token_id=n - 1,
    )
    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=SIDE, patch_size=8
    )
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(folder)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], pad_token="<|endoftext|>", model_max_length=77)
    images = CLIPImageProcessor(size={"shortest_edge": SIDE}, crop_size={"height": SIDE, "width": SIDE})
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def test_clip_score_is_the_clamped_cosine_of_the_models_embeddings(clip_dir):
    images = random_images(0, 6)
    prompts = ["a red circle", "a blue square", "a koala", "a red circle", "x", "a very long prompt " * 30]
    scores = real_metrics.clip_score(images, prompts, clip_dir, batch_size=4)
    # The same computation by hand from the model's projected features (get_*_features, not forward).
    model = CLIPModel.from_pretrained(clip_dir).eval()
    processor = CLIPProcessor.from_pretrained(clip_dir)
    text = processor.tokenizer(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        image_features = model.get_image_features(
            processor.image_processor(images, return_tensors="pt")["pixel_values"]
        )
        text_features = model.get_text_features(**text)
    image_features, text_features = (
        f.pooler_output if hasattr(f, "pooler_output") else f for f in (image_features, text_features)
    )
    cos = torch.nn.functional.cosine_similarity(image_features, text_features).numpy()
    print(f"cosines {np.round(cos, 3)}, scores {np.round(scores.per_image, 2)}")
    np.testing.assert_allclose(scores.per_image, 100 * np.maximum(cos, 0), atol=1e-4)
    assert scores.mean == pytest.approx(np.mean(scores.per_image)) and all(0 <= s <= 100 for s in scores.per_image)
    again = real_metrics.clip_score(images[:1] * 2, prompts[:1] * 2, clip_dir)
    assert again.per_image[0] == pytest.approx(again.per_image[1]) == pytest.approx(scores.per_image[0], abs=1e-4)


@pytest.mark.parametrize("make", ["missing", "not_clip", "no_weights"])
def test_a_missing_or_wrong_clip_folder_names_what_to_download(tmp_path, clip_dir, make):
    folder = tmp_path / "clip"
    if make != "missing":
        folder.mkdir()
        model_type = "t5" if make == "not_clip" else "clip"
        (folder / "config.json").write_text(json.dumps({"model_type": model_type}))
    with pytest.raises(MetricUnavailableError) as error:
        real_metrics.clip_score(random_images(0, 1), ["a"], folder)
    assert f"hf download {real_metrics.CLIP_REPO}" in one_line(error) and str(folder) in str(error.value)


def test_fid_is_zero_for_the_same_images_and_grows_with_the_difference(tmp_path):
    images = random_images(0, 16)
    save_images(tmp_path / "ref", images)
    near = [
        np.clip(i.astype(int) + np.random.default_rng(1).integers(-8, 9, i.shape), 0, 255).astype(np.uint8)
        for i in images
    ]
    scores = real_metrics.fid_scores(
        {"same": images, "near": near, "far": random_images(2, 16, low=150)}, tmp_path / "ref", feature=TinyFeature()
    )
    print(scores)
    assert abs(scores["same"]) < 1e-9 and 0 < scores["near"] < scores["far"]
    single = real_metrics.fid(near, tmp_path / "ref", feature=TinyFeature())
    assert single == pytest.approx(scores["near"], rel=1e-6)


def test_reference_images_are_scaled_and_cropped_to_the_generated_size(tmp_path):
    wide = np.zeros((40, 80, 3), np.uint8)
    wide[:, 20:60] = 255  # The centre square is white, the sides black.
    Image.fromarray(wide).save(tmp_path / "wide.webp", lossless=True)
    image = real_metrics.read_image(tmp_path / "wide.webp", SIDE, SIDE)
    assert image.shape == (SIDE, SIDE, 3) and image[2:-2, 2:-2].min() > 200


@pytest.mark.parametrize(
    "reference, generated, message",
    [
        (["good", "good", "corrupt"], 4, "corrupt.png: not a readable image"),
        (["good"], 4, "has 1 images"),
        (["good", "good"], 1, "at least 2 generated images"),
    ],
)
def test_fid_input_mistakes_are_one_line(tmp_path, reference, generated, message):
    folder = tmp_path / "ref"
    save_images(folder, random_images(0, reference.count("good")))
    if "corrupt" in reference:
        (folder / "corrupt.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError) as error:
        real_metrics.fid(random_images(1, generated), folder, feature=TinyFeature())
    assert message in one_line(error)


def test_missing_inception_weights_name_the_file_and_where_it_goes(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    expected = tmp_path / "hub" / "checkpoints" / real_metrics.INCEPTION_FILE
    assert real_metrics.inception_weights_path() == expected
    with pytest.raises(MetricUnavailableError) as error:
        real_metrics.resolve_fid_feature()
    assert f"download {real_metrics.INCEPTION_URL} to {expected}" in one_line(error)


def test_inception_weights_that_are_not_plain_tensors_are_refused(tmp_path):
    weights = tmp_path / real_metrics.INCEPTION_FILE
    torch.save({"fc.weight": torch.zeros(2), "hook": print}, weights)  # A global beyond tensors.
    with pytest.raises(DataError) as error:
        real_metrics.resolve_fid_feature(weights)
    assert "weights_only=True) refused it" in one_line(error) and real_metrics.INCEPTION_URL in str(error.value)


def test_hpsv2_errors_name_the_package_the_checkpoint_and_the_pickle_flag(tmp_path):
    checkpoint = tmp_path / real_metrics.HPS_FILE
    with pytest.raises(MetricUnavailableError) as error:
        real_metrics.hps_v2(random_images(0, 1), ["a"], checkpoint, allow_pickle=True)
    assert f"hf download xswu/HPSv2 {real_metrics.HPS_FILE}" in one_line(error)
    checkpoint.write_bytes(b"a pickle")
    with pytest.raises(ConfigError) as error:
        real_metrics.hps_v2(random_images(0, 1), ["a"], checkpoint)
    assert "Python pickles" in one_line(error) and "--allow-pickle" in str(error.value)
    if real_metrics.importlib.util.find_spec("hpsv2") is None:
        with pytest.raises(MetricUnavailableError) as error:
            real_metrics.hps_v2(random_images(0, 1), ["a"], checkpoint, allow_pickle=True)
        assert "pip install hpsv2" in one_line(error)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    folder = tmp_path_factory.mktemp("real") / "teacher"
    build_teacher_pipeline(folder)
    return folder


def test_evaluate_scores_a_prompts_file_with_clip_and_fid(teacher, clip_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(
        real_metrics, "resolve_fid_feature", lambda weights=None: real_metrics.FidFeature(TinyFeature())
    )
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\ufeffa koala reading a newspaper\n\n  a red circle  \n", encoding="utf-8")
    save_images(tmp_path / "ref", random_images(0, 3))
    argv = ["--model", f"teacher={teacher}", "--model", f"copy={teacher}", "--prompts-file", str(prompts)]
    argv += ["--clip", str(clip_dir), "--fid-reference", str(tmp_path / "ref"), "--out", str(tmp_path / "out")]
    argv += "--seeds 0,1 --steps 2 --backend diffusers".split()
    assert evaluate.main(argv) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [i["prompt"] for i in report["items"]] == ["a koala reading a newspaper"] * 2 + ["a red circle"] * 2
    teacher_entry, copy = report["models"]["teacher"], report["models"]["copy"]
    print(teacher_entry["metrics"], copy["agreement"])
    assert "accuracy" not in teacher_entry and copy["agreement"]["psnr_db"] == float("inf")
    assert teacher_entry["metrics"] == copy["metrics"] and len(copy["per_item"]["clip_score"]) == 4
    assert 0 <= copy["metrics"]["clip_score"] <= 100 and copy["metrics"]["fid"] > 0
    table = (tmp_path / "out" / "report.md").read_text()
    assert table.startswith("| model | psnr_db | image_mse | latent_mse | clip_score | fid |")
    assert "| copy |" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--prompts-file", "{tmp}/none.txt"], "--prompts-file {tmp}/none.txt: no such file"),
        (["--prompts-file", "{tmp}/latin1.txt"], "not UTF-8 text"),
        (["--prompts-file", "{tmp}/prompts.txt", "--prompts", "world-rich"], "not both"),
        (["--clip", "{tmp}/clip"], "hf download openai/clip-vit-large-patch14"),
        (["--fid-reference", "{tmp}"], "has 0 images"),
        (["--hps-checkpoint", "{tmp}/hps.pt"], "xswu/HPSv2"),
    ],
)
def test_real_metric_mistakes_are_one_line_before_any_model_loads(
    teacher, tmp_path, monkeypatch, capsys, extra, message
):
    monkeypatch.setattr(evaluate, "load_generator", lambda *a, **k: pytest.fail("a model was loaded"))
    (tmp_path / "prompts.txt").write_text("a koala\n")
    (tmp_path / "latin1.txt").write_bytes("un koala à lunettes\n".encode("latin-1"))
    argv = ["--model", f"t={teacher}", *[a.format(tmp=tmp_path) for a in extra], "--out", str(tmp_path / "out")]
    assert evaluate.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message.format(tmp=tmp_path) in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_a_world_set_keeps_its_accuracy_and_gains_the_clip_column(teacher, clip_dir, tmp_path, monkeypatch):
    # The report's plumbing only: the detector (slow on random images) has its own tests.
    monkeypatch.setattr(detector, "accuracy", lambda images, specs: {"all": 0.0, "n": float(len(specs))})
    argv = ["--model", f"teacher={teacher}", "--clip", str(clip_dir), "--out", str(tmp_path)]
    assert evaluate.main(argv + "--prompts world-single --seeds 0 --steps 2 --backend diffusers".split()) == 0
    entry = json.loads((tmp_path / "report.json").read_text())["models"]["teacher"]
    assert entry["accuracy"]["n"] == len(entry["per_item"]["clip_score"]) and "clip_score" in entry["metrics"]
    header = (tmp_path / "report.md").read_text().splitlines()[0]
    assert header.startswith("| model | colour |") and header.endswith("| latent_mse | clip_score |")
