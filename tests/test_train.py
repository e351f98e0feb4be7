"""train.py end to end on the micro teacher: 1 device == 8 devices (data x fsdp), exact resume after
SIGTERM, a kill -9 during saves leaves a restorable checkpoint, two jax.distributed processes, NaN stop.

Runs that need their own device count or signals run in subprocesses (tests/train_worker.py).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from koala_jax.train.checkpoint import Checkpointer
from koala_jax.weights.training_run import restore_params

from tests.conftest import MICRO_TEACHER, run

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # Every test here trains in subprocesses.
STEPS = 6


def start_worker(workdir: Path, *args: str) -> subprocess.Popen:
    """tests/train_worker.py on the micro teacher in its own process."""
    # Workers share a compilation cache: the runs of one mesh compile the same step.
    cache = Path(tempfile.gettempdir()) / "koala_jax_test_compile_cache"
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(cache)}
    teacher = Path(workdir).parent / f"{Path(workdir).name}_micro_teacher.json"
    teacher.write_text(json.dumps(MICRO_TEACHER))
    return subprocess.Popen(
        [sys.executable, "-m", "tests.train_worker", str(workdir), "--teacher", str(teacher), *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[list[dict], str]:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    line = next(row for row in out.splitlines() if row.startswith("HISTORY "))
    return json.loads(line[len("HISTORY ") :]), out


def wait_for_line(proc: subprocess.Popen, prefix: str, timeout: float = 600) -> list[str]:
    """Read the worker's output until a line starting with `prefix`."""
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith(prefix):
            return seen
    raise AssertionError(f"worker ended before printing {prefix!r}:\n{''.join(seen)[-3000:]}")


def load_params(workdir: Path) -> dict[str, np.ndarray]:
    with np.load(workdir / "final_params.npz") as f:
        return dict(f)


@pytest.fixture(scope="module")
def straight_and_sharded(tmp_path_factory):
    """The same run on 1 device and on 8 fake devices with a data=4 x fsdp=2 mesh (in parallel)."""
    one, eight = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("eight")
    procs = [
        start_worker(one, "--steps", str(STEPS)),
        start_worker(eight, "--steps", str(STEPS), "--devices", "8", "--mesh", "4,2"),
    ]
    (h1, _), (h8, _) = (finish(p) for p in procs)
    return (one, h1), (eight, h8)


def test_one_device_equals_eight_device_data_fsdp_mesh(straight_and_sharded):
    (one, h1), (eight, h8) = straight_and_sharded
    for a, b in zip(h1, h8):
        for k in ("total", "task", "out_kd", "feat_kd"):
            assert abs(a[k] - b[k]) <= 1e-4 * abs(a[k]), (a["step"], k, a[k], b[k])
    p1, p8 = load_params(one), load_params(eight)
    worst = max(float(np.max(np.abs(p1[k] - p8[k]))) for k in p1)
    print(f"max |param difference| after {STEPS} steps, 1 vs 8 devices: {worst:.2e}")
    assert p1.keys() == p8.keys() and worst < 1e-5


def test_kd_losses_go_down(straight_and_sharded):
    """Per-step losses are noisy (random t and noise): compare the mean KD loss of the two halves."""
    (_, h1), _ = straight_and_sharded
    kd = [r["out_kd"] + r["feat_kd"] for r in h1]
    first, second = np.mean(kd[: STEPS // 2]), np.mean(kd[STEPS // 2 :])
    print(
        f"out_kd + feat_kd, mean of steps 1-{STEPS // 2}: {first:.3f}, of steps {STEPS // 2 + 1}-{STEPS}: {second:.3f}"
    )
    assert second < 0.9 * first


def test_sigterm_then_resume_equals_straight_run(straight_and_sharded, tmp_path):
    (one, h1), _ = straight_and_sharded
    proc = start_worker(tmp_path, "--steps", str(STEPS))
    wait_for_line(proc, "step 3/")
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    stopped = Checkpointer(tmp_path, every=2, keep=3).latest_step()
    assert 3 <= stopped < STEPS, stopped  # saved at the step where it stopped, not at the interval
    resumed, out = finish(start_worker(tmp_path, "--steps", str(STEPS)))
    assert "resumed from step" in out and [r["step"] for r in resumed] == list(range(stopped + 1, STEPS + 1))
    for r in resumed:
        assert r["total"] == h1[r["step"] - 1]["total"], r["step"]
    straight, again = load_params(one), load_params(tmp_path)
    for k in straight:
        np.testing.assert_array_equal(again[k], straight[k], err_msg=k)
    # The exported view of the run (EMA params, as convert_weights.py reads it) restores too.
    config, ema = restore_params(tmp_path, ema=True)
    assert config.mid_block_type is None and "conv_in" in ema


def test_kill_9_during_saves_leaves_a_restorable_checkpoint(tmp_path):
    proc = start_worker(tmp_path, "--steps", "50", "--set", "ckpt.every=1")
    wait_for_line(proc, "step 4/")
    proc.kill()
    proc.wait()
    step = Checkpointer(tmp_path, every=1, keep=3).latest_step()
    assert step is not None and step >= 2
    _, params = restore_params(tmp_path, ema=False)
    assert all(np.isfinite(v).all() for v in _leaves(params))


def _leaves(tree):
    import jax

    return jax.tree.leaves(tree)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.multiprocess
def test_two_processes_train_and_checkpoint(tmp_path):
    address = f"localhost:{free_port()}"
    procs = [
        start_worker(
            tmp_path,
            "--steps",
            "3",
            "--devices",
            "2",
            "--mesh",
            "2,2",
            "--coordinator",
            address,
            "--num-processes",
            "2",
            "--process-id",
            str(i),
        )
        for i in range(2)
    ]
    (h0, _), _ = (finish(p) for p in procs)
    assert [r["step"] for r in h0] == [1, 2, 3] and all(np.isfinite(r["total"]) for r in h0)
    assert Checkpointer(tmp_path, every=2, keep=3).latest_step() == 3
    _, params = restore_params(tmp_path, ema=False)
    final = load_params(tmp_path)
    np.testing.assert_array_equal(params["conv_in"]["kernel"], final["conv_in/kernel"])


def test_nan_loss_stops_with_error_and_keeps_last_good_checkpoint(tmp_path):
    """A huge learning rate makes step 2 non-finite: a clear error, the step-1 checkpoint stays."""
    proc = start_worker(
        tmp_path, "--steps", "5", "--set", "ckpt.every=1", "--set", "optim.lr=1e30", "--set", "optim.grad_clip=0.0"
    )
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode != 0
    assert "non-finite loss or gradient at step" in out and "last good checkpoint" in out
    step = Checkpointer(tmp_path, every=1, keep=3).latest_step()
    assert step is not None
    _, params = restore_params(tmp_path, ema=False, step=step)
    assert all(np.isfinite(v).all() for v in _leaves(params))


def test_export_training_run_to_diffusers(straight_and_sharded, tmp_path):
    """convert_weights.py to-diffusers on a train.py workdir: the EMA student loads in diffusers."""
    import torch
    from diffusers import UNet2DConditionModel as TorchUNet

    (one, _), _ = straight_and_sharded
    assert run("to-diffusers", "--checkpoint", one, "--ema", "--out", tmp_path / "export") == 0
    model = TorchUNet.from_pretrained(tmp_path / "export")
    _, ema = restore_params(one, ema=True)
    np.testing.assert_array_equal(
        model.state_dict()["conv_in.weight"].numpy(), np.transpose(ema["conv_in"]["kernel"], (3, 2, 0, 1))
    )
    assert isinstance(model.state_dict()["conv_out.bias"], torch.Tensor) and model.config.mid_block_type is None


def test_plain_diffusion_training_of_the_teachers_own_architecture(tmp_path):
    """student.variant='same', random init, task loss only: the teacher is never run (both KD terms are 0)
    and the trained model is the teacher's architecture, whose task loss goes down."""
    steps = 8
    history, _ = finish(
        start_worker(
            tmp_path,
            "--steps",
            str(steps),
            "--set",
            "student.variant='same'",
            "--set",
            "student.init='random'",
            "--set",
            "kd.out=0.0",
            "--set",
            "kd.feat=0.0",
            "--set",
            "optim.lr=3e-3",
        )
    )
    assert all(r["out_kd"] == 0.0 and r["feat_kd"] == 0.0 and r["total"] == r["task"] for r in history)
    first, last = np.mean([r["task"] for r in history[:3]]), np.mean([r["task"] for r in history[-3:]])
    print(f"task loss, mean of the first 3 steps {first:.3f}, of the last 3 {last:.3f}")
    assert last < first
    config, params = restore_params(tmp_path, ema=False)
    assert config.layers_per_block == (2, 2) and config.mid_block_type is not None  # MICRO_TEACHER's own shape
