"""The training loop in process (the fast lane's one real `loop.train`), its periodic actions alone, a run's identity
on resume, the checkpoint space check before step 1, the value ranges preflight checks, and the planner and the
trainer agreeing on every shipped config's record shape."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from koala_jax.errors import ConfigError
from koala_jax.train import checkpoint, identity, loop, preflight
from koala_jax.train.actions import Checkpoints, Logger, StepOutput, log_line
from koala_jax.train.config import load_config_file
from koala_jax.train.data_stage import prepare_on_the_fly
from koala_jax.train.setup import describe_models, make_source, record_shape
from koala_jax.train.step_builder import data_shape

from tests.conftest import MICRO_TEACHER, ROOT
from tests.train_worker import micro_config


def micro(tmp_path: Path, steps: int = 2, **overrides):
    teacher = tmp_path / "micro_teacher.json"
    teacher.write_text(json.dumps(MICRO_TEACHER))
    return micro_config(str(tmp_path / "run"), str(teacher), steps, **overrides)


def test_loop_trains_in_process_and_refuses_a_resume_with_another_teacher(tmp_path, capsys):
    """One real run in process (2 steps), then resumes: the same architecture with other weights (the random
    teacher of another seed) is another teacher, refused unless allowed."""
    result = loop.train(micro(tmp_path, steps=2))
    assert isinstance(result, loop.TrainResult)
    assert result.step == 2 and result.total_steps == 2 and result.stopped is None
    assert [r["step"] for r in result.history] == [1, 2] and all(np.isfinite(r["total"]) for r in result.history)
    assert (Path(result.checkpoints) / "2").is_dir() and result.pairs
    recorded = json.loads((tmp_path / "run" / identity.IDENTITY_FILE).read_text())
    assert recorded["data"]["kind"] == "synthetic" and recorded["data"]["records"] == 64
    assert recorded["teacher"]["tensors"] > 0

    with pytest.raises(ConfigError, match=r"was trained with another teacher \(teacher: .* then, .* now\).*allow_"):
        loop.train(micro(tmp_path, steps=3, seed=1))
    assert not (tmp_path / "run" / "checkpoints" / "3").exists()
    result = loop.train(micro(tmp_path, steps=3, seed=1, **{"resume.allow_changes": "teacher"}))
    assert result.step == 3 and "resume accepts a changed teacher" in capsys.readouterr().out


def test_identity_check_compares_what_the_run_trained_with(tmp_path):
    teacher = {"source": "a", "tensors": 3, "bytes": 12, "hash": "x"}
    data = identity.data_identity("prepared/", "prepared", 100, (4, 16, 16))
    now = {"teacher": teacher, "data": data}
    assert identity.compare_identity(tmp_path, now, (), resuming=False, record=True) == []
    moved = {"teacher": {**teacher, "source": "moved/a"}, "data": data}  # the same weights elsewhere: the same teacher
    assert identity.compare_identity(tmp_path, moved, (), resuming=True, record=False) == []
    synthetic = {"teacher": teacher, "data": identity.data_identity("synthetic", "synthetic", 100, (4, 16, 16))}
    with pytest.raises(ConfigError, match="another data .*kind prepared.* then, .*kind synthetic.* now"):
        identity.compare_identity(tmp_path, synthetic, (), resuming=True, record=False)
    assert identity.compare_identity(tmp_path, synthetic, ("data",), resuming=True, record=False)


def test_fingerprints_tell_teachers_of_one_shape_apart():
    rng = np.random.default_rng(0)
    a = {"conv": {"kernel": rng.standard_normal((3, 3, 4, 8)).astype(np.float32)}, "b": np.zeros(8, np.float32)}
    b = {"conv": {"kernel": a["conv"]["kernel"] + 1e-3}, "b": a["b"]}
    fa, fb = identity.teacher_fingerprint("t", a), identity.teacher_fingerprint("t", b)
    assert fa == identity.teacher_fingerprint("t", a) and fa["hash"] != fb["hash"] and fa["bytes"] == fb["bytes"]


def test_a_disk_that_cannot_hold_one_checkpoint_stops_before_step_one(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint.Checkpointer, "_free", lambda self: 0)  # the fault: a full disk
    with pytest.raises(checkpoint.CheckpointError, match="not enough disk space for checkpoint step 1"):
        loop.train(micro(tmp_path, steps=2))
    assert not list((tmp_path / "run" / "checkpoints").glob("[0-9]*"))


def test_values_out_of_range_are_listed_before_anything_loads(tmp_path):
    cfg = micro(tmp_path, seed=-1, **{"optim.lr": -1.0, "data.caption_dropout": 2.0, "kd.feat_norm": "layer"})
    problems = preflight.Problems()
    preflight.check_settings(cfg, problems)
    text = " | ".join(problems.found)
    assert "seed -1 must be" in text and "optim.lr -1.0 must be" in text and "data.caption_dropout 2.0" in text
    assert "kd.feat_norm" in text and len(problems.found) == 4


def test_logger_logs_on_its_period_with_skipped_records(capsys):
    class Loader:
        skip_counts = {"unreadable": 2, "filtered": 0}

    class Clock:
        def tick(self):
            pass

        def report(self):
            return {"step_time_s": 0.5, "images_per_s": 4.0}

    logger = Logger(every=2, total=3, start=0, throughput=Clock(), loader=Loader(), writer=None)
    metrics = {k: np.float32(1.0) for k in ("total", "task", "out_kd", "feat_kd", "grad_norm")}
    for step in (1, 2, 3):
        logger(StepOutput(step, None, {**metrics, "finite": True}, {}, False))
    logger.close()
    assert [r["step"] for r in logger.history] == [2, 3]
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("step 2/3 | total 1.0000") and lines[0].endswith("| skipped unreadable 2")


def test_log_line_without_skips_says_nothing_of_them():
    record = {k: 1.0 for k in ("total", "task", "out_kd", "feat_kd", "grad_norm", "step_time_s", "images_per_s")}
    assert "skipped" not in log_line(1, 2, {**record, "data/unreadable": 0})


def test_checkpoints_save_on_period_on_a_signal_and_at_the_end():
    saved = []

    class Recorder:
        def save(self, step, state, loader, force=False):
            saved.append((step, force))

    action = Checkpoints(Recorder(), loader=None, total=5)
    for step, stop in ((1, False), (2, True), (5, False)):
        action(StepOutput(step, None, {}, {}, stop))
    assert saved == [(1, False), (2, True), (5, True)]


SHIPPED = sorted(p.name for p in (ROOT / "configs").glob("*.py") if p.name != "common.py")
# Configs whose data are not here: the latent side their docstrings state.
NOT_HERE_LATENT_SIDE = {
    "koala_1b.py": 128,
    "koala_700m.py": 128,
    "koala_lightning_700m.py": 128,
    "koala_turbo_700m.py": 64,
    "tiny_world_teacher.py": 16,
}


@pytest.mark.parametrize("name", SHIPPED)
def test_planner_and_trainer_agree_on_the_record_shape(name, tmp_path):
    """The planner's shape (configs and metadata only) is the shape of the records the loop trains on: the tiny
    configs' records are made here (a few world scenes encoded with the shipped teacher, or synthetic ones); the
    full-size configs' data are not here, so their planned shape is checked against their resolution."""
    cfg = load_config_file(ROOT / "configs" / name)
    source = cfg.plan.teacher if cfg.plan.teacher and not Path(cfg.teacher.source).exists() else cfg.teacher.source
    models = describe_models(source, cfg.student.variant)
    planned = data_shape(cfg.data, models.teacher, cfg.teacher.source)
    if name in NOT_HERE_LATENT_SIDE:
        side = NOT_HERE_LATENT_SIDE[name]
        assert planned.latent_shape == (4, side, side)
        return
    if cfg.data.source.startswith("world:"):
        cfg.data.source = "world:2:mixed"  # the same encoders and resolution, two scenes
        cfg.data.source = prepare_on_the_fly(cfg.data, str(tmp_path / "data"), cfg.teacher.source)
    records = record_shape(make_source(cfg.data, models))
    assert (planned.latent_shape, planned.text_len) == (records.latent_shape, records.text_len)


def test_a_finished_run_resumed_with_a_smaller_total_trains_nothing():
    from koala_jax.cli.train import summary
    from koala_jax.train.config import base_config

    result = loop.TrainResult(4, 2, [], "runs/x/checkpoints", None, None, {})
    assert (
        summary(base_config(), result)[0] == "done: the run was already at step 4, past total_steps 2; nothing trained"
    )
