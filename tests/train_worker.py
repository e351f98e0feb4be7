"""Runs `koala_jax.train.loop.train` in a fresh process (so the device count and jax.distributed can be set
before jax starts) on a random teacher given as a diffusers config.json; prints the logged history as JSON
and saves the final student params of process 0 to <workdir>/final_params.npz.

python -m tests.train_worker WORKDIR --teacher micro.json --devices 8 --mesh 4,2 --steps 3 \
    [--coordinator HOST:PORT --num-processes 2 --process-id 0] [--set key=python-literal ...]

Not a test module: it imports nothing from the tests (the test writes the teacher's config.json).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
from pathlib import Path


def micro_config(workdir: str, teacher_json: str, steps: int, mesh: tuple[int, int] = (-1, 1), **overrides):
    """A complete training config for a micro random teacher: seconds per step on one CPU core."""
    from koala_jax.train.config import base_config

    c = base_config()
    c.workdir, c.total_steps, c.log_every, c.ckpt.every = workdir, steps, 1, 2
    c.teacher.source, c.teacher.param_dtype = f"random:{teacher_json}", "float32"
    c.data.global_batch_size, c.data.synthetic.records = 8, 64
    c.data.synthetic.latent_size, c.data.synthetic.text_len = 8, 4
    c.optim.lr, c.optim.warmup_steps = 1e-3, 1
    c.ema.decay = 0.9
    c.compute.dtype, c.compute.remat, c.compute.attention_impl = "float32", (), "xla"
    c.mesh.data, c.mesh.fsdp = mesh
    c.tensorboard = False
    c.peak_tflops_per_device = 1.0
    c.update_from_flattened_dict(overrides)
    return c


def get_config():
    """The micro run as a train.py config file, for tests of the command itself (error policy, signals, lock):
    `train.py --config tests/train_worker.py --config.workdir=DIR --config.teacher.source=random:MICRO.json`."""
    return micro_config("runs/micro", "micro_teacher.json", 6)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("workdir")
    p.add_argument("--teacher", required=True, help="diffusers U-Net config.json of the random teacher")
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--mesh", default="-1,1")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--coordinator", default="")
    p.add_argument("--num-processes", type=int, default=1)
    p.add_argument("--process-id", type=int, default=0)
    p.add_argument("--set", action="append", default=[], help="key=python-literal config override")
    args = p.parse_args()
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={args.devices}"
        " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    )
    import jax
    import numpy as np
    from flax.traverse_util import flatten_dict

    from koala_jax.train.loop import train

    overrides = {k: ast.literal_eval(v) for k, v in (s.split("=", 1) for s in args.set)}
    cfg = micro_config(args.workdir, args.teacher, args.steps, tuple(int(x) for x in args.mesh.split(",")), **overrides)
    if args.coordinator:
        cfg.distributed.coordinator = args.coordinator
        cfg.distributed.num_processes, cfg.distributed.process_id = args.num_processes, args.process_id
    result = train(cfg)
    params = jax.tree.map(
        lambda x: np.asarray(
            jax.device_get(
                jax.experimental.multihost_utils.process_allgather(x, tiled=True) if jax.process_count() > 1 else x
            )
        ),
        result.state.params,
    )
    if jax.process_index() == 0:
        np.savez(Path(args.workdir) / "final_params.npz", **{"/".join(k): v for k, v in flatten_dict(params).items()})
    print("HISTORY " + json.dumps(result.history), flush=True)


if __name__ == "__main__":
    main()
