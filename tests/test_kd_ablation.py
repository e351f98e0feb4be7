"""benchmarks/kd_ablation.py: its settings select the features they name; --quick trains, evaluates and tabulates
one seed of a few settings. No result is asserted (which setting wins is the benchmark's finding,
docs/kd_ablation.md), only the table's shape."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from koala_jax.train.setup import describe_models
from koala_jax.train.step_builder import make_models, step_settings

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
    models = describe_models(base.teacher.source, base.student.variant)
    known = {s.name: s for s in kd.settings(base.teacher.source, base.student.variant)}
    data = {"mixed": "m", "short": "s", "rich": "r"}

    def pairs(name: str) -> set[str]:
        cfg = kd.run_config(args, known[name], 0, data)
        return set(make_models(step_settings(cfg).opts, cfg.kd.feature_regex, models)[2])

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


def flat(cfg) -> dict:
    """A config as {dotted key: value}."""
    out = {}
    for key, value in cfg.items():
        if hasattr(value, "items"):
            out.update({f"{key}.{k}": v for k, v in flat(value).items()})
        else:
            out[key] = value
    return out


def test_main_schedule_sa_is_the_main_job():
    """`--schedule main` keeps configs/tiny.py's training schedule (steps, lr, batch, logging, checkpoints): `sa`
    seed 0 differs from the main job only in where it runs and keeps data and in being evaluated afterwards, so its
    seeds are the main job's seeds; `sa-norm` / `lf-norm` add only kd.feat_norm='teacher'."""
    kd = load_ablation()
    args = kd.parse_args(["--schedule", "main"])
    base = kd.load_base_config()
    known = {s.name: s for s in kd.settings(base.teacher.source, base.student.variant)}
    assert args.steps == base.total_steps and args.eval_seeds == [0, 1, 2, 3] and args.eval_steps == 20
    data = {"mixed": "m"}
    sa = flat(kd.run_config(args, known["sa"], 0, data))
    differ = {k for k, v in flat(base).items() if sa[k] != v}
    assert differ == {"workdir", "data.source", "ckpt.keep", "eval.prompts"}, differ
    for name, plain in (("sa-norm", "sa"), ("lf-norm", "lf")):
        normed, other = (
            flat(kd.run_config(args, known[name], 0, data)),
            flat(kd.run_config(args, known[plain], 0, data)),
        )
        assert {k for k in normed if normed[k] != other[k]} == {"kd.feat_norm", "workdir"}
        assert normed["kd.feat_norm"] == "teacher" and other["kd.feat_norm"] == "none"
    short = kd.run_config(kd.parse_args([]), known["sa"], 0, data)
    assert short.total_steps == 150 and short.workdir != sa["workdir"]


def test_runs_go_seed_by_seed_and_skip_finished_ones():
    kd = load_ablation()
    args = kd.parse_args(["--schedule", "main"])
    base = kd.load_base_config()
    chosen = kd.chosen_settings(args, base)
    assert [s.name for s in chosen] == ["sa", "lf", "sa-norm", "lf-norm", "none", "res", "ffn", "ca"]
    done = [{"setting": "sa", "seed": 0}, {"setting": "lf", "seed": 1}]
    todo = [(s.name, seed) for s, seed in kd.pending(chosen, [0, 1, 2], done)]
    assert len(todo) == 22 and todo[:2] == [("lf", 0), ("sa-norm", 0)] and todo[7:9] == [("sa", 1), ("sa-norm", 1)]
    assert all(seed == 0 for _, seed in todo[:7]) and ("sa", 0) not in todo and ("lf", 1) not in todo


def test_results_file_resumes_only_the_same_schedule(tmp_path):
    """A results file of the same schedule and evaluation is resumed; one from before resuming existed (no
    `schedule`) starts over; one of another schedule or evaluation is refused, not overwritten."""
    kd = load_ablation()
    args = kd.parse_args(["--schedule", "main"])
    header = kd.results_header(args)
    path = tmp_path / "kd_ablation_main.json"
    assert kd.finished_results(path, header) == ([], {})
    entries, teachers = [{"setting": "sa", "seed": 0, "all": 0.5}], {"t": {"all": 0.8}}
    path.write_text(json.dumps({"steps": 150, "entries": entries, "teachers": teachers}))
    assert kd.finished_results(path, header) == ([], {})
    path.write_text(json.dumps({**header, "entries": entries, "teachers": teachers}))
    assert kd.finished_results(path, header) == (entries, teachers)
    path.write_text(json.dumps({**header, "eval_seeds": [0, 1], "entries": entries, "teachers": teachers}))
    with pytest.raises(SystemExit, match="pass another --out"):
        kd.finished_results(path, header)


def test_binomial_error_and_feature_share():
    kd = load_ablation()
    assert kd.with_binomial_error({"all": 0.25, "n": 48.0})["all_se"] == 0.0625  # sqrt(0.25 * 0.75 / 48)
    history = [{"total": 9.0, "task": 1.0}, {"total": 2.0, "task": 0.5, "out_kd": 0.5, "feat_kd": 0.5, "step": 8}]
    assert kd.final_losses(history, 2.0) == {
        "total": 2.0,
        "task": 0.5,
        "out_kd": 0.5,
        "feat_kd": 0.5,
        "feat_share": 0.5,
    }


@pytest.mark.slow
def test_quick_main_schedule_evaluates_rich_prompts_and_resumes(tmp_path):
    """--quick --schedule main: one entry with the main schedule's metrics (rich prompts, binomial error, feature
    share); a rerun finds it in the results and runs nothing, leaving the file as it was."""
    argv = [sys.executable, "benchmarks/kd_ablation.py", "--quick", "--schedule", "main", "--settings", "sa-norm"]
    argv += ["--out", str(tmp_path), "--work", str(tmp_path / "work")]
    out = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    written = (tmp_path / "kd_ablation_main.json").read_text()
    (entry,) = json.loads(written)["entries"]
    assert (entry["setting"], entry["seed"], entry["schedule"]) == ("sa-norm", 0, "main")
    assert {"all", "all_se", "colour_shape", "feat_kd", "feat_share", "rich_position", "rich_relation"} <= set(entry)
    again = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "1 (setting, seed) already in the results, 0 to run" in again.stdout
    assert (tmp_path / "kd_ablation_main.json").read_text() == written
