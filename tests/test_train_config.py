"""Every shipped config loads; a config key that does not exist is an error, not ignored; a key of an
earlier release is refused with its new name."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from koala_jax.cli import train as train_cli
from koala_jax.train.config import RENAMED, base_config

from tests.conftest import ROOT

CONFIGS = sorted(p for p in (ROOT / "configs").glob("*.py") if p.stem != "common")


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_loads(path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config()
    assert cfg.student.variant in ("koala-1b", "koala-700m", "same") and cfg.data.global_batch_size > 0
    assert "python train.py --config" in module.__doc__ or path.stem != "tiny"


def test_shipped_configs_cover_the_paper_runs():
    assert {p.stem for p in CONFIGS} >= {"tiny", "koala_1b", "koala_700m", "koala_lightning_700m", "koala_turbo_700m"}


def test_unknown_config_key_is_one_line_error():
    out = subprocess.run(
        [sys.executable, "train.py", "--config", "configs/tiny.py", "--config.optim.learning_rat=1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 1, out.stderr
    assert out.stderr.startswith("error: ") and "learning_rat" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr


@pytest.mark.parametrize("old", sorted(RENAMED))
def test_renamed_keys_name_their_new_place(old, capsys):
    assert train_cli.main(["--config", "configs/tiny.py", f"--config.{old}=1"]) == 1
    err = capsys.readouterr().err
    assert err == f"error: --config.{old} is now --config.{RENAMED[old]}\n"
    node = base_config()
    for part in RENAMED[old].split("."):  # The new name exists.
        assert part in node
        node = node[part]


def test_missing_config_flag_is_one_line_error(capsys):
    assert train_cli.main([]) == 1
    assert capsys.readouterr().err == "error: --config is required, e.g. --config configs/tiny.py\n"


CONFIG_FILE_ERRORS = {
    "unknown key": (
        "from koala_jax.train.config import cpu_config\n\ndef get_config():\n    c = cpu_config()\n"
        "    c.optim.warmup_step = 5\n    return c\n",
        ":5: unknown config key warmup_step (did you mean warmup_steps?)",
    ),
    "old flat key": (
        "from koala_jax.train.config import cpu_config\n\ndef get_config():\n    c = cpu_config()\n"
        "    c.ema_decay = 0.9\n    return c\n",
        ":5: ema_decay is now ema.decay",
    ),
    "old flat key replacing a group": (
        "from koala_jax.train.config import cpu_config\n\ndef get_config():\n    c = cpu_config()\n"
        "    c.plan = True\n    return c\n",
        ":5: plan is now plan.enabled",
    ),
    "syntax error": ("def get_config(:\n    pass\n", ":1: syntax error"),
    "no get_config": ("X = 1\n", ": no get_config() function"),
    "exception inside get_config": (
        "def get_config():\n    return {}['b']\n",
        ":2: KeyError: 'b'",
    ),
}


@pytest.mark.parametrize("case", sorted(CONFIG_FILE_ERRORS))
def test_config_file_errors_are_one_line_naming_file_and_line(case, tmp_path, capsys):
    text, expected = CONFIG_FILE_ERRORS[case]
    path = tmp_path / "my_config.py"
    path.write_text(text)
    assert train_cli.main(["--config", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}") and expected in err, err
    assert len(err.strip().splitlines()) == 1
