"""benchmarks/kd_ablation.py: its settings select the features they name; --quick trains, evaluates and tabulates
one seed of a few settings. No result is asserted (which setting wins is the benchmark's finding,
docs/kd_ablation.md), only the table's shape."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from koala_jax.students.mapping import student_architecture
from koala_jax.train.setup import make_models
from koala_jax.weights import source_config

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


def load_ablation():
    spec = importlib.util.spec_from_file_location("kd_ablation", ROOT / "benchmarks" / "kd_ablation.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is defined
    spec.loader.exec_module(module)
    return module


def test_settings_select_the_feature_pairs_they_name():
    """On the student the ablation trains (the shipped teacher's KOALA-700M student): encoder and decoder split
    the SA pairs, first and last each take one block per transformer stack, sa+ca is the union; settings that
    only evaluate differently train nothing of their own."""
    kd = load_ablation()
    args = kd.parse_args([])
    base = kd.load_base_config()
    teacher, _ = source_config(base.teacher.source)
    student, selection = student_architecture(teacher, base.student.variant)
    known = {s.name: s for s in kd.settings(base.teacher.source, base.student.variant)}
    data = {"mixed": "m", "short": "s", "rich": "r"}

    def pairs(name: str) -> set[str]:
        return set(make_models(kd.run_config(args, known[name], 0, data), teacher, student, selection)[2])

    sa, ca = pairs("sa"), pairs("ca")
    encoder, decoder, first, last = (pairs(f"sa-{part}") for part in ("encoder", "decoder", "first", "last"))
    print(f"{len(sa)} SA pairs: {len(encoder)} encoder, {len(decoder)} decoder, {len(first)} first, {len(last)} last")
    assert sa and encoder and decoder and encoder | decoder == sa and not encoder & decoder
    stacks = {path.partition(".transformer_blocks.")[0] for path in sa}
    assert len(first) == len(last) == len(stacks) and not first & last and first | last <= sa
    assert all(".transformer_blocks.0." in path for path in first)
    assert pairs("sa+ca") == sa | ca and not sa & ca
    workdir = {name: kd.run_config(args, known[name], 0, data).workdir for name in ("sa", "sa-mixed", "sa-4step")}
    assert len(set(workdir.values())) == 1
