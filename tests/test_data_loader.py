"""The grain loader: schema, per-process sharding, exact resume, skips, mesh layout.

The prepared datasets here are written directly in the prepared format (no torch):
record i has latents filled with the value i, so batches reveal which records they hold.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import grain
import numpy as np
import pytest
from array_record.python import array_record_module
from etils import epath

from koala_jax.data import (
    SyntheticSource,
    load_null_embeddings,
    make_train_loader,
    open_source,
    schema,
)

LATENT_SHAPE = (4, 2, 2)
TEXT_DIM, POOLED_DIM = 8, 4
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _record(index: int) -> dict:
    return {
        "latents": np.full(LATENT_SHAPE, index, np.float16),
        "prompt_embeds": np.full((77, TEXT_DIM), -index, np.float16),
        "pooled_prompt_embeds": np.full(POOLED_DIM, index, np.float16),
        "original_size": np.array([100 + index, 200], np.int32),
        "crop_top_left": np.array([index, 0], np.int32),
        "target_size": np.array([64, 64], np.int32),
        "caption": f"record {index}",
    }


def write_prepared(data_dir: str, shard_sizes: list[int], corrupt: int | None = None) -> None:
    """A dataset in prepare_data.py's format; record `corrupt` is stored as garbage bytes."""
    os.makedirs(os.path.join(data_dir, schema.INCOMPLETE_DIR))
    features = schema.record_features(LATENT_SHAPE, TEXT_DIM, POOLED_DIM)
    index = 0
    for shard, size in enumerate(shard_sizes):
        path = os.path.join(data_dir, schema.shard_filename(shard, len(shard_sizes)))
        writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
        for _ in range(size):
            record = b"\x00garbage" * 8 if index == corrupt else features.serialize_example(_record(index))
            writer.write(record)
            index += 1
        writer.close()
    schema.write_tfds_metadata(data_dir, features, shard_sizes)
    schema.save_null_embeddings(data_dir, np.zeros((77, TEXT_DIM)), np.ones(POOLED_DIM))


def _ids(batch: dict) -> list[int]:
    return batch["latents"][:, 0, 0, 0].astype(int).tolist()


def _loader(source, **overrides):
    settings = dict(global_batch_size=4, seed=3, process_index=0, process_count=1, read_threads=2)
    settings.update(overrides)
    return make_train_loader(source, **settings)


@pytest.fixture
def prepared(tmp_path) -> str:
    data_dir = str(tmp_path / "prepared")
    write_prepared(data_dir, [10, 6, 8])
    return data_dir


def test_batches_have_the_training_schema(prepared):
    source = open_source(prepared)
    batch = next(_loader(source, global_batch_size=6, process_count=2))
    expected = {
        "latents": (3, *LATENT_SHAPE),
        "prompt_embeds": (3, 77, TEXT_DIM),
        "pooled_prompt_embeds": (3, POOLED_DIM),
        "time_ids": (3, 6),
    }
    assert {key: value.shape for key, value in batch.items()} == expected
    assert all(value.dtype == np.float32 for value in batch.values())
    i = _ids(batch)[0]
    assert batch["time_ids"][0].tolist() == [
        100 + i,
        200,
        i,
        0,
        64,
        64,
    ]  # SDXL's add_time_ids order
    assert (batch["prompt_embeds"][0] == -i).all()
    null = load_null_embeddings(prepared)
    assert null["prompt_embeds"].shape == (77, TEXT_DIM) and null["pooled_prompt_embeds"].dtype == np.float32


def test_synthetic_source_is_deterministic_per_index():
    source = SyntheticSource(16, LATENT_SHAPE, 77, TEXT_DIM, POOLED_DIM, seed=1)
    again = SyntheticSource(16, LATENT_SHAPE, 77, TEXT_DIM, POOLED_DIM, seed=1)
    other = SyntheticSource(16, LATENT_SHAPE, 77, TEXT_DIM, POOLED_DIM, seed=2)
    np.testing.assert_array_equal(source[5]["latents"], again[5]["latents"])
    assert not np.array_equal(source[5]["latents"], source[6]["latents"])
    assert not np.array_equal(source[5]["latents"], other[5]["latents"])
    assert set(source[0]) == {
        "latents",
        "prompt_embeds",
        "pooled_prompt_embeds",
        "original_size",
        "crop_top_left",
        "target_size",
        "caption",
    }
    batch = next(_loader(source))
    assert batch["time_ids"][0].tolist() == [16, 16, 0, 0, 16, 16]  # latent 2 x VAE factor 8
    with pytest.raises(IndexError):
        source[16]


def test_processes_read_disjoint_records_whose_union_is_the_dataset(prepared):
    epochs = []
    for process_index in range(2):
        loader = _loader(open_source(prepared), process_index=process_index, process_count=2)
        # 24 records / 2 processes = 12 per process = 6 local batches of 2 per epoch.
        first = [i for _ in range(6) for i in _ids(next(loader))]
        second = [i for _ in range(6) for i in _ids(next(loader))]
        assert len(set(first)) == 12 and set(second) == set(first)
        assert second != first  # reshuffled every epoch
        epochs.append(set(first))
    assert not epochs[0] & epochs[1]
    assert epochs[0] | epochs[1] == set(range(24))


def test_batch_size_must_split_over_processes(prepared):
    with pytest.raises(ValueError, match="multiple of the process count 3"):
        _loader(open_source(prepared), global_batch_size=4, process_count=3)


def _assert_same_batches(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for got_batch, want_batch in zip(got, want, strict=True):
        for key in want_batch:
            np.testing.assert_array_equal(got_batch[key], want_batch[key])


def test_restore_continues_with_the_exact_next_batch(prepared):
    source = open_source(prepared)
    # 24 records in batches of 4: six batches per epoch; resume mid-epoch and across epochs.
    for consumed in (0, 3, 5, 11):
        loader = _loader(source)
        for _ in range(consumed):
            next(loader)
        state = json.loads(json.dumps(loader.get_state()))  # what a checkpoint stores
        expected = [next(loader) for _ in range(4)]
        restored = _loader(source)
        restored.set_state(state)
        _assert_same_batches([next(restored) for _ in range(4)], expected)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_restore_with_worker_processes_through_grains_orbax_handler(prepared, tmp_path):
    source = open_source(prepared)
    loader = _loader(source, num_workers=2)
    for _ in range(3):
        next(loader)
    directory = epath.Path(tmp_path / "iterator")
    directory.mkdir()
    grain.checkpoint.CheckpointHandler().save(directory, args=grain.checkpoint.CheckpointSave(loader))
    expected = [next(loader) for _ in range(4)]
    loader.close()
    restored = grain.checkpoint.CheckpointHandler().restore(
        directory, args=grain.checkpoint.CheckpointRestore(_loader(source, num_workers=2))
    )
    _assert_same_batches([next(restored) for _ in range(4)], expected)
    restored.close()


def test_truncated_shard_and_corrupt_record_are_skipped_and_counted(tmp_path):
    data_dir = str(tmp_path / "prepared")
    write_prepared(data_dir, [10, 6, 8], corrupt=20)
    shard = os.path.join(data_dir, schema.shard_filename(1, 3))
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) // 2)
    source = open_source(data_dir)
    assert len(source) == 18 and len(source.skipped_shards) == 1
    loader = _loader(source, global_batch_size=2)
    seen = set()
    for _ in range(17):  # exactly two epochs of 17 readable records
        seen.update(_ids(next(loader)))
    valid = set(range(10)) | set(range(16, 24)) - {20}
    assert seen == valid  # the garbage record never reaches a batch, nor a zero in its place
    assert loader.skip_counts == {"corrupt_records": 2, "skipped_shards": 1}
    state = loader.get_state()
    restored = _loader(source, global_batch_size=2)
    restored.set_state(state)
    assert restored.skip_counts["corrupt_records"] == 2


def test_unprepared_folder_gets_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a prepared dataset"):
        open_source(str(tmp_path))


def _run_python(script: str, env_extra: dict[str, str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu", **env_extra}
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


_SHARDING_SCRIPT = """
    import jax, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from koala_jax.data import SyntheticSource, make_train_loader, to_global_batch
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
    source = SyntheticSource(32, (4, 2, 2), 77, 8, 4, seed=0)
    batch = next(make_train_loader(source, global_batch_size=8, seed=0, process_index=0,
                                   process_count=1))
    for axes, spec, rows in (("data", P("data"), 2), (("data", "model"), P(("data", "model")), 1)):
        out = to_global_batch(batch, mesh, axes)
        for key, value in out.items():
            assert value.sharding == NamedSharding(mesh, spec), (key, value.sharding)
            assert value.shape == batch[key].shape
            for shard in value.addressable_shards:
                assert shard.data.shape[0] == rows
                np.testing.assert_array_equal(np.asarray(shard.data), batch[key][shard.index])
    try:
        to_global_batch({"x": np.zeros((6, 3))}, mesh, ("data", "model"))
    except ValueError as error:
        assert "does not split over 8 devices" in str(error)
    else:
        raise AssertionError("no error for a batch of 6 over 8 devices")
    print("OK")
"""


def test_batches_land_on_the_mesh_with_the_intended_sharding():
    process = _run_python(_SHARDING_SCRIPT, {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0 and output.strip().endswith("OK"), output


_TWO_PROCESS_SCRIPT = """
    import jax, numpy as np
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize("localhost:{port}", num_processes=2, process_id={process_id})
    from jax.sharding import Mesh
    from koala_jax.data import SyntheticSource, make_train_loader, to_global_batch
    source = SyntheticSource(32, (4, 2, 2), 77, 8, 4, seed=0)
    def local(index):
        loader = make_train_loader(
            source, global_batch_size=8, seed=0, process_index=index, process_count=2
        )
        return next(loader)
    mine = local(jax.process_index())
    mesh = Mesh(np.array(jax.devices()), ("data",))
    out = to_global_batch(mine, mesh, "data")
    assert out["latents"].shape == (8, 4, 2, 2), out["latents"].shape
    total = float(jax.jit(lambda x: x.sum())(out["latents"]))
    expected = sum(float(local(i)["latents"].sum()) for i in range(2))
    assert abs(total - expected) < 1e-3, (total, expected)
    print("OK")
"""


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_assemble_one_global_batch():
    import portpicker

    port = portpicker.pick_unused_port()
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    processes = [_run_python(_TWO_PROCESS_SCRIPT.format(port=port, process_id=i), env) for i in range(2)]
    outputs = [process.communicate(timeout=120)[0] for process in processes]
    for process, output in zip(processes, outputs, strict=True):
        assert process.returncode == 0 and output.strip().endswith("OK"), output
