"""Ingest and preparation: every input form, filters, skip counts, encodings, resume.

Each test writes its own small image-caption collection (real PNG/JPEG files plus a
few broken ones) and encodes it with a tiny random SDXL teacher built locally.
"""

from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import pandas as pd
import pytest
import tensorflow_datasets as tfds
import torch
from array_record.python import array_record_module
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline
from PIL import Image
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from koala_jax.cli import prepare as prepare_data
from koala_jax.data import (
    images,
    ingest,
    load_null_embeddings,
    open_source,
    prepare,
    schema,
)
from koala_jax.pipelines.tiny import (
    TINY_CROSS_ATTENTION_DIM,
    TINY_POOLED_DIM,
    save_tiny_sdxl_components,
)

RESOLUTION = 32
FILTERS = ingest.Filters(min_side=24)


def _encode(array: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def _random_image(seed: int, height: int, width: int, fmt: str) -> bytes:
    rng = np.random.default_rng(seed)
    return _encode(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), fmt)


# (name, image bytes, caption): 6 good records, 2 corrupt images, 1 empty caption, 1 too small.
GOOD = [
    ("a", _random_image(0, 40, 60, "PNG"), "a wide random picture with many colorful pixels"),
    ("b", _random_image(1, 64, 32, "JPEG"), "a tall noisy photo"),
    ("c", _random_image(2, 32, 32, "PNG"), "square noise"),
    ("d", _random_image(3, 48, 50, "JPEG"), "almost square noise, JPEG compressed"),
    ("e", _random_image(4, 100, 30, "PNG"), "a very tall strip of random colors"),
    ("f", _random_image(5, 33, 90, "PNG"), "a panorama of static"),
]
_TRUNCATED = _random_image(6, 40, 40, "PNG")
BAD = [
    ("garbage", b"this is not an image", "a broken file"),
    ("truncated", _TRUNCATED[: len(_TRUNCATED) // 2], "a cut-off png"),
    ("empty", _random_image(7, 40, 40, "PNG"), "   "),
    ("small", _random_image(8, 20, 40, "PNG"), "too small to keep"),
]
RECORDS = GOOD + BAD
EXPECTED = {
    "kept": 6,
    "filtered": {"too_small": 1},
    "unreadable": {"corrupt_image": 2, "empty_caption": 1},
}


def _suffix(data: bytes) -> str:
    return ".jpg" if data.startswith(b"\xff\xd8") else ".png"


def write_folder(root: str) -> str:
    """Images with .txt captions, one .json caption, in a nested folder."""
    for i, (name, data, caption) in enumerate(RECORDS):
        folder = os.path.join(root, "images", "sub" if i % 2 else "")
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, name + _suffix(data)), "wb") as f:
            f.write(data)
        if name == "a":
            with open(os.path.join(folder, "a.json"), "w") as f:
                json.dump({"caption": caption, "url": "unused"}, f)
        else:
            with open(os.path.join(folder, name + ".txt"), "w") as f:
                f.write(caption)
    return os.path.join(root, "images")


def write_table(root: str) -> str:
    """A parquet table of relative paths, absolute paths and already-downloaded URLs."""
    os.makedirs(os.path.join(root, "files"))
    rows = []
    for i, (name, data, caption) in enumerate(RECORDS):
        filename = name + _suffix(data)
        kind = ["relative", "absolute", "url"][i % 3]
        # A URL's download sits in the image root (the table's folder) under its file name.
        path = os.path.join(root, filename) if kind == "url" else os.path.join(root, "files", filename)
        with open(path, "wb") as f:
            f.write(data)
        cell = {
            "relative": f"files/{filename}",
            "absolute": path,
            "url": f"https://example.com/x/{filename}",
        }
        rows.append({"image": cell[kind], "caption": caption})
    table = os.path.join(root, "pairs.parquet")
    pd.DataFrame(rows).to_parquet(table)
    return table


def _add_tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_webdataset(root: str) -> str:
    """Two good shards (one caption as .json) and one truncated shard."""
    os.makedirs(os.path.join(root, "shards"))
    halves = [RECORDS[: len(RECORDS) // 2], RECORDS[len(RECORDS) // 2 :]]
    for shard, records in enumerate(halves + [GOOD[:2]]):
        path = os.path.join(root, "shards", f"shard-{shard:04d}.tar")
        with tarfile.open(path, "w") as tar:
            for name, data, caption in records:
                _add_tar_member(tar, f"s{shard}/{name}{_suffix(data)}", data)
                text = json.dumps({"caption": caption}) if name == "b" else caption
                _add_tar_member(tar, f"s{shard}/{name}." + ("json" if name == "b" else "txt"), text.encode())
    truncated = os.path.join(root, "shards", "shard-0002.tar")
    with open(truncated, "r+b") as f:
        f.truncate(os.path.getsize(truncated) // 3)
    return os.path.join(root, "shards")


def write_tfds(root: str) -> str:
    """A tfds dataset folder (ArrayRecord + metadata), the way tfds documents external data."""
    features = tfds.features.FeaturesDict(
        {"image": tfds.features.Image(shape=(None, None, 3)), "caption": tfds.features.Text()}
    )
    data_dir = os.path.join(root, "captions", "1.0.0")
    os.makedirs(data_dir)
    writer = array_record_module.ArrayRecordWriter(
        os.path.join(data_dir, "captions-train.array_record-00000-of-00001"), "group_size:1"
    )
    for _, data, caption in RECORDS:  # encoded bytes go in as they are, corrupt ones too
        writer.write(features.serialize_example({"image": io.BytesIO(data), "caption": caption}))
    writer.close()
    template = tfds.core.ShardedFileTemplate(
        data_dir=data_dir,
        template="{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}",
        dataset_name="captions",
        split="train",
        filetype_suffix="array_record",
    )
    split = tfds.core.SplitInfo(name="train", shard_lengths=[len(RECORDS)], num_bytes=0, filename_template=template)
    tfds.folder_dataset.write_metadata(
        data_dir=data_dir,
        features=features,
        split_infos=[split],
        filename_template=template,
        check_data=False,
    )
    return data_dir


WRITERS = {
    "folder": write_folder,
    "table": write_table,
    "webdataset": write_webdataset,
    "tfds": write_tfds,
}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The tiny models' ops take microseconds; on a busy 2-core machine OpenMP's spinning
    threads make each one take milliseconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> str:
    folder = str(tmp_path_factory.mktemp("teacher"))
    save_tiny_sdxl_components(folder, seed=0)
    return folder


@pytest.fixture(scope="module")
def sdxl_components(teacher) -> dict:
    """The tiny teacher loaded by diffusers itself: the reference for our encodings."""
    return {
        "vae": AutoencoderKL.from_pretrained(os.path.join(teacher, "vae")),
        "text_encoder": CLIPTextModel.from_pretrained(os.path.join(teacher, "text_encoder")),
        "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(os.path.join(teacher, "text_encoder_2")),
        "tokenizer": CLIPTokenizer.from_pretrained(os.path.join(teacher, "tokenizer")),
        "tokenizer_2": CLIPTokenizer.from_pretrained(os.path.join(teacher, "tokenizer_2")),
        "scheduler": EulerDiscreteScheduler.from_pretrained(os.path.join(teacher, "scheduler")),
        "unet": None,
    }


def _config(output_dir: str, teacher: str, **overrides) -> prepare.PrepareConfig:
    settings = dict(
        output_dir=output_dir,
        teacher=teacher,
        resolution=RESOLUTION,
        filters=FILTERS,
        records_per_shard=4,
        batch_size=3,
        num_threads=2,
    )
    settings.update(overrides)
    return prepare.PrepareConfig(**settings)


def _read_all(data_dir: str) -> dict[str, dict]:
    """Every record through tfds's own reader, keyed by caption."""
    source = tfds.builder_from_directory(data_dir).as_data_source()["train"]
    return {source[i]["caption"].decode(): source[i] for i in range(len(source))}


# ---------------------------------------------------------------- ingest only


@pytest.mark.parametrize("kind", sorted(WRITERS))
def test_ingest_counts_every_record_in_each_form(tmp_path, kind):
    path = WRITERS[kind](str(tmp_path))
    collection = ingest.open_collection(path)  # "auto" must recognise each form
    report = ingest.IngestReport()
    kept = {}
    for index in range(len(collection)):
        try:
            example = ingest.load_example(collection, index, FILTERS, RESOLUTION)
        except ingest.SkipRecord as skip:
            report.count_skip(skip)
        else:
            report.kept += 1
            kept[example.caption] = example
    assert report.to_dict()["kept"] == EXPECTED["kept"]
    assert dict(report.filtered) == EXPECTED["filtered"]
    assert dict(report.unreadable) == EXPECTED["unreadable"]
    assert sorted(kept) == sorted(caption for _, _, caption in GOOD)
    assert len(collection.skipped_shards) == (1 if kind == "webdataset" else 0)
    wide = kept["a wide random picture with many colorful pixels"]
    assert wide.pixels.shape == (3, RESOLUTION, RESOLUTION) and wide.pixels.dtype == np.float32
    assert (wide.original_size, wide.crop_top_left) == ((40, 60), (0, 8))


def test_tfds_input_by_name(tmp_path):
    write_tfds(str(tmp_path))
    options = ingest.InputOptions(tfds_data_dir=str(tmp_path))
    collection = ingest.open_collection("captions", options=options)
    assert len(collection) == len(RECORDS)
    assert collection.load(0).caption == RECORDS[0][2]


def test_filters_name_their_reason():
    filters = ingest.Filters(min_side=10, min_aspect=0.5, max_aspect=2.0, min_caption_words=3)
    filters.check(20, 20, "three whole words", "ok")
    cases = [
        ((5, 20, "three whole words"), "too_small"),
        ((50, 20, "three whole words"), "aspect_ratio"),
        ((20, 50, "three whole words"), "aspect_ratio"),
        ((20, 20, "two words"), "short_caption"),
    ]
    for (width, height, caption), reason in cases:
        with pytest.raises(ingest.Filtered) as caught:
            filters.check(width, height, caption, "where.png")
        assert caught.value.reason == reason and "where.png" in str(caught.value)


def test_missing_files_and_captions_are_unreadable(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "x.png").write_bytes(GOOD[0][1])
    (tmp_path / "img" / "y.png").write_bytes(GOOD[0][1])
    (tmp_path / "img" / "y.json").write_text('{"text": "wrong key"}')
    folder = ingest.open_collection(str(tmp_path / "img"))
    reasons = []
    for index in range(len(folder)):
        with pytest.raises(ingest.Unreadable) as caught:
            folder.load(index)
        reasons.append(caught.value.reason)
    assert reasons == ["missing_caption", "bad_caption"]
    table = tmp_path / "t.csv"
    pd.DataFrame({"image": ["nope.png", "img/x.png"], "caption": ["gone", None]}).to_csv(table)
    rows = ingest.open_collection(str(table))
    for index, reason in enumerate(["missing_image", "missing_caption"]):
        with pytest.raises(ingest.Unreadable) as caught:
            rows.load(index)
        assert caught.value.reason == reason


def test_bad_input_gets_a_clear_error(tmp_path):
    table = tmp_path / "t.csv"
    pd.DataFrame({"file": ["a.png"], "text": ["x"]}).to_csv(table)
    with pytest.raises(ValueError, match=r"no column \['image', 'caption'\].*'file', 'text'"):
        ingest.open_collection(str(table))
    with pytest.raises(ValueError, match="no images"):
        ingest.open_collection(str(tmp_path), kind="folder")


def test_resize_center_crop_micro_conditioning():
    tall = Image.new("RGB", (30, 90), (255, 0, 128))
    pixels, crop = images.resize_center_crop(tall, 24)
    assert pixels.shape == (3, 24, 24) and crop == (24, 0)  # resized to 24x72, top = (72-24)/2
    np.testing.assert_allclose(pixels[:, 12, 12], [1.0, -1.0, 128 / 127.5 - 1], atol=1e-6)
    _, crop = images.resize_center_crop(Image.new("RGB", (90, 30)), 24)
    assert crop == (0, 24)


# ---------------------------------------------------------------- preparation


@pytest.mark.parametrize("kind", sorted(WRITERS))
def test_prepare_each_form(tmp_path, teacher, kind):
    collection = ingest.open_collection(WRITERS[kind](str(tmp_path / "in")))
    output = str(tmp_path / "out")
    report = prepare.prepare_dataset(collection, _config(output, teacher))
    assert report.kept == EXPECTED["kept"]
    assert dict(report.filtered) == EXPECTED["filtered"]
    assert dict(report.unreadable) == EXPECTED["unreadable"]
    with open(os.path.join(output, schema.PREPARE_REPORT_FILE)) as f:
        assert json.load(f)["kept"] == EXPECTED["kept"]
    records = _read_all(output)
    assert sorted(records) == sorted(caption for _, _, caption in GOOD)
    record = records["a wide random picture with many colorful pixels"]
    assert record["latents"].shape == (4, RESOLUTION // 2, RESOLUTION // 2)
    assert record["prompt_embeds"].shape == (77, TINY_CROSS_ATTENTION_DIM)
    assert record["pooled_prompt_embeds"].shape == (TINY_POOLED_DIM,)
    for key in ("latents", "prompt_embeds", "pooled_prompt_embeds"):
        assert record[key].dtype == np.float16
    assert record["original_size"].tolist() == [40, 60]
    assert record["crop_top_left"].tolist() == [0, 8]
    assert record["target_size"].tolist() == [RESOLUTION, RESOLUTION]
    assert record["original_size"].dtype == np.int32


@torch.no_grad()
def test_encodings_equal_direct_calls_of_the_teacher(tmp_path, teacher, sdxl_components):
    """Latents = VAE posterior mean * scaling factor; text = diffusers' encode_prompt."""
    output = str(tmp_path / "out")
    prepare.prepare_dataset(ingest.open_collection(write_folder(str(tmp_path))), _config(output, teacher))
    records = _read_all(output)
    vae = sdxl_components["vae"]
    for _, data, caption in GOOD:
        pixels, _ = images.resize_center_crop(images.decode_rgb(data), RESOLUTION)
        posterior = vae.encode(torch.from_numpy(pixels[None])).latent_dist
        expected = (posterior.mean * vae.config.scaling_factor)[0].numpy()
        np.testing.assert_allclose(records[caption]["latents"], expected, rtol=2e-3, atol=2e-3)
    pipeline = StableDiffusionXLPipeline(**sdxl_components)
    captions = [caption for _, _, caption in GOOD]
    embeds, _, pooled, _ = pipeline.encode_prompt(captions, device="cpu", do_classifier_free_guidance=False)
    for i, caption in enumerate(captions):
        np.testing.assert_allclose(records[caption]["prompt_embeds"], embeds[i].numpy(), rtol=2e-3, atol=2e-3)
        np.testing.assert_allclose(records[caption]["pooled_prompt_embeds"], pooled[i].numpy(), rtol=2e-3, atol=2e-3)
    null = load_null_embeddings(output)
    null_embeds, _, null_pooled, _ = pipeline.encode_prompt("", device="cpu", do_classifier_free_guidance=False)
    assert null["prompt_embeds"].dtype == np.float32
    np.testing.assert_allclose(null["prompt_embeds"], null_embeds[0].numpy(), rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(null["pooled_prompt_embeds"], null_pooled[0].numpy(), rtol=2e-3, atol=2e-3)


class _Crash(Exception):
    pass


def test_crash_leaves_no_complete_looking_shard_and_rerun_resumes(tmp_path, teacher, monkeypatch):
    collection = ingest.open_collection(write_folder(str(tmp_path)))
    output = str(tmp_path / "out")
    # 5 shards of 2 inputs; in path order shards 0, 1 and 2 each encode one batch.
    config = _config(output, teacher, records_per_shard=2, batch_size=2)
    encode = prepare.TeacherEncoders.encode_images
    calls = []

    def crash_in_third_shard(self, pixels):
        calls.append(len(pixels))
        if len(calls) == 3:
            raise _Crash
        return encode(self, pixels)

    monkeypatch.setattr(prepare.TeacherEncoders, "encode_images", crash_in_third_shard)
    with pytest.raises(_Crash):
        prepare.prepare_dataset(collection, config)
    shards = [name for name in os.listdir(output) if name.startswith(schema.DATASET_NAME)]
    assert sorted(shards) == [schema.shard_filename(k, 5) for k in (0, 1)]
    assert os.listdir(os.path.join(output, schema.INCOMPLETE_DIR)) == []  # the crashed shard's part is removed
    with pytest.raises(FileNotFoundError, match="rerun"):
        open_source(output)

    calls.clear()
    monkeypatch.setattr(prepare.TeacherEncoders, "encode_images", lambda s, p: calls.append(len(p)) or encode(s, p))
    report = prepare.prepare_dataset(collection, config)
    assert sum(calls) == len(_kept_inputs(collection, config, (2, 3, 4)))  # shards 0, 1 skipped
    assert report.kept == EXPECTED["kept"] and dict(report.unreadable) == EXPECTED["unreadable"]
    assert len(open_source(output)) == EXPECTED["kept"]


def _kept_inputs(collection, config, shards) -> list[int]:
    """Input indices of `shards` that pass decoding and filters (what the encoder sees)."""
    kept = []
    for shard in shards:
        start = shard * config.records_per_shard
        for index in range(start, min(start + config.records_per_shard, len(collection))):
            try:
                ingest.load_example(collection, index, config.filters, config.resolution)
            except ingest.SkipRecord:
                continue
            kept.append(index)
    return kept


def test_resume_refuses_other_settings(tmp_path, teacher):
    collection = ingest.open_collection(write_folder(str(tmp_path)))
    output = str(tmp_path / "out")
    prepare.prepare_dataset(collection, _config(output, teacher))
    with pytest.raises(ValueError, match="resolution"):
        prepare.prepare_dataset(collection, _config(output, teacher, resolution=16))


def test_tasks_split_the_shards(tmp_path, teacher):
    collection = ingest.open_collection(write_folder(str(tmp_path)))
    output = str(tmp_path / "out")
    assert prepare.prepare_dataset(collection, _config(output, teacher, task_index=0, task_count=2)) is None
    assert not os.path.exists(os.path.join(output, "dataset_info.json"))
    report = prepare.prepare_dataset(collection, _config(output, teacher, task_index=1, task_count=2))
    assert report.kept == EXPECTED["kept"]
    assert len(open_source(output)) == EXPECTED["kept"]


def test_cli(tmp_path, teacher, capsys):
    shards = write_webdataset(str(tmp_path))
    output = str(tmp_path / "out")
    argv = [
        "--input",
        shards,
        "--teacher",
        teacher,
        "--output-dir",
        output,
        "--resolution",
        str(RESOLUTION),
        "--min-side",
        "24",
        "--min-aspect",
        "0.5",
        "--max-aspect",
        "2.0",
        "--records-per-shard",
        "3",
    ]
    assert prepare_data.main(argv) == 0
    summary = capsys.readouterr().out
    assert "10 records: 4 kept, 3 filtered, 3 unreadable" in summary  # e and f are too wide/tall
    assert "aspect_ratio: 2" in summary and "shard-0002.tar" in summary
    with pytest.raises(SystemExit) as caught:
        prepare_data.main(["--help"])
    assert caught.value.code == 0 and "--min-caption-words" in capsys.readouterr().out
