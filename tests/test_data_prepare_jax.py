"""prepare_data.py's JAX backend: the same records as the PyTorch backend (within float tolerance), the shards
split by JAX process, and its command-line checks."""

from __future__ import annotations

import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from diffusers import AutoencoderKL
from PIL import Image
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from koala_jax.cli import prepare as prepare_data
from koala_jax.data import ingest, load_null_embeddings, prepare, schema
from koala_jax.pipelines.tiny import save_tiny_sdxl_components

from tests.conftest import randomize_, rel_err

RESOLUTION = 32
CAPTIONS = ["a wide red square", "two tall green trees", "noise", "a cat on a sofa at night", "blue sky"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> str:
    """The tiny SDXL components with every weight re-drawn at a sensible scale (CLIP's init leaves the text
    encoders' outputs nearly independent of the caption, which would make equal records easy)."""
    folder = str(tmp_path_factory.mktemp("teacher"))
    save_tiny_sdxl_components(folder, seed=0)
    for seed, (name, cls) in enumerate(
        (("vae", AutoencoderKL), ("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection))
    ):
        randomize_(cls.from_pretrained(os.path.join(folder, name)), seed=seed).save_pretrained(
            os.path.join(folder, name)
        )
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("images")
    for i, caption in enumerate(CAPTIONS):
        pixels = np.random.default_rng(i).integers(0, 256, (32 + 8 * i, 48 - 4 * i, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(caption)
    return str(folder)


def _records(data_dir: str) -> dict[str, dict]:
    source = tfds.builder_from_directory(data_dir).as_data_source()["train"]
    return {source[i]["caption"].decode(): source[i] for i in range(len(source))}


def test_backends_write_the_same_records(tmp_path, teacher, images):
    collection = ingest.open_collection(images)
    for backend in prepare.BACKENDS:
        config = prepare.PrepareConfig(
            output_dir=str(tmp_path / backend),
            teacher=teacher,
            resolution=RESOLUTION,
            records_per_shard=3,
            batch_size=2,
            backend=backend,
        )
        assert prepare.prepare_dataset(collection, config).kept == len(CAPTIONS)
    torch_records, jax_records = _records(str(tmp_path / "torch")), _records(str(tmp_path / "jax"))
    assert sorted(torch_records) == sorted(jax_records) == sorted(CAPTIONS)
    worst = {}
    for caption, want in torch_records.items():
        got = jax_records[caption]
        for key in ("latents", "prompt_embeds", "pooled_prompt_embeds"):
            assert got[key].dtype == want[key].dtype == np.float16 and got[key].shape == want[key].shape
            worst[key] = max(worst.get(key, 0.0), rel_err(got[key], want[key]))
        for key in ("original_size", "crop_top_left", "target_size"):
            np.testing.assert_array_equal(got[key], want[key])
    null_torch, null_jax = (load_null_embeddings(str(tmp_path / backend)) for backend in prepare.BACKENDS)
    worst.update({f"null {key}": rel_err(null_jax[key], value) for key, value in null_torch.items()})
    print(f"jax vs torch records, max error relative to the largest value (float16 storage): {worst}")
    assert max(worst.values()) <= 2e-3  # float16 keeps ~3 decimal digits


def test_jax_processes_split_the_shards(tmp_path, teacher, images, monkeypatch, capsys):
    """Without --task-index/--task-count, JAX process i of n writes shards k with k % n == i."""
    import jax

    monkeypatch.setattr(jax, "process_index", lambda: 1)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    output = tmp_path / "out"
    argv = ["--input", images, "--teacher", teacher, "--output-dir", str(output), "--resolution", str(RESOLUTION)]
    assert prepare_data.main([*argv, "--records-per-shard", "1", "--backend", "jax"]) == 0
    assert "this task's shards are done" in capsys.readouterr().out
    written = sorted(name for name in os.listdir(output) if name.startswith(schema.DATASET_NAME))
    assert written == [schema.shard_filename(k, len(CAPTIONS)) for k in (1, 3)]


def test_backend_flags_are_checked(tmp_path, teacher, images, capsys):
    argv = ["--input", images, "--teacher", teacher, "--output-dir", str(tmp_path / "out")]
    for flags, message in (
        (["--backend", "jax", "--device", "cuda"], "--device and --torch-threads are for --backend torch"),
        (["--distributed"], "--distributed is for --backend jax"),
    ):
        assert prepare_data.main(argv + flags) == 1
        assert message in capsys.readouterr().err
    with pytest.raises(ValueError, match="backend 'tpu'"):
        prepare.PrepareConfig(output_dir="x", teacher="y", backend="tpu")
