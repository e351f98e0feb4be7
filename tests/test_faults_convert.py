"""Faults of the converter and of prepare_data.py, each injected at a named point (no timers, no tmpfs): a full disk
before and during an export or a shard, a preparation stopped before its first shard, an absurd resolution, torch
missing where a path needs it, and a training run stopped before its first save (issues 22 and 23)."""

from __future__ import annotations

import errno
import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from koala_jax import files
from koala_jax.cli import prepare as prepare_cli
from koala_jax.cli.requires import TORCH_INSTALL
from koala_jax.data import prepare as prepare_module
from koala_jax.data import schema
from koala_jax.errors import DiskFullError
from koala_jax.models import UNetConfig, param_count
from koala_jax.pipelines.tiny import TINY_CROSS_ATTENTION_DIM, TINY_POOLED_DIM
from koala_jax.train.checkpoint import write_student_config

from tests.conftest import MICRO, run

FREE = 1000  # bytes "free" on the pretended full disk


def one_error_line(text: str) -> str:
    """The single `error: ...` line of a command's stderr (and no traceback)."""
    errors = [line for line in text.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in text, text[-3000:]
    return errors[0]


@pytest.fixture(scope="module")
def micro_json(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("config") / "micro.json"
    path.write_text(json.dumps(MICRO))
    return path


@pytest.fixture
def full_disk(monkeypatch) -> None:
    """The file system holds FREE bytes (what every free-space check and disk-full message reads)."""
    monkeypatch.setattr(files, "free_bytes", lambda path: FREE)


@pytest.fixture
def disk_fills_up(monkeypatch) -> None:
    """Space is there when checked and gone when the written file is flushed (`files.atomic_write`'s fsync, where a
    real full disk with delayed allocation reports it); FREE bytes are left then."""
    free = [2**50]

    def no_space(fd: int) -> None:
        free[0] = FREE
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(files, "free_bytes", lambda path: free[0])
    monkeypatch.setattr(files.os, "fsync", no_space)


EXPORTS = {"to-diffusers": "out", "to-single-file": "out.safetensors"}


@pytest.mark.parametrize("command", sorted(EXPORTS))
@pytest.mark.parametrize("when", ["before", "during"])
def test_a_full_disk_is_one_line_and_leaves_nothing(command, when, micro_json, tmp_path, capsys, request):
    """Before: `[Errno 28] No space left on device` with no path. Now the export is refused before writing when
    it cannot fit, and a disk that fills up meanwhile names --out too; no output or temporary file is left."""
    request.getfixturevalue("full_disk" if when == "before" else "disk_fills_up")
    out = tmp_path / "exports" / EXPORTS[command]
    assert run(command, "--checkpoint", f"random:{micro_json}", "--out", out, "--dtype", "fp16") == 1
    line = one_error_line(capsys.readouterr().err)
    needed = 2 * param_count(UNetConfig.from_diffusers(MICRO))  # fp16
    assert line.startswith(f"error: {out}: ") and f"needs {needed:,} bytes, " in line and f"{FREE:,} bytes free" in line
    assert not (tmp_path / "exports").exists() or list((tmp_path / "exports").iterdir()) == []


def test_writers_share_one_atomic_writer(tmp_path, disk_fills_up):
    """The model card, the safetensors writer and the JSON files of a preparation: no 0-byte or partial file."""
    from koala_jax.weights.safetensors import save_file

    with pytest.raises(DiskFullError, match=re.escape(f"{tmp_path / 'w.safetensors'}: no space left")):
        save_file({"x": np.ones(4, np.float32)}, tmp_path / "w.safetensors")
    with pytest.raises(DiskFullError, match="null_embeddings.npz: no space left"):
        schema.save_null_embeddings(str(tmp_path), np.ones((77, 4)), np.ones(4))
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- prepare_data.py


def prepare(*argv: object) -> int:
    return prepare_cli.main([str(a) for a in argv])


class FillingDiskWriter:
    """array_record's writer on a disk that fills up at the first record (array_record reports it as a
    RuntimeError, which used to end prepare_data.py in a traceback)."""

    def __init__(self, path: str, options: str) -> None:
        self.file = open(path, "wb")

    def write(self, record: bytes) -> None:
        self.file.write(record[:10])
        raise RuntimeError("write() failed: No space left on device")

    def close(self) -> None:
        self.file.close()


def test_a_full_disk_during_a_shard_is_one_line_and_a_rerun_may_change_settings(
    components, images, tmp_path, capsys, monkeypatch, full_disk
):
    """Before: a traceback, and prepare_config.json (written before the first shard) refused a rerun with other
    settings although no shard existed. Now the settings are written with the first shard, and a folder with no
    shard binds nothing (not even the settings file an older version wrote first)."""
    out = tmp_path / "prepared"
    common = ("--input", images, "--teacher", components, "--output-dir", out, "--num-threads", "1")
    monkeypatch.setattr(prepare_module.array_record_module, "ArrayRecordWriter", FillingDiskWriter)
    assert prepare(*common, "--resolution", "16", "--records-per-shard", "2") == 1
    line = one_error_line(capsys.readouterr().err)
    shard = out / schema.shard_filename(0, 2)
    record = 2 * (4 * 8 * 8 + schema.TEXT_LENGTH * TINY_CROSS_ATTENTION_DIM + TINY_POOLED_DIM)  # fp16 (4, 8, 8) latents
    assert line == f"error: {shard}: no space left on the device (needs {2 * record:,} bytes, {FREE:,} bytes free)"
    assert not schema.complete_shards(str(out)) and os.listdir(out / schema.INCOMPLETE_DIR) == []
    assert not (out / schema.PREPARE_CONFIG_FILE).exists()

    monkeypatch.undo()  # room again; a settings file as older versions left it, with no shard beside it
    (out / schema.PREPARE_CONFIG_FILE).write_text(json.dumps({"resolution": 16}))
    assert prepare(*common, "--resolution", "32") == 0
    assert "3 kept" in capsys.readouterr().out
    assert json.loads((out / schema.PREPARE_CONFIG_FILE).read_text())["resolution"] == 32


def test_an_absurd_resolution_is_refused_before_anything_loads(components, images, tmp_path, capsys):
    """Before: a MemoryError traceback after the encoders were loaded."""
    out = tmp_path / "prepared"
    args = ("--input", images, "--teacher", components, "--output-dir", out, "--resolution", "100000")
    assert prepare(*args) == 1
    assert "resolution 100000 is above 4096" in one_error_line(capsys.readouterr().err)
    assert not out.exists()


@pytest.fixture
def without_torch(monkeypatch) -> None:
    """torch and diffusers cannot be imported (a None entry in sys.modules is how Python marks that)."""
    monkeypatch.setitem(sys.modules, "torch", None)
    monkeypatch.setitem(sys.modules, "diffusers", None)


def test_prepare_without_torch_names_the_install_or_uses_the_jax_backend(
    components, images, tmp_path, capsys, without_torch
):
    out = tmp_path / "prepared"
    args = ("--input", images, "--teacher", components, "--output-dir", out, "--resolution", "16")
    assert prepare(*args, "--backend", "torch") == 1
    line = one_error_line(capsys.readouterr().err)
    assert "--backend torch needs PyTorch" in line and TORCH_INSTALL in line and "--backend jax" in line
    assert not out.exists()
    assert prepare(*args) == 0
    printed = capsys.readouterr().out
    assert "note: torch is not installed: encoding with --backend jax" in printed and "3 kept" in printed


def test_a_pickle_without_torch_is_one_line(tmp_path, capsys, without_torch):
    (tmp_path / "model.ckpt").write_bytes(b"never read")
    assert run("to-jax", "--src", tmp_path / "model.ckpt", "--allow-pickle", "--out", tmp_path / "out") == 1
    line = one_error_line(capsys.readouterr().err)
    assert "--allow-pickle" in line and TORCH_INSTALL in line and ".safetensors" in line
    assert run("to-jax", "--src", tmp_path / "model.ckpt", "--out", tmp_path / "out") == 1  # no pickle without it
    assert "pass --allow-pickle" in one_error_line(capsys.readouterr().err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.ckpt"]


# ---------------------------------------------------------------- a training run with no checkpoint


@pytest.mark.parametrize("folders", [[], ["checkpoints"], ["checkpoints", "checkpoints/2.orbax-checkpoint-tmp-1"]])
def test_a_run_stopped_before_its_first_save_has_no_checkpoint_yet(folders, tmp_path, capsys):
    """Before: "not a diffusers U-Net folder". A run writes student_config.json when it starts; checkpoints/ comes
    with the first save, which may be unfinished."""
    workdir = tmp_path / "run"
    write_student_config(workdir, UNetConfig.from_diffusers(MICRO))
    for folder in folders:
        (workdir / folder).mkdir()
    for command in ("to-diffusers", "to-single-file"):
        out = tmp_path / ("out.safetensors" if command == "to-single-file" else "out")
        assert run(command, "--checkpoint", workdir, "--out", out) == 1
        assert one_error_line(capsys.readouterr().err) == (
            f"error: {workdir}: this run has no checkpoint yet (train.py stopped before its first save); train it "
            "longer or export another run"
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*")) == sorted(["student_config.json", *folders])
