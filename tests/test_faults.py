"""Fault injection: every mistake and accident of issue 14 (docs/reliability.md lists them), each asserting the
one-line error, the exit status, and that nothing that existed before was lost or changed.

Most cases run in this process on tiny inputs: the checks before any loading, the checkpointer against a
saved micro run (damaged, mismatched, no disk space, leftovers), the workdir lock, the converter (damaged
inputs, bad values, leftovers of killed runs), prepare_data.py and sample.py. Those that need train.py
itself as a process (two runs at once, a disk that fills during an asynchronous save, Ctrl-C, resuming a
damaged or different run) start it on the micro teacher and are marked slow.

Signals and failures in a running command land at a named fault point (`koala_jax.files.fault_point`, set by
the environment variable KOALA_FAULT_POINT): the command signals itself there, or announces the point and waits
for the test's signal. No test waits on a timer, so none depends on the machine's load.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np
import optax
import pytest

from koala_jax import files as files_module
from koala_jax.cli import prepare as prepare_cli
from koala_jax.cli import sample as sample_cli
from koala_jax.cli.runner import GRACE_VARIABLE, INTERRUPTED_STATUS, TERMINATED_STATUS
from koala_jax.data import SyntheticSource, make_train_loader, schema
from koala_jax.errors import ConfigError
from koala_jax.files import FAULT_POINT_VARIABLE, INTERRUPTED_AGAIN
from koala_jax.models import UNetConfig, param_count, random_params
from koala_jax.students import build_student, student_architecture
from koala_jax.train import checkpoint as checkpoint_module
from koala_jax.train.checkpoint import Checkpointer, CheckpointError, remove_unfinished, write_student_config
from koala_jax.train.lock import WorkdirLock
from koala_jax.train.preflight import check_run
from koala_jax.train.state import init_state
from koala_jax.weights.safetensors import save_file

from tests.conftest import MICRO_TEACHER, ROOT, randomize_, run
from tests.train_worker import micro_config

TEACHER = UNetConfig.from_diffusers(MICRO_TEACHER)
TINY_PIPELINE = ROOT / "assets" / "tiny_world" / "teacher"


def snapshot(folder: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under `folder`: what must not change."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != "train.lock"
    }


def one_error_line(text: str) -> str:
    """The single `error: ...` line of a command's stderr (and no traceback)."""
    errors = [line for line in text.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in text, text[-3000:]
    return errors[0]


# A child's Ctrl-C raises KeyboardInterrupt even where pytest runs with SIGINT ignored (a background job of a
# non-interactive shell): an ignored signal is inherited through exec, Python then installs no handler for it, and
# a SIGINT does nothing (the status is 0, not 130).
USUAL_SIGINT = (
    "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
)
BOUND_S = 20  # a command signalled at a fault point ends well within this (the watchdog's grace is 3 s)


def script(name: str, *args: object) -> list[str]:
    """`python <name> <args>` run from the repository, with SIGINT handled as usual (USUAL_SIGINT)."""
    return [sys.executable, "-c", USUAL_SIGINT, name, *map(str, args)]


def start_at_fault(command: list[str], fault: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """Start `command` with KOALA_FAULT_POINT=`fault` and return (the process, its stderr so far) once it announces
    the last point `fault` names (or ends without reaching it)."""
    last = fault.split(",")[-1].partition(":")[0].partition("@")[0]
    proc = subprocess.Popen(
        command,
        cwd=ROOT,
        env={**(env or os.environ), FAULT_POINT_VARIABLE: fault},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    seen = []
    while (line := read_line(proc.stderr.fileno())) and line != f"fault point {last} reached\n":
        seen.append(line)
    return proc, "".join(seen) + line


def read_line(fd: int) -> str:
    """One line read from `fd` byte by byte: nothing after it is taken from the pipe (`communicate` reads the
    rest from the same file descriptor; a buffered reader could keep the lines that follow)."""
    data = b""
    while not data.endswith(b"\n") and (byte := os.read(fd, 1)):
        data += byte
    return data.decode()


@dataclass
class Ended:
    status: int
    out: str
    err: str
    seconds: float  # from the fault point's announcement to the exit


def stop_at_fault(
    command: list[str], fault: str, signals: tuple[int, ...] = (), env: dict[str, str] | None = None
) -> Ended:
    """Run `command` to the fault point `fault`, send it `signals` there (a user's Ctrl-C, a scheduler's SIGTERM)
    and wait for the end."""
    proc, err = start_at_fault(command, fault, env)
    reached = time.monotonic()
    for signum in signals:
        proc.send_signal(signum)
    out, rest = proc.communicate(timeout=300)
    return Ended(proc.returncode, out, err + rest, time.monotonic() - reached)


@pytest.fixture(scope="module")
def micro_json(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("teacher") / "micro.json"
    path.write_text(json.dumps(MICRO_TEACHER))
    return path


# ---------------------------------------------------------------- train.py: checks before anything is loaded


def train_command(workdir: Path, teacher: str, *overrides: str) -> list[str]:
    """`python train.py` on the micro config of tests/train_worker.py with teacher.source `teacher`."""
    return script(
        "train.py",
        "--config",
        "tests/train_worker.py",
        f"--config.workdir={workdir}",
        f"--config.teacher.source={teacher}",
        *overrides,
    )


def train_env(devices: int = 1) -> dict[str, str]:
    cache = Path(tempfile.gettempdir()) / "koala_jax_test_compile_cache"
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
    return {**os.environ, "XLA_FLAGS": flags, "JAX_COMPILATION_CACHE_DIR": str(cache)}


def test_train_mistakes_are_one_line_before_anything_is_loaded(tmp_path):
    """A missing teacher and data, a mesh larger than the devices (-1 resolved to data=0 before) and a zero
    batch: all four in one line, exit 1, and the workdir is never created."""
    workdir = tmp_path / "run"
    cmd = train_command(
        workdir,
        "/nonexistent/teacher",
        "--config.mesh.fsdp=4",
        "--config.data.global_batch_size=0",
        f"--config.data.source={tmp_path / 'no-data'}",
    )
    done = subprocess.run(cmd, cwd=ROOT, env=train_env(devices=2), capture_output=True, text=True, timeout=300)
    line = one_error_line(done.stderr)
    print(line)
    assert done.returncode == 1 and line.startswith("error: 4 problems:")
    for expected in (
        "/nonexistent/teacher",
        "mesh.fsdp=4: 4 does not divide the 2 device(s)",
        "global_batch_size 0",
        "no-data",
    ):
        assert expected in line
    assert not workdir.exists() and "student " not in done.stdout


def test_misspelt_key_names_the_flag_and_the_fix(tmp_path, micro_json):
    done = subprocess.run(
        train_command(tmp_path, f"random:{micro_json}", "--config.optim.lrr=1e-4"),
        cwd=ROOT,
        env=train_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    line = one_error_line(done.stderr)
    assert done.returncode == 1 and '--config.optim.lrr (Did you mean "lr"' in line, line


def fake_prepared_dataset(folder: Path, text_dim: int, pooled_dim: int) -> Path:
    """A prepared dataset of no records (the checks read only its metadata) for a teacher with `text_dim`-wide
    text embeddings."""
    from array_record.python import array_record_module

    folder.mkdir(parents=True)
    array_record_module.ArrayRecordWriter(str(folder / schema.shard_filename(0, 1)), "group_size:1").close()
    schema.write_tfds_metadata(str(folder), schema.record_features((4, 8, 8), text_dim, pooled_dim), [0])
    np.savez(
        folder / schema.NULL_EMBEDDINGS_FILE,
        prompt_embeds=np.zeros((77, text_dim)),
        pooled_prompt_embeds=np.zeros(pooled_dim),
    )
    return folder


def test_preflight_lists_every_problem_of_a_config(tmp_path, micro_json):
    cfg = micro_config(str(tmp_path / "run"), str(micro_json), steps=4)
    cfg.student.variant = "koala-9b"
    cfg.optim.grad_accum, cfg.data.global_batch_size = 2, 3
    cfg.ema.decay = 1.5
    cfg.data.source = str(fake_prepared_dataset(tmp_path / "sdxl-data", text_dim=2048, pooled_dim=1280))
    with pytest.raises(ConfigError) as e:
        check_run(cfg)
    print(e.value)
    message = str(e.value)
    assert message.startswith("4 problems:")
    assert "unknown student 'koala-9b'" in message and "ema.decay 1.5" in message
    assert "global_batch_size 3 does not split" in message and "use a multiple of 2" in message
    assert "was encoded for another teacher: text embedding width 2048 (the teacher takes 16)" in message
    assert not (tmp_path / "run").exists()


def test_preflight_tells_an_unfinished_preparation(tmp_path, micro_json):
    data = tmp_path / "half-prepared"
    data.mkdir()
    (data / schema.PREPARE_CONFIG_FILE).write_text("{}")
    cfg = micro_config(str(tmp_path / "run"), str(micro_json), steps=4)
    cfg.data.source = str(data)
    with pytest.raises(ConfigError, match="an unfinished preparation.*rerun the prepare_data.py"):
        check_run(cfg)


# ---------------------------------------------------------------- a saved micro run, without training


def save_micro_run(workdir: Path, variant: str = "koala-700m", steps: tuple[int, ...] = (1, 2)) -> None:
    """A train.py workdir with checkpoints of a micro student, written by the trainer's own Checkpointer
    (no step is trained: the faults are in the files)."""
    student = build_student(TEACHER, random_params(TEACHER, 0), variant, seed=1)
    state = init_state(student.params, optax.adamw(1e-3), 0, use_ema=True)
    loader = make_train_loader(
        SyntheticSource(16, (4, 8, 8), 4, 16, 8), global_batch_size=4, seed=0, process_index=0, process_count=1
    )
    checkpointer = Checkpointer(workdir, every=1, keep=10, async_save=False)
    for step in steps:
        state = state.replace(step=jax.numpy.asarray(step, jax.numpy.int32))
        checkpointer.save(step, state, loader)
    checkpointer.close()
    loader.close()
    write_student_config(workdir, student.config)


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("saved") / "run"
    save_micro_run(workdir)
    return workdir


@pytest.fixture
def run_copy(saved_run, tmp_path) -> Path:
    return Path(shutil.copytree(saved_run, tmp_path / "run"))


def damage_arrays(workdir: Path, step: int) -> None:
    for data_file in (workdir / "checkpoints" / str(step) / "state").rglob("d/*"):
        data_file.unlink()


def abstract_state(variant: str = "koala-700m", ema: bool = True):
    """The train state a run of `variant` restores into (shapes and a device; nothing allocated)."""
    student_config = student_architecture(TEACHER, variant)[0]
    params = jax.eval_shape(lambda: random_params(student_config, 0))
    state = jax.eval_shape(lambda p: init_state(p, optax.adamw(1e-3), 0, ema), params)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), state)


def micro_loader():
    return make_train_loader(
        SyntheticSource(16, (4, 8, 8), 4, 16, 8), global_batch_size=4, seed=0, process_index=0, process_count=1
    )


def test_resume_with_another_student_is_refused_before_anything_changes(run_copy, micro_json):
    """Before: the new variant's student_config.json overwrote the run's, then the restore failed."""
    before = snapshot(run_copy)
    cfg = micro_config(str(run_copy), str(micro_json), steps=4)
    cfg.student.variant = "koala-1b"
    with pytest.raises(ConfigError, match="holds checkpoints of another student.*mid_block_type None then"):
        check_run(cfg)
    assert snapshot(run_copy) == before


def test_restore_skips_a_damaged_newest_checkpoint_and_sets_it_aside(run_copy):
    damage_arrays(run_copy, 2)
    checkpointer, reports = Checkpointer(run_copy, every=1, keep=10), []
    step, state = checkpointer.restore_newest(abstract_state(), micro_loader(), reports.append)
    print("\n".join(reports))
    assert step == 1 and int(state.step) == 1
    assert "checkpoint step 2 is damaged" in reports[0] and (run_copy / "damaged_checkpoints" / "2").is_dir()
    assert checkpointer.manager.all_steps() == [1]  # so the run saves step 2 again


def test_missing_data_iterator_file_counts_as_damage(run_copy):
    (run_copy / "checkpoints" / "2" / "data" / "process_0-of-1.json").unlink()
    step, _ = Checkpointer(run_copy, every=1, keep=10).restore_newest(abstract_state(), micro_loader(), print)
    assert step == 1


def test_no_readable_checkpoint_is_one_error_and_moves_nothing(run_copy):
    for step in (1, 2):
        damage_arrays(run_copy, step)
    before = snapshot(run_copy)
    with pytest.raises(CheckpointError, match="no checkpoint in .* can be read .*step 2: .*step 1: .*nothing was"):
        Checkpointer(run_copy, every=1, keep=10).restore_newest(abstract_state(), micro_loader(), print)
    assert snapshot(run_copy) == before


def test_checkpoint_of_another_student_is_refused_by_name(run_copy):
    with pytest.raises(ConfigError, match="(?s)does not fit this run's student.*missing key 'mid_block"):
        Checkpointer(run_copy, every=1, keep=10).restore_newest(abstract_state("koala-1b"), micro_loader(), print)
    with pytest.raises(ConfigError, match="has its EMA params but ema.decay is None"):
        Checkpointer(run_copy, every=1, keep=10).restore_newest(abstract_state(ema=False), micro_loader(), print)


def test_save_without_disk_space_stops_before_writing(run_copy, monkeypatch):
    before = snapshot(run_copy)
    full = shutil.disk_usage(run_copy)._replace(free=1000)
    monkeypatch.setattr(checkpoint_module.shutil, "disk_usage", lambda path: full)
    checkpointer = Checkpointer(run_copy, every=1, keep=10, async_save=False)
    state = init_state({"w": jax.numpy.ones((64, 64))}, optax.adamw(1e-3), 0, use_ema=False)
    with pytest.raises(CheckpointError) as e:
        checkpointer.save(3, state, micro_loader())
    print(e.value)
    assert re.search(
        r"not enough disk space for checkpoint step 3: it needs about [\d.]+ MiB, 0.0 MiB free", str(e.value)
    )
    assert "newest complete checkpoint is step 2" in str(e.value) and snapshot(run_copy) == before


def test_unfinished_checkpoint_folders_are_removed(run_copy):
    leftover = run_copy / "checkpoints" / "3.orbax-checkpoint-tmp-1234"
    (leftover / "state").mkdir(parents=True)
    before = snapshot(run_copy)
    assert remove_unfinished(run_copy) == [leftover.name]
    assert not leftover.exists() and snapshot(run_copy) == before


def test_workdir_lock_refuses_a_second_run_and_reclaims_a_dead_ones(tmp_path):
    first, reports = WorkdirLock(tmp_path), []
    first.acquire(reports.append)
    with pytest.raises(ConfigError, match=f"in use by another train.py \\(process {os.getpid()} on"):
        WorkdirLock(tmp_path).acquire(reports.append)
    first.release()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / "train.lock").write_text(json.dumps({"pid": int(dead.stdout), "host": "here", "started": "then"}))
    again = WorkdirLock(tmp_path)
    again.acquire(reports.append)
    again.release()
    assert reports == [
        f"reclaimed {tmp_path / 'train.lock'}: process {dead.stdout.strip()} on here (started then) "
        "stopped without releasing it"
    ]


# ---------------------------------------------------------------- convert_weights.py


def test_export_uses_the_newest_readable_checkpoint(run_copy, tmp_path, capsys):
    damage_arrays(run_copy, 2)
    assert run("to-diffusers", "--checkpoint", run_copy, "--ema", "--out", tmp_path / "export") == 0
    err = capsys.readouterr().err
    assert "checkpoint step 2 is damaged" in err and "using step 1" in err
    assert "training steps (exported checkpoint): 1" in (tmp_path / "export" / "README.md").read_text()


def test_export_refuses_a_config_that_does_not_match_the_weights(run_copy, tmp_path, capsys):
    """Before: a run whose student_config.json was overwritten by another variant exported silently with a
    random mid block."""
    write_student_config(run_copy, student_architecture(TEACHER, "koala-1b")[0])
    assert run("to-diffusers", "--checkpoint", run_copy, "--out", tmp_path / "export") == 1
    line = one_error_line(capsys.readouterr().err)
    assert "does not match student_config.json" in line and "missing key 'mid_block.attentions.0" in line
    assert not (tmp_path / "export").exists()


@pytest.fixture(scope="module")
def params_dir(tmp_path_factory, micro_json) -> Path:
    out = tmp_path_factory.mktemp("params") / "micro"
    assert run("to-jax", "--src", f"random:{micro_json}", "--out", out) == 0
    return out


@pytest.mark.parametrize("damage", ["arrays", "metadata"])
def test_damaged_params_dir_is_one_line(params_dir, tmp_path, capsys, damage):
    broken = Path(shutil.copytree(params_dir, tmp_path / "broken"))
    if damage == "arrays":
        for data_file in (broken / "params").rglob("d/*"):
            data_file.unlink()
    else:
        (broken / "params" / "_METADATA").unlink()
    assert run("to-diffusers", "--checkpoint", broken, "--out", tmp_path / "out") == 1
    assert "damaged JAX params dir" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.tmp-*"))


def unet_folder_with(folder: Path, key: str, value: float) -> Path:
    """A diffusers U-Net folder of the micro teacher whose tensor `key` holds `value` (valid file otherwise)."""
    from diffusers import UNet2DConditionModel as TorchUNet

    model = randomize_(TorchUNet(**MICRO_TEACHER))
    state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    state[key].reshape(-1)[3] = value
    folder.mkdir()
    save_file(state, folder / "diffusion_pytorch_model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(dict(model.config)))
    return folder


def test_fp16_overflow_and_nan_bytes_are_refused_by_tensor_name(tmp_path, capsys):
    big = unet_folder_with(tmp_path / "big", "conv_in.weight", 1e6)
    assert run("to-diffusers", "--checkpoint", big, "--dtype", "fp16", "--out", tmp_path / "half") == 1
    assert "'conv_in.weight' overflows float16: |value| up to 1e+06 > 6.55e+04" in capsys.readouterr().err
    nan = unet_folder_with(tmp_path / "nan", "conv_out.bias", float("nan"))
    for command in ("to-jax", "to-diffusers"):
        flag = "--src" if command == "to-jax" else "--checkpoint"
        assert run(command, flag, nan, "--out", tmp_path / command) == 1
        assert "'conv_out.bias' has 1 NaN and 0 Inf values" in one_error_line(capsys.readouterr().err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big", "nan"]  # no output, no temporary left


def test_nan_in_a_vae_is_refused_by_tensor_name(components, tmp_path):
    """The VAE and text encoders of a pipeline folder (JAX sampling, --backend jax preparation) are checked too."""
    from koala_jax.weights.checks import BadValuesError
    from koala_jax.weights.pipeline_dir import read_vae
    from koala_jax.weights.safetensors import load_file

    vae = Path(shutil.copytree(components / "vae", tmp_path / "vae"))
    state = {k: np.array(v) for k, v in load_file(vae / "diffusion_pytorch_model.safetensors").items()}
    state["decoder.conv_out.bias"][0] = np.inf
    save_file(state, vae / "diffusion_pytorch_model.safetensors")
    with pytest.raises(BadValuesError, match="'decoder.conv_out.bias' has 0 NaN and 1 Inf values"):
        read_vae(vae)


def test_the_jax_pipelines_down_cast_refuses_an_overflow_by_name():
    """`sample.py --backend jax --dtype fp16` and the JAX encoders cast the weights they load."""
    from koala_jax.data.encoders_jax import cast
    from koala_jax.weights.checks import BadValuesError

    params = {"conv_in": {"kernel": np.array([1.0, -7e4], np.float32)}, "ok": {"bias": np.ones(2, np.float32)}}
    with pytest.raises(BadValuesError, match="'conv_in/kernel' overflows float16: \\|value\\| up to 7e\\+04"):
        cast(params, np.float16)
    assert cast(params, np.float32)["conv_in"]["kernel"][1] == -7e4  # the same values fit float32


@pytest.fixture
def old_output(params_dir, tmp_path) -> Path:
    """An output that `to-jax --overwrite` is to replace: an interrupted replacement must leave it as it was."""
    return Path(shutil.copytree(params_dir, tmp_path / "out"))


def to_jax_over(out: Path, micro_json: Path) -> list[str]:
    return script("convert_weights.py", "to-jax", "--src", f"random:{micro_json}", "--out", out, "--overwrite")


# The watchdog never ends these commands by itself: what they do after the first signal is left to them, however
# slow the loaded machine.
PATIENT = {**os.environ, GRACE_VARIABLE: "600"}


def assert_left_as_it_was(out: Path, before: dict[str, str]) -> None:
    """`out` unchanged, and nothing else beside it (no `<out>.tmp-*` or `<out>.old-*`)."""
    assert snapshot(out) == before and [p.name for p in out.parent.iterdir()] == [out.name]


def assert_clean_end(ended: Ended, status: int, message: str) -> None:
    """Exit `status` within BOUND_S, one `error:` line starting with `message`, no traceback nor orbax log."""
    line = one_error_line(ended.err)
    print(line, f"(exit {ended.status}, {ended.seconds:.1f} s after the fault point)")
    assert ended.status == status and line.startswith(f"error: {message}"), ended.err[-3000:]
    assert "ERROR:" not in ended.err and "FATAL" not in ended.err and ended.seconds < BOUND_S, ended


@pytest.mark.parametrize(
    "fault, status, message",
    [
        ("params_dir.save:SIGTERM", TERMINATED_STATUS, "terminated (SIGTERM)"),  # orbax's save has begun
        ("params_dir.write_array@2:SIGINT", INTERRUPTED_STATUS, "interrupted"),  # in orbax's writer thread
    ],
)
def test_a_signal_during_a_write_leaves_no_temporary_output(old_output, micro_json, fault, status, message):
    """Before: orbax tracebacks on 3 of 13 SIGTERMs, an abort (`FATAL: exception not rethrown`) on 1 of 12 Ctrl-Cs,
    a temporary folder left by about half the runs (and the test raced a timer). Now orbax's save completes, then
    the signal ends the command: the temporary folder is removed and the old output is kept."""
    before = snapshot(old_output)
    assert_clean_end(stop_at_fault(to_jax_over(old_output, micro_json), fault, env=PATIENT), status, message)
    assert_left_as_it_was(old_output, before)


def test_a_second_ctrl_c_stops_the_converter_at_once(old_output, micro_json):
    """The first Ctrl-C waits for orbax's save, held here in its writer thread; the second ends the process on the
    spot, still removing the temporary folder."""
    before = snapshot(old_output)
    fault = "params_dir.save:SIGINT,params_dir.write_array:pause"
    ended = stop_at_fault(to_jax_over(old_output, micro_json), fault, (signal.SIGINT,), PATIENT)
    assert_clean_end(ended, INTERRUPTED_STATUS, "interrupted again: stopped at once")
    assert_left_as_it_was(old_output, before)


def stuck_command(name: str, micro_json: Path, out: Path) -> tuple[list[str], str]:
    """(command, its fault point inside a long native call: orbax's save, or the sampler, where XLA compiles)."""
    tiny = ("--backend", "jax", "--steps", "1", "--out", out)
    return {
        "convert": (to_jax_over(out, micro_json), "params_dir.save"),
        "sample": (script("sample.py", "--model", TINY_PIPELINE, "--prompt", "x", *tiny), "euler_sample"),
        "evaluate": (script("evaluate.py", "--model", f"t={TINY_PIPELINE}", "--seeds", "0", *tiny), "euler_sample"),
    }[name]


@pytest.mark.parametrize(
    "name, signum, status, message",
    [
        ("convert", signal.SIGTERM, TERMINATED_STATUS, "terminated (SIGTERM): stopped at once"),
        ("sample", signal.SIGINT, INTERRUPTED_STATUS, "interrupted: stopped at once"),
        ("evaluate", signal.SIGTERM, TERMINATED_STATUS, "terminated (SIGTERM): stopped at once"),
    ],
)
def test_a_signal_ends_a_command_stuck_in_a_native_call(old_output, micro_json, name, signum, status, message):
    """Before: a signal waited for the native call to return (an XLA compile: 48 s; sample.py ignored SIGTERM for
    more than 4 s). Python handlers cannot run then; the runner's watchdog thread ends the command 3 s after the
    signal with the usual status, and removes its temporary output."""
    before = snapshot(old_output)
    command, point = stuck_command(name, micro_json, old_output)
    assert_clean_end(stop_at_fault(command, f"{point}:stuck", (signum,)), status, message)
    assert_left_as_it_was(old_output, before)  # sample.py's and evaluate.py's --out: nothing written into it


@pytest.mark.parametrize("when", ["before", "during"])
def test_to_jax_on_a_full_disk_is_one_line(micro_json, tmp_path, monkeypatch, capsys, when):
    """Before: over 400 lines and 33-41 tracebacks, and no `error:` line. Now the params are refused before writing
    when they cannot fit, and a disk that fills up during orbax's write is one line as well (orbax's own logging of
    it is silenced); no output is left. orbax's other writes may still land in the temporary folder after it is
    removed: the next run removes what they left."""
    exports = tmp_path / "exports"
    out = exports / "tj"
    needed = 4 * param_count(TEACHER)  # float32
    command = ("to-jax", "--src", f"random:{micro_json}", "--out", out)
    if when == "before":
        monkeypatch.setattr(files_module, "free_bytes", lambda path: 1000)
        assert run(*command) == 1
        err = capsys.readouterr().err
    else:
        ended = stop_at_fault(script("convert_weights.py", *command), "params_dir.write_array@2:ENOSPC")
        assert ended.status == 1 and "ERROR:" not in ended.err, ended.err[-3000:]
        err = ended.err
    line = one_error_line(err)
    assert line.startswith(f"error: {out}: ") and re.search(r"needs ([\d,]+) bytes, [\d,]+ bytes free", line), line
    assert int(re.search(r"needs ([\d,]+) bytes", line)[1].replace(",", "")) >= needed, line
    assert not out.exists() and all(
        p.name.startswith("tj.tmp-") for p in (exports.iterdir() if exports.exists() else [])
    )
    monkeypatch.undo()
    assert run(*command) == 0 and [p.name for p in exports.iterdir()] == ["tj"]


def test_leftovers_of_a_killed_converter_are_cleaned_by_the_next_run(params_dir, tmp_path, capsys):
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True).stdout)
    out = tmp_path / "out"
    (tmp_path / f"out.tmp-{dead}-0123abcd").mkdir()  # killed while writing
    old = tmp_path / f"out.old-{dead}-4567cdef"  # killed between moving the old output aside and renaming the new
    old.mkdir()
    (old / "model").write_text("the previous export")
    living = tmp_path / f"out.tmp-{os.getpid()}-89abcdef"  # a live writer's: never touched
    living.mkdir()
    assert run("to-diffusers", "--checkpoint", params_dir, "--out", out) == 1  # the restored output exists
    err = capsys.readouterr().err
    assert f"restored {out} from {old.name}" in err and f"removed {tmp_path / f'out.tmp-{dead}-0123abcd'}" in err
    assert (out / "model").read_text() == "the previous export" and living.is_dir()
    assert "already exists" in one_error_line(err)


# ---------------------------------------------------------------- prepare_data.py and sample.py


def prepare(*argv: object) -> int:
    return prepare_cli.main([str(a) for a in argv])


def test_prepare_mistakes_leave_no_output_and_the_corrected_command_runs(components, images, tmp_path, capsys):
    """Before: prepare_config.json was written first, and the corrected command was refused."""
    out = tmp_path / "prepared"
    common = ("--input", images, "--output-dir", out, "--num-threads", "1")
    assert prepare(*common, "--teacher", tmp_path / "typo", "--resolution", "32") == 1
    assert "no such folder" in one_error_line(capsys.readouterr().err)
    assert (
        prepare(
            *common,
            "--teacher",
            components,
            "--resolution",
            "0",
            "--records-per-shard",
            "0",
            "--task-index",
            "2",
            "--task-count",
            "2",
        )
        == 1
    )
    line = one_error_line(capsys.readouterr().err)
    assert "records_per_shard 0" in line and "resolution 0" in line and "task_index 2 not in [0, 2)" in line
    assert prepare(*common, "--teacher", components, "--resolution", "33") == 1
    assert "not a multiple of the teacher VAE's factor 2" in one_error_line(capsys.readouterr().err)
    for table, problem in (
        ('a,b\n"x,1\n', "not a readable table"),
        ("", "not a readable table"),
        ("image,caption\n", "has no rows"),
    ):
        (tmp_path / "t.csv").write_text(table)
        assert prepare("--input", tmp_path / "t.csv", "--output-dir", out, "--teacher", components) == 1
        assert problem in one_error_line(capsys.readouterr().err)
    assert not out.exists()
    assert prepare(*common, "--teacher", components, "--resolution", "32") == 0  # the corrected command
    assert "3 kept" in capsys.readouterr().out
    before = snapshot(out)
    assert prepare(*common, "--teacher", components, "--resolution", "16") == 1  # resume with other settings
    assert "prepared with other settings (resolution: 32 then, 16 now)" in one_error_line(capsys.readouterr().err)
    assert snapshot(out) == before


def test_sample_mistakes_are_one_line(components, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("")
    args = ["--model", str(components), "--prompt", "x"]
    assert (
        sample_cli.main(
            [*args, "--steps", "0", "--height", "-8", "--width", "33", "--images-per-prompt", "0", "--out", str(afile)]
        )
        == 1
    )
    line = one_error_line(capsys.readouterr().err)
    for expected in (
        "--steps 0",
        "--height -8",
        "--width 33 is not a multiple of the VAE's factor 2",
        "--images-per-prompt 0",
        "is a file, not a folder",
    ):
        assert expected in line
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    for prompts, problem in (("missing.txt", "no such file"), ("latin1.txt", "not UTF-8 text (byte 3")):
        assert sample_cli.main(["--model", str(components), "--prompts-file", str(tmp_path / prompts)]) == 1
        assert problem in one_error_line(capsys.readouterr().err)
    assert afile.read_text() == ""


# ---------------------------------------------------------------- train.py as a process (slow)


def train_to_fault(workdir: Path, teacher: Path, fault: str, *overrides: str) -> Ended:
    """train.py on the micro teacher, with KOALA_FAULT_POINT=`fault` (`train.step@3:SIGINT`: Ctrl-C once step 3
    is done), to its end."""
    return stop_at_fault(train_command(workdir, f"random:{teacher}", *overrides), fault, env=train_env())


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory, micro_json):
    """A CLI run stopped by Ctrl-C at step 3 of 50 (checkpoints every 2 steps): (workdir, how it ended)."""
    workdir = tmp_path_factory.mktemp("interrupted") / "run"
    ended = train_to_fault(
        workdir, micro_json, "train.step@3:SIGINT", "--config.total_steps=50", "--config.ckpt.every=2"
    )
    return workdir, ended


@pytest.mark.slow
def test_ctrl_c_during_training_saves_and_exits_cleanly(interrupted):
    """Before: three tracebacks, and the save in flight was abandoned."""
    workdir, ended = interrupted
    print(ended.out.splitlines()[-3], f"(exit {ended.status})")
    assert ended.status == 0 and "Traceback" not in ended.err and "stopped by SIGINT at step 3/" in ended.out
    assert Checkpointer(workdir, every=2, keep=3).latest_step() == 3


@pytest.mark.slow
def test_a_second_ctrl_c_during_a_checkpoint_save_stops_at_once(tmp_path, micro_json):
    """Before: the second Ctrl-C, 0.3 s after the first, was swallowed with a fragment of traceback. Now it ends
    the run on the spot (status 130) while the save of step 3 is in flight; step 2's checkpoint is kept."""
    workdir = tmp_path / "run"
    fault = "train.step@3:SIGINT,checkpoint.saving@3:SIGINT"  # saves of steps 1 (the first), 2, then 3 (the stop)
    ended = train_to_fault(workdir, micro_json, fault, "--config.total_steps=50", "--config.ckpt.every=2")
    assert ended.status == INTERRUPTED_STATUS and "Traceback" not in ended.err, ended.err[-3000:]
    line = one_error_line(ended.err)
    print(line, f"(exit {ended.status}, {ended.seconds:.1f} s after the fault point)")
    assert line == f"error: {INTERRUPTED_AGAIN}"  # the same line whether the loop or the runner's watchdog stops it
    assert Checkpointer(workdir, every=2, keep=3).manager.all_steps()[:2] == [1, 2]


@pytest.mark.slow
def test_resume_with_another_variant_changes_nothing(interrupted, tmp_path, micro_json):
    workdir = Path(shutil.copytree(interrupted[0], tmp_path / "run"))
    before = snapshot(workdir)
    done = subprocess.run(
        train_command(workdir, f"random:{micro_json}", "--config.student.variant=koala-1b", "--config.total_steps=50"),
        cwd=ROOT,
        env=train_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1 and "holds checkpoints of another student" in one_error_line(done.stderr)
    assert snapshot(workdir) == before


@pytest.mark.slow
def test_resume_from_a_damaged_newest_checkpoint_uses_the_newest_good_one(interrupted, tmp_path, micro_json):
    """Before: a tensorstore traceback, and older good checkpoints were never tried."""
    workdir = Path(shutil.copytree(interrupted[0], tmp_path / "run"))
    older, newest = Checkpointer(workdir, every=2, keep=3).manager.all_steps()[-2:]
    damage_arrays(workdir, newest)
    (workdir / "checkpoints" / f"{newest + 1}.orbax-checkpoint-tmp-7").mkdir()  # a save cut short
    ended = train_to_fault(
        workdir, micro_json, "train.step@1:SIGTERM", "--config.total_steps=50", "--config.ckpt.every=2"
    )
    seen = ended.out + ended.err
    print(seen)
    assert f"removed {newest + 1}.orbax-checkpoint-tmp-7" in seen and f"checkpoint step {newest} is damaged" in seen
    assert f"resumed from step {older}" in seen and (workdir / "damaged_checkpoints" / str(newest)).is_dir()


@pytest.mark.slow
def test_a_second_train_on_a_workdir_is_refused_and_a_killed_ones_lock_reclaimed(tmp_path, micro_json):
    """Before: no lock; the second run deleted and rewrote the first's checkpoints."""
    workdir = tmp_path / "run"
    first, _ = start_at_fault(  # it holds the workdir, paused after step 3
        train_command(workdir, f"random:{micro_json}", "--config.total_steps=100", "--config.ckpt.every=2"),
        "train.step@3:pause",
        env=train_env(),
    )
    second = subprocess.run(
        train_command(workdir, f"random:{micro_json}", "--config.total_steps=100000"),
        cwd=ROOT,
        env=train_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    line = one_error_line(second.stderr)
    assert second.returncode == 1 and f"in use by another train.py (process {first.pid}" in line
    assert "student " not in second.stdout and first.poll() is None  # it stopped before loading anything
    first.kill()  # kill -9: the lock file still names it
    first.communicate()
    third = subprocess.run(  # total_steps=1 is behind the checkpoints: it resumes and ends at once
        train_command(workdir, f"random:{micro_json}", "--config.total_steps=1"),
        cwd=ROOT,
        env=train_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert third.returncode == 0, third.stderr[-3000:]
    assert f"process {first.pid} on" in third.stdout and "stopped without releasing it" in third.stdout


@pytest.mark.slow
def test_disk_full_during_an_async_save_stops_with_one_line(tmp_path, micro_json):
    """Writes fail from the third save on (step 4, after those of steps 1 and 2; a file size limit stands in for a
    full disk). Before: training
    went on, ~8,000 lines of tracebacks at the next save, and *.orbax-checkpoint-tmp stayed."""
    workdir = tmp_path / "run"
    ended = train_to_fault(
        workdir, micro_json, "checkpoint.save@3:EFBIG", "--config.total_steps=1000", "--config.ckpt.every=2"
    )
    line = one_error_line(ended.err)
    print(line, f"({len(ended.err.splitlines())} line(s) of stderr)")
    assert ended.status == 1 and "checkpoint step 4" in line and "failed: File too large" in line
    assert "newest complete checkpoint is step 2" in line
    assert ended.err.splitlines() == ["fault point checkpoint.save reached", line]
    assert Checkpointer(workdir, every=2, keep=3).manager.all_steps() == [1, 2]
    assert not list((workdir / "checkpoints").glob("*.orbax-checkpoint-tmp*"))
