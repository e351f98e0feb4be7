"""Every shipped config loads; a config key that does not exist is an error, not ignored."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.py"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_loads(path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config()
    assert cfg.student.variant in ("koala-1b", "koala-700m") and cfg.data.global_batch_size > 0


def test_shipped_configs_cover_the_paper_runs():
    assert {p.stem for p in CONFIGS} >= {"tiny", "koala_1b", "koala_700m", "koala_lightning_700m", "koala_turbo_700m"}


def test_unknown_config_key_is_an_error():
    out = subprocess.run([sys.executable, "train.py", "--config", "configs/tiny.py", "--config.optim.learning_rat=1"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "learning_rat" in out.stderr
