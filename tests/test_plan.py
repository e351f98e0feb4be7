"""The planner (`train.py --config.plan.enabled=True`, koala_jax/train/plan.py): the search's batch and remat logic on
known memory curves, the architecture and data shapes it plans from (no weights, no records), one-line errors;
compiled on 8 fake devices (fsdp=8 holds ~1/8 of fsdp=1's parameter and optimizer bytes, the search's batch
fits and the next does not) and on two cooperating processes through train.py."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys

import pytest

from koala_jax.data import schema
from koala_jax.students.presets import TINY_SDXL
from koala_jax.train import plan
from koala_jax.train.config import base_config

from tests.conftest import ROOT

# Two stages wide enough that nearly all parameter bytes are in arrays fsdp shards (>= 4096 elements), few enough
# layers to compile in seconds; two resnets per encoder stage, so its KOALA-700M student drops some.
WIDE_MICRO = {
    "block_out_channels": [64, 128],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "layers_per_block": 2,
    "transformer_layers_per_block": [1, 2],
    "attention_head_dim": [2, 4],
    "cross_attention_dim": 64,
    "use_linear_projection": True,
    "norm_num_groups": 8,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 32 + 6 * 8,
}


def counting(curve):
    calls = []

    def total(b: int) -> int:
        calls.append(b)
        return curve(b)

    return total, calls


@pytest.mark.parametrize(
    "curve",
    [lambda b: 100 + 10 * b, lambda b: 100 + b * b, lambda b: 100 + int(40 * math.sqrt(b))],
    ids=["affine", "convex", "concave"],
)
@pytest.mark.parametrize("budget", [105, 110, 150, 333, 1000])
def test_largest_batch_finds_the_boundary(curve, budget):
    total, calls = counting(curve)
    found = plan.largest_batch(total, budget)
    want = max((b for b in range(1, 2000) if curve(b) <= budget), default=0)
    assert found == want
    assert found == 0 or (found in calls and found + 1 in calls)  # both sides of the answer were measured
    assert len(calls) <= 16


def test_largest_batch_of_an_affine_total_takes_four_compiles():
    total, calls = counting(lambda b: 7_000 + 333 * b)
    assert plan.largest_batch(total, 20_000) == 39
    assert calls == [1, 2, 40, 39]


def test_largest_batch_reuses_known_totals():
    curve = lambda b: 100 + 10 * b  # noqa: E731
    known = {b: curve(b) for b in (1, 2, 40, 41)}
    total, calls = counting(curve)
    assert plan.largest_batch(total, 505, known) == 40 and calls == []
    assert plan.largest_batch(total, 300, known) == 20 and set(calls) <= {19, 20, 21}


@pytest.mark.parametrize("budget,want", [(45, ()), (35, ("transformer_block",)), (25, ("resnet", "transformer_block"))])
def test_cheapest_remat_bisects_the_ladder(budget, want):
    needs = {(): 40, ("transformer_block",): 30, ("resnet", "transformer_block"): 20, ("resnet", "attention_block"): 10}
    asked = []
    choice = plan.cheapest_remat(lambda r: asked.append(r) or needs[r] <= budget, plan.REMAT_LADDER)
    assert choice == want and len(asked) == 2


def test_plans_from_configs_only(tmp_path):
    """The teacher's architecture from `plan.teacher` when its source is not here, said so; the latent shape of a
    prepared dataset from its metadata alone (no record exists here to read)."""
    cfg = base_config()
    cfg.teacher.source = str(tmp_path / "not-converted-yet")
    cfg.plan.teacher = "random:tiny-sdxl"
    cfg.data.source = str(tmp_path / "data")
    os.makedirs(cfg.data.source)
    (tmp_path / "data" / schema.shard_filename(0, 1)).touch()  # an empty shard: reading a record would fail
    features = schema.record_features((4, 12, 10), text_dim=64, pooled_dim=32)
    schema.write_tfds_metadata(cfg.data.source, features, shard_lengths=[5])
    problem = plan.describe(cfg)
    assert problem.models.teacher == TINY_SDXL and "not-converted-yet is not here" in problem.models.note
    assert problem.data.latent_shape == (4, 12, 10) and problem.data.text_len == schema.TEXT_LENGTH
    cfg.data.source, cfg.data.resolution = str(tmp_path / "raw-images"), 512
    assert plan.describe(cfg).data.latent_shape == (4, 64, 64)


def test_missing_teacher_without_plan_dot_teacher_is_one_line_error():
    argv = ["train.py", "--config", "configs/koala_700m.py", "--config.plan.enabled=True", "--config.plan.teacher="]
    out = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1
    assert out.stderr.startswith("error: teacher.source weights/sdxl-base: not here") and "plan.teacher" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


# The 8-device worker: one process, one planner (layouts compile once), JSON out.
EIGHT_DEVICES = """
import json, sys
import jax
from koala_jax.train import plan
from koala_jax.train.config import base_config

cfg = base_config()
cfg.teacher.source = "random:" + sys.argv[1]
cfg.data.synthetic.latent_size, cfg.data.synthetic.text_len = 16, 8
cfg.compute.attention_impl = "xla"
planner = plan.Planner(plan.describe(cfg), jax.devices(), log=lambda line: print(line, file=sys.stderr))
saving = plan.REMAT_LADDER[-1]
one, eight, eight_2 = (planner.measure(f, saving, b) for f, b in [(1, 1), (8, 1), (8, 2)])
budget = int(eight.total + 2.5 * (eight_2.total - eight.total))  # 3 per device if memory were affine in the batch
found = plan.search(planner, budget, fsdp_degrees=(8,), ladder=(plan.REMAT_LADDER[0], saving))
batch = found.choice.batch_per_device
print(json.dumps({
    "one": one.row() | {"sharding": one.sharding}, "eight": eight.row() | {"sharding": eight.sharding},
    "eight_2": eight_2.row(),
    "budget": budget, "choice": found.choice.row(), "compiles": found.compiles,
    "fits": planner.measured[(8, saving, batch)].total, "next": planner.measured[(8, saving, batch + 1)].total,
}))
"""


@pytest.mark.slow  # 6-10 compiles of a small step: 1-2 minutes on an idle 2-core CPU
def test_fsdp_shards_params_and_search_finds_the_largest_batch(tmp_path):
    teacher = tmp_path / "wide_micro.json"
    teacher.write_text(json.dumps(WIDE_MICRO))
    env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8"}
    out = subprocess.run(
        [sys.executable, "-c", EIGHT_DEVICES, str(teacher)], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.splitlines()[-1])
    one, eight = r["one"]["per_device_bytes"], r["eight"]["per_device_bytes"]
    for kind in ("params", "optimizer", "teacher"):
        share = eight[kind] / one[kind]
        print(f"{kind}: fsdp=8 holds {share:.4f} of fsdp=1's bytes per device (1/8 = 0.125)")
        assert 0.125 <= share <= 0.14  # 1/8 plus the small arrays kept whole (biases, norms)
        assert r["eight"]["sharding"][kind]["fsdp_sharded_share"] > 0.97
    for m in (one, eight):  # XLA's own argument bytes are the layout's
        kinds = sum(m[k] for k in ("params", "optimizer", "ema", "teacher", "batch", "other"))
        assert abs(m["arguments"] - kinds) <= 0.001 * kinds
    assert eight["total"] < one["total"]
    # The same 8 samples cost the same FLOPs however the parameters are laid out, and twice the samples twice.
    assert r["eight"]["flops_per_step"] == pytest.approx(r["one"]["flops_per_step"], rel=0.05)
    assert r["eight_2"]["flops_per_step"] == pytest.approx(2 * r["eight"]["flops_per_step"], rel=0.05)
    batch = r["choice"]["batch_per_device"]
    print(f"budget {r['budget']}: batch {batch} per device ({r['fits']} bytes), batch {batch + 1}: {r['next']}")
    assert r["fits"] <= r["budget"] < r["next"] and r["choice"]["per_device_bytes"]["total"] <= r["budget"]
    # 3 layouts above, then the boundary (doubling with the affine jump, then interpolation) and 1 remat
    assert r["choice"]["batch_per_device"] >= 2 and r["compiles"] <= 3 + 2 * math.ceil(math.log2(batch + 1)) + 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_plan_through_train_py(tmp_path):
    """train.py --config.plan.enabled=True on 2 processes x 2 devices: the global batch assembles from both processes'
    rows and the step compiles; process 0 writes plan.json; nothing is trained."""
    teacher = tmp_path / "wide_micro.json"
    teacher.write_text(json.dumps(WIDE_MICRO))
    env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2"}
    address = f"localhost:{free_port()}"
    flags = [
        "--config=configs/tiny_random.py",
        "--config.plan.enabled=True",
        f"--config.workdir={tmp_path / 'run'}",
        f"--config.teacher.source=random:{teacher}",
        "--config.mesh.fsdp=4",
        f"--config.distributed.coordinator={address}",
        "--config.distributed.num_processes=2",
    ]
    procs = [
        subprocess.Popen(
            [sys.executable, "train.py", *flags, f"--config.distributed.process_id={i}"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    result = json.loads((tmp_path / "run" / plan.PLAN_FILE).read_text())
    assert result["devices"]["count"] == 4 and result["devices"]["processes"] == 2
    assert result["global_batch_check"].startswith("global batch 8 assembled from 2 processes")
    assert result["fsdp"] == 4 and result["batch_per_device"] == 2
    assert all(result["per_device_bytes"][k] > 0 for k in ("params", "optimizer", "teacher", "activations", "total"))
    assert result["flops_per_step"] > 0
    assert not (tmp_path / "run" / "checkpoints").exists()
