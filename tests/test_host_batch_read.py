"""Arrays restored as saved into host memory are read as one batch (``read_arrays``), others
through per-leaf plans: both kinds in one restore, and every check the plans made still made."""

from __future__ import annotations

import numpy as np
import pytest

import stepsafe
from stepsafe.checkpoint.restore import open_checkpoint
from stepsafe.errors import ChecksumMismatchError, TargetMismatchError, TruncatedDataError


def _state(mesh=None) -> dict:
    rng = np.random.default_rng(7)
    state = {
        "w": rng.standard_normal((64, 32)).astype(np.float32),
        "b": np.arange(5, dtype=np.int16),
        "scalar": np.float64(2.5),
        "empty": np.zeros((0, 3), np.float32),
        "step": 12,
    }
    if mesh is not None:
        import jax
        from jax.sharding import NamedSharding, PartitionSpec

        host = rng.standard_normal((8, 6)).astype(np.float32)
        sharding = NamedSharding(mesh, PartitionSpec("data", "model"))
        state["sharded"] = jax.device_put(host, sharding)  # saved as 4 shards
    return state


def _data_file(path) -> str:
    with open_checkpoint(str(path)) as reader:
        (name,) = reader.manifest.files
        return reader.file_path(name)


def test_mixed_single_and_many_shard_arrays_restore_bit_exact(tmp_path, mesh):
    state = _state(mesh)
    stepsafe.save(tmp_path / "c", state)
    with open_checkpoint(str(tmp_path / "c")) as reader:
        assert len(reader.manifest.arrays["sharded"].shards) == 4
        assert len(reader.manifest.arrays["w"].shards) == 1
    out = stepsafe.restore(tmp_path / "c")
    assert out["step"] == 12
    for key in ("w", "b", "empty"):
        assert out[key].dtype == state[key].dtype
        np.testing.assert_array_equal(out[key], state[key])
    assert out["scalar"] == 2.5 and out["scalar"].shape == ()
    np.testing.assert_array_equal(out["sharded"], np.asarray(state["sharded"]))
    # Fresh arrays, not views of one another: writing one leaves the others as they are.
    out["w"][:] = 0
    assert out["b"].flags.writeable and out["b"].tolist() == [0, 1, 2, 3, 4]


def test_targets_of_the_saved_dtype_and_casts_together(tmp_path):
    state = _state()
    stepsafe.save(tmp_path / "c", state)
    target = {
        "w": np.zeros((64, 32), np.float32),  # as saved: the batch
        "b": np.zeros(5, np.int64),  # a lossless cast: a plan
        "scalar": 0.0,  # a Python float: a plan
        "empty": np.zeros((0, 3), np.float32),
        "step": 0,
    }
    out = stepsafe.restore(tmp_path / "c", target)
    np.testing.assert_array_equal(out["w"], state["w"])
    assert out["b"].dtype == np.int64 and out["b"].tolist() == [0, 1, 2, 3, 4]
    assert out["scalar"] == 2.5 and type(out["scalar"]) is float
    with pytest.raises(TargetMismatchError, match="'w'"):
        stepsafe.restore(tmp_path / "c", {**target, "w": np.zeros((64, 32), np.float16)})


def test_corrupt_chunk_in_the_batch_names_its_array(tmp_path):
    state = _state()
    stepsafe.save(tmp_path / "c", state)
    with open_checkpoint(str(tmp_path / "c")) as reader:
        chunk = reader.manifest.arrays["b"].shards[0].chunks[0]
    path = _data_file(tmp_path / "c")
    with open(path, "r+b") as f:
        f.seek(chunk.offset + 1)
        byte = f.read(1)
        f.seek(chunk.offset + 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ChecksumMismatchError, match="'b'"):
        stepsafe.restore(tmp_path / "c")
    out = stepsafe.restore(tmp_path / "c", verify=False)  # read anyway, as asked
    assert out["b"].tolist() != [0, 1, 2, 3, 4]
    np.testing.assert_array_equal(out["w"], state["w"])


def test_truncated_data_file_is_refused_before_reading(tmp_path):
    stepsafe.save(tmp_path / "c", _state())
    path = _data_file(tmp_path / "c")
    with open(path, "r+b") as f:
        f.truncate(100)
    with pytest.raises(TruncatedDataError, match="truncated"):
        stepsafe.restore(tmp_path / "c")


def test_arrays_restored_as_saved_are_read_without_plans(tmp_path, monkeypatch):
    """The point of the batch: no per-array plan for a leaf that comes back as saved (a
    restore of many small arrays was mostly planning)."""
    from stepsafe.format.reader import CheckpointReader

    state = _state()
    stepsafe.save(tmp_path / "c", state)

    def no_plan(self, key, boxes=None):
        raise AssertionError(f"planned {key!r}")

    monkeypatch.setattr(CheckpointReader, "plan", no_plan)
    out = stepsafe.restore(tmp_path / "c", {k: None for k in state})
    np.testing.assert_array_equal(out["w"], state["w"])
    with pytest.raises(AssertionError, match="planned 'b'"):  # a cast still needs its plan
        stepsafe.restore(tmp_path / "c", {**{k: None for k in state}, "b": np.zeros(5, np.int64)})
