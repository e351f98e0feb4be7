"""KOALA's lessons in miniature: which KD setting should a user pick? Trains the tiny-world student
(configs/tiny.py: the shipped teacher, a KOALA-700M-style student) under each setting with everything else
equal (steps, data, training seeds), evaluates every student beside its teacher (evaluate.py's evaluation: the
detector's attribute accuracy and the agreement with the teacher from the same noise), and writes a table with
the mean and spread over the training seeds.

    python benchmarks/kd_ablation.py          # every setting, seeds 0,1,2: docs/kd_ablation.md (~2 h, 2-core CPU)
    python benchmarks/kd_ablation.py --settings none,lf,sa --seeds 0          # some settings, one seed
    python benchmarks/kd_ablation.py --schedule main     # the main job's schedule, 8 settings x 3 seeds (hours)
    python benchmarks/kd_ablation.py --quick                  # one seed of a few settings, a few minutes

Schedules (`SCHEDULES`): `short` trains 150 steps and evaluates on the setting's prompts with evaluation seeds
0, 1 (-> kd_ablation.json / .md); `main` trains with configs/tiny.py's own schedule (its total_steps, learning
rate, batch, logging and checkpoints: `sa` seed 0 is then the main job itself) and evaluates with evaluation
seeds 0-3 on the setting's prompts and also on `world-rich` (positions, two-object relations; columns `rich_*`)
(-> kd_ablation_main.json / .md). `all_se` is the binomial standard error of one run's `all`,
sqrt(p (1 - p) / n) over its n images; `feat_share` the weighted feature loss's share of the total loss.

Settings (`SETTINGS`): feature KD none (task + output KD only), BK-SDM's last feature of each stage (lf),
self-attention (sa), cross-attention (ca), feed-forward (ffn), resnet (res), sa+ca; SA restricted to encoder /
decoder stages and to the first / last block of each transformer stack; lambda_feat 0.1 / 10 for SA (1 is `sa`);
short vs rich training captions (evaluated on rich prompts, as is `sa-mixed`, the same student on the default
mixed captions); and a step-distilled teacher (configs/tiny_world_lightning.py) against the original, both
students sampled in 4 trailing Euler steps without guidance (settings `sa-4step` and `sa-lightning`; the latter
needs assets/tiny_world/lightning_4step and is skipped, with a message, without it), and `sa-lightning-grid`, the
same with training timesteps restricted to the 4 the step-distilled teacher was trained on (which timesteps
KOALA trained on against its step-distilled teachers is not known: docs/paper.md). `sa-norm` and `lf-norm` are
`sa` and `lf` with kd.feat_norm='teacher' (each pair's MSE over the teacher feature's mean square); they belong
to the main schedule's default set, not the short one's.

Data are encoded once per caption style into <work>/data/ and shared by every run. Each run's workdir is
<work>/runs/<schedule>-<steps>/<setting>-s<seed> (--work, default runs/kd_ablation); settings that only evaluate
differently (`sa-mixed`, `sa-4step`) evaluate the `sa` runs. Runs go seed by seed (every setting of the first
seed, then the next seed), each evaluated as soon as it is trained, and the results file is rewritten
(atomically) after every run: a rerun with the same schedule skips every (setting, seed) the file already holds,
so a long ablation can be stopped and resumed, in another session too (delete an entry to redo it). A file from
another schedule, step count or evaluation is refused rather than mixed in. Writes <out>/<results>.json (one
entry per (setting, seed): `setting`, `seed`, `schedule`, the final training losses and every metric evaluate.py
reports) and <results>.md (mean +- standard deviation per setting); the default --out is benchmarks/results/.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_collections

from koala_jax.evaluation import world_eval
from koala_jax.evaluation.generators import load_generator
from koala_jax.evaluation.report import markdown_table
from koala_jax.evaluation.world_eval import Generated, Generator
from koala_jax.files import write_json, write_text
from koala_jax.pipelines.euler import EulerSchedule
from koala_jax.pipelines.sampling import Settings
from koala_jax.students import derive_student_config
from koala_jax.train.data_stage import prepare_on_the_fly
from koala_jax.weights import source_config
from koala_jax.weights.pipeline_dir import default_image_size

ROOT = Path(__file__).resolve().parent.parent
BASE_CONFIG = ROOT / "configs" / "tiny.py"
LIGHTNING_TEACHER = "assets/tiny_world/lightning_4step"
FEW_STEPS = {"steps": 4, "guidance": 1.0, "scheduler": "euler-trailing"}
# The timesteps of 4 trailing Euler steps (999, 749, 499, 249): the only ones the step-distilled teacher learnt.
FEW_STEP_GRID = tuple(int(t) for t in EulerSchedule(timestep_spacing="trailing").timesteps(FEW_STEPS["steps"]))
QUICK = ("none", "sa", "lf")
NORMALISED = ("sa-norm", "lf-norm")  # feat_norm='teacher': the main schedule's question, not the short one's
LOSSES = ("total", "task", "out_kd", "feat_kd")
METRICS = ("all", "all_se", "colour_shape", "psnr_db", "latent_mse", "task", "feat_kd", "feat_share")
# Columns of an extra prompt set (`Schedule.extra_prompts`), each prefixed with the set's short name.
EXTRA_METRICS = ("colour_shape", "position", "relation")


@dataclasses.dataclass(frozen=True)
class Schedule:
    """How long every run trains and how it is evaluated; `steps` None keeps configs/tiny.py's own schedule."""

    name: str
    steps: int | None
    eval_seeds: tuple[int, ...]
    extra_prompts: tuple[str, ...]  # prompt sets evaluated besides each setting's own, metrics prefixed
    results: str  # file stem of the results under --out
    settings: tuple[str, ...] = ()  # the default settings, in run order (empty: every one but NORMALISED)


SCHEDULES = {
    "short": Schedule("short", 150, (0, 1), (), "kd_ablation"),
    "main": Schedule(
        "main",
        None,
        (0, 1, 2, 3),
        ("world-rich",),
        "kd_ablation_main",
        ("sa", "lf", *NORMALISED, "none", "res", "ffn", "ca"),
    ),
}


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
    lf = {"kd.features": ("stage",)}
    return [
        Setting("none", {"kd.feat": 0.0}),
        Setting("lf", lf),
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
        Setting("sa-norm", {**sa, "kd.feat_norm": "teacher"}),
        Setting("lf-norm", {**lf, "kd.feat_norm": "teacher"}),
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
    """The base config with the setting's overrides; a schedule with its own step count also sets logging and a
    single checkpoint to match, the main schedule keeps the base config's."""
    cfg = load_base_config()
    overrides = dict(setting.overrides)
    cfg.data.source = data_dirs[caption_style(cfg, overrides.pop("data.source", None))]
    for key, value in overrides.items():
        group, _, name = key.rpartition(".")
        (cfg[group] if group else cfg)[name] = value
    if args.steps != cfg.total_steps:
        cfg.total_steps = args.steps
        cfg.log_every = max(1, args.steps // 4)
        cfg.ckpt.every = args.steps
    cfg.workdir = str(Path(args.work) / "runs" / f"{args.schedule.name}-{args.steps}" / f"{setting.runs}-s{seed}")
    cfg.seed = seed
    cfg.ckpt.keep = 1
    cfg.eval.prompts = ""  # evaluated below, beside the teacher, with the schedule's evaluation
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


def final_losses(history: list[dict[str, float]], feat_weight: float) -> dict[str, float]:
    """The last logged loss terms (one batch's) and the weighted feature loss's share of the total."""
    last = {k: float(v) for k, v in history[-1].items() if k in LOSSES}
    last["feat_share"] = feat_weight * last["feat_kd"] / last["total"] if last["total"] else math.nan
    return last


def train_run(cfg: ml_collections.ConfigDict) -> dict[str, float]:
    """Train (unless a finished run is there: a stopped one resumes from its checkpoint) and return the last
    logged losses."""
    summary_file = Path(cfg.workdir) / "ablation_losses.json"
    if summary_file.exists():
        return json.loads(summary_file.read_text())
    from koala_jax.train.loop import train  # Heavy: only when a run trains.

    result = train(cfg)
    if result.stopped:
        raise SystemExit(f"stopped by {result.stopped}: rerun the same command to go on")
    if not result.history:  # resumed from its final checkpoint: the losses were logged by the run that ended
        raise SystemExit(f"error: {cfg.workdir} finished without its losses recorded: delete it and rerun to redo it")
    last = final_losses(result.history, cfg.kd.feat)
    write_json(summary_file, last)
    return last


def memoised(generate: Generator) -> Generator:
    """`generate` drawing each (prompts, seeds) once: the teacher's images serve every student of a process."""
    drawn: dict[tuple, Generated] = {}

    def cached(prompts: Sequence[str], seeds: Sequence[int]) -> Generated:
        key = (tuple(prompts), tuple(seeds))
        if key not in drawn:
            drawn[key] = generate(prompts, seeds)
        return drawn[key]

    return cached


def with_binomial_error(metrics: dict[str, Any]) -> dict[str, Any]:
    """`all_se`: the binomial standard error of `all` over its n images, the evaluation's own noise."""
    p, n = metrics["all"], metrics["n"]
    return {**metrics, "all_se": math.sqrt(p * (1 - p) / n) if n else math.nan}


class Evaluator:
    """Evaluates one run at a time beside its teacher, each teacher drawn once per (prompt set, sampling)."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.teachers: dict[tuple, Generator] = {}

    def sampling(self, setting: Setting) -> dict[str, Any]:
        return {"steps": self.args.eval_steps, "guidance": 5.0, "scheduler": "euler", **setting.sampling}

    def teacher_key(self, teacher: str, setting: Setting) -> str:
        return f"{teacher} | {setting.prompts} | {setting.sampling or 'default sampling'}"

    def prompt_sets(self, setting: Setting) -> dict[str, str]:
        """{prompt set: metric prefix}: the setting's own unprefixed, the schedule's extra ones by short name."""
        extra = {p: f"{p.removeprefix('world-')}_" for p in self.args.schedule.extra_prompts if p != setting.prompts}
        return {setting.prompts: "", **extra}

    def evaluate(self, teacher: str, setting: Setting, workdir: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """(the student's metrics, the teacher's) on every prompt set of the schedule, the same noise for both."""
        sampling = self.sampling(setting)
        size = default_image_size(teacher)
        settings_ = Settings(sampling["steps"], sampling["guidance"], sampling["scheduler"], size, size)
        key = (teacher, tuple(sorted(sampling.items())))
        if key not in self.teachers:
            self.teachers[key] = memoised(load_generator("jax", teacher, None, settings_, batch_size=32))
        generators = {
            "teacher": self.teachers[key],
            "student": load_generator("jax", teacher, workdir, settings_, ema=True, batch_size=32),
        }
        student, reference = {}, {**sampling, "prompts": setting.prompts}
        for prompts, prefix in self.prompt_sets(setting).items():
            result = world_eval.evaluate_world(
                generators, world_eval.prompt_set(prompts), self.args.eval_seeds, reference="teacher"
            )
            rows = {row.pop("model"): with_binomial_error(row) for row in result.report().rows()}
            student.update({prefix + k: v for k, v in rows["student"].items()})
            reference.update({prefix + k: v for k, v in rows["teacher"].items()})
        return student, reference


def mean_and_spread(values: list[float]) -> str:
    finite = [v for v in values if v == v]
    if not finite:
        return "n/a"
    mean = statistics.fmean(finite)
    spread = statistics.stdev(finite) if len(finite) > 1 else 0.0
    return f"{mean:.3f} +- {spread:.3f}"


def metric_columns(schedule: Schedule) -> tuple[str, ...]:
    extra = [f"{p.removeprefix('world-')}_{m}" for p in schedule.extra_prompts for m in EXTRA_METRICS]
    return (*METRICS, *extra)


def table(entries: list[dict[str, Any]], teachers: dict[str, dict[str, Any]], schedule: Schedule) -> str:
    rows = []
    columns = metric_columns(schedule)
    for name in dict.fromkeys(e["setting"] for e in entries):
        group = [e for e in entries if e["setting"] == name]
        teacher = teachers[group[0]["teacher_key"]]
        rows.append(
            {
                "setting": name,
                "seeds": ",".join(str(e["seed"]) for e in group),
                "eval": f"{teacher['prompts']}, {teacher['steps']} steps, cfg {teacher['guidance']}",
                "teacher all": f"{teacher['all']:.3f}",
                **{m: mean_and_spread([e.get(m, math.nan) for e in group]) for m in columns},
            }
        )
    return markdown_table(rows, ("setting", "seeds", "eval", "teacher all", *columns))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--schedule", choices=tuple(SCHEDULES), default="short", help="training and evaluation")
    parser.add_argument("--settings", default="", help="comma-separated setting names (default: the schedule's)")
    parser.add_argument("--seeds", default="0,1,2", help="training seeds")
    parser.add_argument("--steps", type=int, default=None, help="training steps of every run (default: schedule's)")
    parser.add_argument("--eval-steps", type=int, default=20, help="Euler steps of the evaluation (4-step settings: 4)")
    parser.add_argument("--eval-seeds", default="", help="sampling seeds of the evaluation (default: schedule's)")
    parser.add_argument("--quick", action="store_true", help=f"{', '.join(QUICK)}; seed 0; 10 steps; a few minutes")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="results folder")
    parser.add_argument("--work", default=str(ROOT / "runs" / "kd_ablation"), help="data and training runs")
    args = parser.parse_args(argv)
    args.schedule = SCHEDULES[args.schedule]
    if args.quick:
        args.settings = args.settings or ",".join(QUICK)
        args.seeds, args.steps, args.eval_steps, args.eval_seeds = "0", 10, 4, "0"
    args.steps = args.steps or args.schedule.steps or load_base_config().total_steps
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.eval_seeds = (
        [int(s) for s in args.eval_seeds.split(",")] if args.eval_seeds else list(args.schedule.eval_seeds)
    )
    return args


def results_header(args: argparse.Namespace) -> dict[str, Any]:
    """What makes two invocations' entries comparable: a results file with another header is not resumed."""
    return {
        "schedule": args.schedule.name,
        "steps": args.steps,
        "eval_seeds": args.eval_seeds,
        "eval_steps": args.eval_steps,
    }


def finished_results(path: Path, header: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(entries, teachers) of an earlier invocation with the same header, to resume; none for a file written before
    resuming existed (no `schedule` key). A file of another schedule or evaluation is refused: mixing would
    compare unlike runs, and overwriting would lose them."""
    if not path.exists():
        return [], {}
    data = json.loads(path.read_text())
    if "schedule" not in data:
        return [], {}
    theirs = {k: data.get(k) for k in header}
    if theirs != header:
        raise SystemExit(
            f"error: {path} holds results of {theirs}, not {header}: pass another --out, or delete it to start over"
        )
    return data["entries"], data["teachers"]


def chosen_settings(args: argparse.Namespace, base: ml_collections.ConfigDict) -> list[Setting]:
    """The settings to run, in order; unknown names are refused, ones whose teacher is not built skipped."""
    known = {s.name: s for s in settings(base.teacher.source, base.student.variant)}
    default = args.schedule.settings or [n for n in known if n not in NORMALISED]
    names = [n for n in args.settings.split(",") if n] or list(default)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"error: unknown setting(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    chosen = []
    for setting in (known[n] for n in names):
        teacher = setting.overrides.get("teacher.source", base.teacher.source)
        if Path(teacher).exists():
            chosen.append(setting)
        else:
            print(f"skipping {setting.name}: its teacher {teacher} is not built (see its config)")
    return chosen


def pending(chosen: list[Setting], seeds: list[int], entries: list[dict[str, Any]]) -> list[tuple[Setting, int]]:
    """The (setting, seed) runs still to do, seed by seed: every setting of the first seed comes before the
    second seed, so a partial ablation compares all settings on equal terms."""
    done = {(e["setting"], e["seed"]) for e in entries}
    return [(s, seed) for seed in seeds for s in chosen if (s.name, seed) not in done]


def write_results(out: Path, args, command: str, seconds: float, entries, teachers, order: dict[str, int]) -> None:
    """<results>.json and .md, each replaced atomically: a run killed mid-way leaves the last finished state."""
    entries.sort(key=lambda e: (order.get(e["setting"], len(order)), e["setting"], e["seed"]))
    data = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "command": command,
        **results_header(args),
        "seeds": sorted({e["seed"] for e in entries}),
        "seconds": round(seconds, 1),
        "teachers": teachers,
        "entries": entries,
    }
    stem = out / args.schedule.results
    write_json(stem.with_suffix(".json"), data)
    write_text(stem.with_suffix(".md"), table(entries, teachers, args.schedule) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    base = load_base_config()
    chosen = chosen_settings(args, base)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    entries, teachers = finished_results((out / args.schedule.results).with_suffix(".json"), results_header(args))
    todo = pending(chosen, args.seeds, entries)
    print(f"{len(entries)} (setting, seed) already in the results, {len(todo)} to run", flush=True)
    data_dirs = prepare_data(args, {caption_style(base, s.overrides.get("data.source")) for s, _ in todo})
    command = "python benchmarks/kd_ablation.py " + " ".join(sys.argv[1:] if argv is None else argv)
    order = {s.name: i for i, s in enumerate(chosen)}
    evaluator, start = Evaluator(args), time.time()
    for setting, seed in todo:
        cfg = run_config(args, setting, seed, data_dirs)
        print(f"== {setting.name} seed {seed}: {cfg.workdir}", flush=True)
        losses = train_run(cfg)
        metrics, teacher = evaluator.evaluate(cfg.teacher.source, setting, cfg.workdir)
        teacher_key = evaluator.teacher_key(cfg.teacher.source, setting)
        teachers[teacher_key] = teacher
        entry = {"setting": setting.name, "seed": seed, "schedule": args.schedule.name, **losses, **metrics}
        entries.append({**entry, "teacher_key": teacher_key})
        write_results(out, args, command, time.time() - start, entries, teachers, order)
        print(f"== {setting.name} seed {seed}: all {metrics['all']:.3f}, colour_shape {metrics['colour_shape']:.3f}")
    print(table(entries, teachers, args.schedule) if entries else "no results")
    print(f"results in {(out / args.schedule.results).with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
