"""benchmarks/kd_ablation.py --quick: it trains, evaluates and tabulates one seed of a few settings. It asserts no
result (which setting wins is the benchmark's finding, docs/kd_ablation.md), only the table's shape."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.slow
def test_quick_ablation_writes_one_row_per_setting(tmp_path):
    argv = [
        sys.executable,
        "benchmarks/kd_ablation.py",
        "--quick",
        "--out",
        str(tmp_path),
        "--work",
        str(tmp_path / "work"),
    ]
    out = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    print(out.stdout[-2000:])
    results = json.loads((tmp_path / "kd_ablation.json").read_text())
    settings = [e["setting"] for e in results["entries"]]
    assert settings == ["none", "sa", "lf"] and {e["seed"] for e in results["entries"]} == {0}
    for entry in results["entries"]:
        assert {"all", "colour_shape", "psnr_db", "latent_mse", "task"} <= set(entry)
    rows = (tmp_path / "kd_ablation.md").read_text().splitlines()[2:]
    assert [row.split("|")[1].strip() for row in rows] == settings
