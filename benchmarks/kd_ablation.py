"""KOALA's lessons in miniature: which KD setting should a user pick? Trains the tiny-world student
(configs/tiny.py: the shipped teacher, a KOALA-700M-style student) under each setting with everything else
equal (steps, data, training seeds), evaluates every student beside its teacher (evaluate.py's evaluation: the
detector's attribute accuracy and the agreement with the teacher from the same noise), and writes a table with
the mean and spread over the training seeds.

    python benchmarks/kd_ablation.py          # every setting, seeds 0,1,2: docs/kd_ablation.md (~2 h, 2-core CPU)
    python benchmarks/kd_ablation.py --settings none,lf,sa --seeds 0          # some settings, one seed
    python benchmarks/kd_ablation.py --quick                  # one seed of a few settings, a few minutes

Settings (`SETTINGS`): feature KD none (task + output KD only), BK-SDM's last feature of each stage (lf),
self-attention (sa), cross-attention (ca), feed-forward (ffn), resnet (res), sa+ca; SA restricted to encoder /
decoder stages and to the first / last block of each transformer stack; lambda_feat 0.1 / 10 for SA (1 is `sa`);
short vs rich training captions (evaluated on rich prompts, as is `sa-mixed`, the same student on the default
mixed captions); and a step-distilled teacher (configs/tiny_world_lightning.py) against the original, both
students sampled in 4 trailing Euler steps without guidance (settings `sa-4step` and `sa-lightning`; the latter
needs assets/tiny_world/lightning_4step and is skipped, with a message, without it), and `sa-lightning-grid`, the
same with training timesteps restricted to the 4 the step-distilled teacher was trained on (which timesteps
KOALA trained on against its step-distilled teachers is not known: docs/paper.md).

Data are encoded once per caption style into <work>/data/ and shared by every run. Each run's workdir is
<work>/runs/<setting>-s<seed> (--work, default runs/kd_ablation); settings that only evaluate differently
(`sa-mixed`, `sa-4step`) evaluate the `sa` runs; a rerun skips finished runs (delete the folder to redo one).
Writes <out>/kd_ablation.json (one entry per (setting, seed): `setting`, `seed`, the final training losses and
every metric evaluate.py reports) and kd_ablation.md (mean +- standard deviation per setting); the default --out
is benchmarks/results/.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import ml_collections

from koala_jax.evaluation.generators import evaluate_beside_teacher
from koala_jax.evaluation.report import markdown_table, write_json
from koala_jax.pipelines.euler import EulerSchedule
from koala_jax.pipelines.sampling import Settings
from koala_jax.students import derive_student_config
from koala_jax.train.setup import prepare_on_the_fly
from koala_jax.weights import source_config
from koala_jax.weights.pipeline_dir import default_image_size

ROOT = Path(__file__).resolve().parent.parent
BASE_CONFIG = ROOT / "configs" / "tiny.py"
LIGHTNING_TEACHER = "assets/tiny_world/lightning_4step"
FEW_STEPS = {"steps": 4, "guidance": 1.0, "scheduler": "euler-trailing"}
# The timesteps of 4 trailing Euler steps (999, 749, 499, 249): the only ones the step-distilled teacher learnt.
FEW_STEP_GRID = tuple(int(t) for t in EulerSchedule(timestep_spacing="trailing").timesteps(FEW_STEPS["steps"]))
QUICK = ("none", "sa", "lf")
METRICS = ("all", "colour_shape", "psnr_db", "latent_mse", "task", "feat_kd")


@dataclasses.dataclass(frozen=True)
class Setting:
    """One row of the ablation: config overrides (dotted keys) and how the result is evaluated."""

    name: str
    overrides: dict[str, Any]
    prompts: str = "world-single"
    sampling: dict[str, Any] = dataclasses.field(default_factory=dict)  # eval.steps / guidance / scheduler
    trained_as: str | None = None  # the setting whose runs this one evaluates (same training, other evaluation)

    @property
    def runs(self) -> str:
        return self.trained_as or self.name


def last_block_regex(teacher_source: str, variant: str) -> str:
    """A feature regex for the last transformer block of each of the student's transformer stacks."""
    teacher, _ = source_config(teacher_source)
    student = derive_student_config(teacher, variant)
    stacks = [(f"down_blocks.{i}", student.down_depths(i)) for i in range(len(student.down_block_types))]
    stacks += [(f"up_blocks.{i}", student.up_depths(i)) for i in range(len(student.up_block_types))]
    alternatives = [
        rf"{re.escape(block)}\.attentions\.{j}\.transformer_blocks\.{depth - 1}\."
        for block, depths in stacks
        for j, depth in enumerate(depths)
        if depth
    ]
    return "|".join(alternatives)


def settings(teacher: str, variant: str) -> list[Setting]:
    sa = {"kd.features": ("attn1",)}
    return [
        Setting("none", {"kd.feat": 0.0}),
        Setting("lf", {"kd.features": ("stage",)}),
        Setting("sa", sa),
        Setting("ca", {"kd.features": ("attn2",)}),
        Setting("ffn", {"kd.features": ("ff",)}),
        Setting("res", {"kd.features": ("resnet",)}),
        Setting("sa+ca", {"kd.features": ("attn1", "attn2")}),
        Setting("sa-encoder", {**sa, "kd.feature_regex": r"^down_blocks\."}),
        Setting("sa-decoder", {**sa, "kd.feature_regex": r"^up_blocks\."}),
        Setting("sa-first", {**sa, "kd.feature_regex": r"\.transformer_blocks\.0\."}),
        Setting("sa-last", {**sa, "kd.feature_regex": last_block_regex(teacher, variant)}),
        Setting("sa-w0.1", {**sa, "kd.feat": 0.1}),
        Setting("sa-w10", {**sa, "kd.feat": 10.0}),
        Setting("sa-mixed", sa, prompts="world-rich", trained_as="sa"),
        Setting("sa-short", {**sa, "data.source": "short"}, prompts="world-rich"),
        Setting("sa-rich", {**sa, "data.source": "rich"}, prompts="world-rich"),
        Setting("sa-4step", sa, sampling=FEW_STEPS, trained_as="sa"),
        Setting("sa-lightning", {**sa, "teacher.source": LIGHTNING_TEACHER}, sampling=FEW_STEPS),
        Setting(
            "sa-lightning-grid",
            {**sa, "teacher.source": LIGHTNING_TEACHER, "noise.timesteps": FEW_STEP_GRID},
            sampling=FEW_STEPS,
        ),
    ]


def load_base_config() -> ml_collections.ConfigDict:
    spec = importlib.util.spec_from_file_location("tiny_world_config", BASE_CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def caption_style(cfg: ml_collections.ConfigDict, override: str | None) -> str:
    """The caption style a run trains on: the override ('short', 'rich') or the base config's `world:N:<style>`."""
    return override or cfg.data.source.split(":")[2]


def run_config(args, setting: Setting, seed: int, data_dirs: dict[str, str]) -> ml_collections.ConfigDict:
    cfg = load_base_config()
    overrides = dict(setting.overrides)
    cfg.data.source = data_dirs[caption_style(cfg, overrides.pop("data.source", None))]
    for key, value in overrides.items():
        group, _, name = key.rpartition(".")
        (cfg[group] if group else cfg)[name] = value
    cfg.workdir = str(Path(args.work) / "runs" / f"{setting.runs}-s{seed}")
    cfg.seed = seed
    cfg.total_steps = args.steps
    cfg.log_every = max(1, args.steps // 4)
    cfg.ckpt.every = args.steps
    cfg.ckpt.keep = 1
    cfg.eval.prompts = ""  # evaluated below, every student of a teacher together
    return cfg


def prepare_data(args, styles: set[str]) -> dict[str, str]:
    """One encoded dataset per caption style, shared by every run (the teacher's JAX encoders)."""
    base = load_base_config()
    records = int(base.data.source.split(":")[1]) if not args.quick else 128
    dirs = {}
    for style in sorted(styles):
        data = ml_collections.ConfigDict(base.data.to_dict())
        data.source = f"world:{records}:{style}"
        dirs[style] = prepare_on_the_fly(data, str(Path(args.work) / "data" / style), base.teacher.source)
    return dirs


def train_run(cfg: ml_collections.ConfigDict) -> dict[str, float]:
    """Train (unless a finished run is there) and return the last logged losses."""
    summary_file = Path(cfg.workdir) / "ablation_losses.json"
    if summary_file.exists():
        return json.loads(summary_file.read_text())
    from koala_jax.train.loop import train  # Heavy: only when a run trains.

    result = train(cfg)
    if result["stopped"]:
        raise SystemExit(f"stopped by {result['stopped']}: rerun the same command to go on")
    last = {k: float(v) for k, v in result["history"][-1].items() if k in ("total", "task", "out_kd", "feat_kd")}
    summary_file.write_text(json.dumps(last))
    return last


def evaluate_group(args, teacher: str, runs: list[tuple[Setting, int, str]]) -> dict[str, dict[str, float]]:
    """Every student of one teacher, sampled alike, beside that teacher: {workdir: metrics}."""
    setting = runs[0][0]
    sampling = {"steps": args.eval_steps, "guidance": 5.0, "scheduler": "euler", **setting.sampling}
    size = default_image_size(teacher)
    settings_ = Settings(sampling["steps"], sampling["guidance"], sampling["scheduler"], size, size)
    students = {workdir: workdir for _, _, workdir in runs}
    result = evaluate_beside_teacher(
        teacher, None, students, settings_, setting.prompts, args.eval_seeds, batch_size=32
    )
    metrics = {row.pop("model"): row for row in result.report().rows()}  # accuracy and agreement per model
    return {"teacher": {**metrics.pop("teacher"), **sampling, "prompts": setting.prompts}, **metrics}


def mean_and_spread(values: list[float]) -> str:
    finite = [v for v in values if v == v]
    if not finite:
        return "n/a"
    mean = statistics.fmean(finite)
    spread = statistics.stdev(finite) if len(finite) > 1 else 0.0
    return f"{mean:.3f} +- {spread:.3f}"


def table(entries: list[dict[str, Any]], teachers: dict[str, dict[str, Any]]) -> str:
    rows = []
    for name in dict.fromkeys(e["setting"] for e in entries):
        group = [e for e in entries if e["setting"] == name]
        teacher = teachers[group[0]["teacher_key"]]
        rows.append(
            {
                "setting": name,
                "seeds": len(group),
                "eval": f"{teacher['prompts']}, {teacher['steps']} steps, cfg {teacher['guidance']}",
                "teacher all": f"{teacher['all']:.3f}",
                **{m: mean_and_spread([e[m] for e in group]) for m in METRICS},
            }
        )
    return markdown_table(rows, ("setting", "seeds", "eval", "teacher all", *METRICS))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", default="", help="comma-separated setting names (default: all)")
    parser.add_argument("--seeds", default="0,1,2", help="training seeds")
    parser.add_argument("--steps", type=int, default=150, help="training steps of every run")
    parser.add_argument("--eval-steps", type=int, default=20, help="Euler steps of the evaluation (4-step settings: 4)")
    parser.add_argument("--eval-seeds", default="0,1", help="sampling seeds of the evaluation")
    parser.add_argument("--quick", action="store_true", help=f"{', '.join(QUICK)}; seed 0; 10 steps; a few minutes")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="results folder")
    parser.add_argument("--work", default=str(ROOT / "runs" / "kd_ablation"), help="data and training runs")
    args = parser.parse_args(argv)
    if args.quick:
        args.settings, args.seeds, args.steps, args.eval_steps, args.eval_seeds = ",".join(QUICK), "0", 10, 4, "0"
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.eval_seeds = [int(s) for s in args.eval_seeds.split(",")]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    base = load_base_config()
    known = {s.name: s for s in settings(base.teacher.source, base.student.variant)}
    names = [n for n in args.settings.split(",") if n] or list(known)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"error: unknown setting(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    chosen = [known[n] for n in names]
    for s in [s for s in chosen if not Path(s.overrides.get("teacher.source", base.teacher.source)).exists()]:
        print(f"skipping {s.name}: its teacher {s.overrides['teacher.source']} is not built (see its config)")
        chosen.remove(s)
    data_dirs = prepare_data(args, {caption_style(base, s.overrides.get("data.source")) for s in chosen})
    start = time.time()
    groups: dict[tuple, list[tuple[Setting, int, str]]] = {}
    losses = {}
    for setting in chosen:
        for seed in args.seeds:
            cfg = run_config(args, setting, seed, data_dirs)
            print(f"== {setting.name} seed {seed}: {cfg.workdir}", flush=True)
            losses[cfg.workdir] = train_run(cfg)
            key = (cfg.teacher.source, setting.prompts, tuple(sorted(setting.sampling.items())))
            groups.setdefault(key, []).append((setting, seed, cfg.workdir))
    entries, teachers = [], {}
    for key, runs in groups.items():
        metrics = evaluate_group(args, key[0], runs)
        teacher_key = f"{key[0]} | {key[1]} | {dict(key[2]) or 'default sampling'}"
        teachers[teacher_key] = metrics.pop("teacher")
        for setting, seed, workdir in runs:
            entries.append(
                {
                    "setting": setting.name,
                    "seed": seed,
                    **losses[workdir],
                    **metrics[workdir],
                    "teacher_key": teacher_key,
                }
            )
    order = {s.name: i for i, s in enumerate(chosen)}
    entries.sort(key=lambda e: (order[e["setting"]], e["seed"]))
    text = table(entries, teachers)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(
        out / "kd_ablation.json",
        {
            "date": datetime.date.today().isoformat(),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
            "command": "python benchmarks/kd_ablation.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "steps": args.steps,
            "seeds": args.seeds,
            "eval_seeds": args.eval_seeds,
            "seconds": round(time.time() - start, 1),
            "teachers": teachers,
            "entries": entries,
        },
    )
    (out / "kd_ablation.md").write_text(text + "\n")
    print(f"wrote {out / 'kd_ablation.json'} and {out / 'kd_ablation.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
