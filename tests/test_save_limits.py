"""What save and restore accept: every limit restore enforces is checked at save time, the writer
commits only manifests that cover every array, typed PRNG keys round-trip, masked arrays are
refused, and restoring into another dtype casts silently only where no value can change."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from trees import assert_bit_exact

import stepsafe
from stepsafe.errors import ManifestError, TargetMismatchError, UnsupportedLeafError
from stepsafe.format import CommitRecord, HostArray, write_checkpoint
from stepsafe.storage.local import LocalStorage, LocalTransaction
from stepsafe.tree.structure import MAX_DEPTH

# -- the writer commits only manifests that cover every array exactly ------------------------


def _write(path: Path, arrays: list[HostArray], storage=None) -> None:
    structure = ["dict", [a.path for a in arrays], [["leaf"] for _ in arrays]]
    write_checkpoint(
        storage or LocalStorage(),
        str(path),
        structure,
        arrays,
        {},
        record=CommitRecord(step=1),
    )


def _nothing_committed(path: Path) -> None:
    assert not path.exists()
    assert not path.parent.exists() or os.listdir(path.parent) == []  # no temporary either


FULL = np.arange(32, dtype=np.float32).reshape(8, 4)


@pytest.mark.parametrize(
    ("boxes", "problem"),
    [
        ([((0, 4), (0, 4))], "leave gaps"),  # the other process's half missing
        ([((0, 4), (0, 4)), ((4, 6), (0, 4))], "leave gaps"),
        ([((0, 5), (0, 4)), ((4, 8), (0, 4))], "overlap"),
        ([((0, 4), (0, 4)), ((4, 10), (0, 4))], "outside its shape"),
        ([], "leave gaps"),
    ],
    ids=["half", "gap", "overlap", "outside", "no-shards"],
)
def test_writer_refuses_shards_that_do_not_tile_the_array(tmp_path, boxes, problem):
    shards = [(b, np.ascontiguousarray(FULL[tuple(slice(x, y) for x, y in b)])) for b in boxes]
    if problem == "outside its shape":
        shards[1] = (boxes[1], np.zeros((6, 4), np.float32))
    path = tmp_path / "run" / "1"
    with pytest.raises(ManifestError, match=rf"'w'.*{problem}.*nothing was committed"):
        _write(path, [HostArray("w", np.dtype(np.float32), (8, 4), shards)])
    _nothing_committed(path)


def test_writer_refuses_a_shard_whose_bytes_do_not_fill_its_box(tmp_path):
    shards = [(((0, 8), (0, 4)), FULL[:4])]  # half the bytes the box needs
    path = tmp_path / "run" / "1"
    with pytest.raises(ManifestError, match=r"'w'.*holds 64 bytes, its box 128"):
        _write(path, [HostArray("w", np.dtype(np.float32), (8, 4), shards)])
    _nothing_committed(path)


def test_writer_accepts_shards_that_tile_the_array_in_any_order(tmp_path):
    boxes = [((4, 8), (2, 4)), ((0, 4), (0, 4)), ((4, 8), (0, 2))]
    shards = [(b, np.ascontiguousarray(FULL[tuple(slice(x, y) for x, y in b)])) for b in boxes]
    _write(tmp_path / "1", [HostArray("w", np.dtype(np.float32), (8, 4), shards)])
    np.testing.assert_array_equal(stepsafe.restore(tmp_path / "1")["w"], FULL)


class _ShortWriteStorage(LocalStorage):
    """A storage with a bug: it writes only the first piece of every data file's stream."""

    def transaction(self, path: str) -> LocalTransaction:
        class Short(LocalTransaction):
            def write_file(self, relpath, chunks):
                if relpath.startswith("items/process_"):
                    chunks = itertools.islice(chunks, 1)
                super().write_file(relpath, chunks)

        return Short(Path(path))


def test_writer_refuses_to_commit_when_a_data_file_was_not_streamed_in_full(tmp_path):
    big = np.arange(2 << 20, dtype=np.uint8)  # two pieces of 1 MiB and more: one is dropped
    arrays = [
        HostArray("a", big.dtype, big.shape, [(((0, big.size),), big)]),
        HostArray("b", big.dtype, big.shape, [(((0, big.size),), big.copy())]),
    ]
    path = tmp_path / "run" / "1"
    with pytest.raises(ManifestError, match=r"'b'.*not written in full.*nothing was committed"):
        _write(path, arrays, storage=_ShortWriteStorage())
    _nothing_committed(path)


# -- nesting depth: save refuses what restore would refuse, without RecursionError ----------


def nested(depth: int) -> dict:
    """``depth`` nested dicts around one array (its leaf lies at ``depth``)."""
    tree: object = np.arange(3)
    for _ in range(depth):
        tree = {"a": tree}
    return tree  # type: ignore[return-value]


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 300, 490, 495, 1000, 5000])
def test_save_refuses_trees_deeper_than_restore_reads(tmp_path, depth):
    path = tmp_path / "run" / "1"
    first_too_deep = "/".join(["a"] * (MAX_DEPTH + 1))
    with pytest.raises(UnsupportedLeafError) as e:
        stepsafe.save(path, nested(depth))
    message = str(e.value)
    assert f"deeper than {MAX_DEPTH} levels" in message and f"depth {MAX_DEPTH + 1}" in message
    assert f"at {first_too_deep!r}" in message
    _nothing_committed(path)


def test_deepest_tree_that_saves_round_trips(tmp_path):
    tree = nested(MAX_DEPTH)
    stepsafe.save(tmp_path / "c", tree)
    assert_bit_exact(stepsafe.restore(tmp_path / "c"), tree)
    assert_bit_exact(stepsafe.restore(tmp_path / "c", tree), tree)
    assert_bit_exact(stepsafe.restore(tmp_path / "c", select=["a"] * 200), nested(MAX_DEPTH - 200))


def test_deep_lists_tuples_and_namedtuples_are_limited_alike(tmp_path):
    tree: object = 1
    for i in range(MAX_DEPTH + 1):
        tree = [tree] if i % 2 else (tree,)
    with pytest.raises(UnsupportedLeafError, match=f"deeper than {MAX_DEPTH}"):
        stepsafe.save(tmp_path / "c", tree)
    assert not (tmp_path / "c").exists()


def test_a_too_deep_target_is_refused_cleanly(tmp_path):
    stepsafe.save(tmp_path / "c", {"a": 1})
    with pytest.raises(UnsupportedLeafError, match=f"deeper than {MAX_DEPTH}"):
        stepsafe.restore(tmp_path / "c", nested(1000))


# -- masked arrays: their mask would be dropped -----------------------------------------------


@pytest.mark.parametrize("copy", [False, True])
def test_masked_array_is_refused_naming_its_key_path(tmp_path, copy):
    from stepsafe.checkpoint import snapshot

    m = np.ma.masked_array([1.0, 2.0, 3.0], mask=[False, True, False])
    tree = {"stats": {"m": m}}
    with pytest.raises(UnsupportedLeafError, match=r"'stats/m' is a numpy masked array.*mask"):
        snapshot(tree, copy=copy)
    with pytest.raises(UnsupportedLeafError, match="'stats/m'"):
        stepsafe.save(tmp_path / "c", tree)
    assert not (tmp_path / "c").exists()


# -- lossy casts on restore -------------------------------------------------------------------


def _saved(tmp_path: Path, tree: dict) -> Path:
    stepsafe.save(tmp_path / "c", tree)
    return tmp_path / "c"


@pytest.mark.parametrize(
    ("saved", "target"),
    [
        (np.array([2**40], np.int64), np.zeros(1, np.int32)),
        (np.array([1.5], np.float64), np.zeros(1, np.float32)),
        (np.array([1.5], np.float32), np.zeros(1, np.int64)),
        (np.array([-1], np.int8), np.zeros(1, np.uint64)),
        (np.array([1.0], np.float32), np.zeros(1, ml_dtypes.bfloat16)),
        (np.array([1 + 2j], np.complex64), np.zeros(1, np.float64)),
        (np.int64(2**40), np.int32(0)),
        (np.float32(1.5), 0),  # a Python int target for a float
        (np.uint16(300), True),
        (np.complex128(1j), 0.0),
    ],
    ids=lambda x: f"{type(x).__name__}:{getattr(x, 'dtype', '')}",
)
def test_lossy_cast_is_refused_unless_allowed(tmp_path, saved, target):
    path = _saved(tmp_path, {"x": saved})
    python = {int: np.int64, bool: np.bool_, float: np.float64}
    want = np.dtype(python.get(type(target), getattr(target, "dtype", None)))
    with pytest.raises(TargetMismatchError) as e:
        stepsafe.restore(path, {"x": target})
    message = str(e.value)
    assert "'x'" in message and "allow_cast=True" in message
    assert str(np.asarray(saved).dtype) in message and str(want) in message
    out = stepsafe.restore(path, {"x": target}, allow_cast=True)["x"]
    assert type(out) is type(target) and np.asarray(out).dtype == want


@pytest.mark.parametrize(
    ("saved", "target", "want"),
    [
        (np.array([2**30], np.int32), np.zeros(1, np.int64), np.array([2**30], np.int64)),
        (np.array([1.5], np.float32), np.zeros(1, np.float64), np.array([1.5], np.float64)),
        (np.array([1.5], ml_dtypes.bfloat16), np.zeros(1, np.float32), np.array([1.5], np.float32)),
        (np.array([7], np.uint8), np.zeros(1, np.int16), np.array([7], np.int16)),
        (np.array([7], np.int32), np.zeros(1, np.float64), np.array([7.0])),
        (np.uint64(2**64 - 1), 0, 2**64 - 1),  # a Python int holds any integer
        (np.int32(7), 0.0, 7.0),
        (np.bool_(True), 0, 1),
    ],
    ids=lambda x: f"{type(x).__name__}:{getattr(x, 'dtype', '')}",
)
def test_lossless_cast_happens_silently(tmp_path, saved, target, want):
    path = _saved(tmp_path, {"x": saved})
    assert_bit_exact(stepsafe.restore(path, {"x": target})["x"], want)


@pytest.mark.parametrize(
    ("value", "target", "lossy"),
    [
        (1.5, 0, True),
        (2.0, 0, True),  # int target for a float value
        (5, False, True),
        (2**40, np.int32(0), True),
        (-1, np.uint8(0), True),
        (0.1, np.float32(0), True),
        (2**70, 0.0, True),
        (5, np.int32(0), False),  # an inline int counts as the smallest dtype that holds it
        (300, np.uint16(0), False),
        (True, 0, False),
        (3, 0.0, False),
        (0.5, np.float64(0), False),
    ],
)
def test_inline_python_values_follow_the_same_rule(tmp_path, value, target, lossy):
    path = _saved(tmp_path, {"v": value})
    if lossy:
        with pytest.raises(TargetMismatchError, match=r"'v'.*allow_cast=True"):
            stepsafe.restore(path, {"v": target})
        out = stepsafe.restore(path, {"v": target}, allow_cast=True)["v"]
    else:
        out = stepsafe.restore(path, {"v": target})["v"]
        assert out == value
    assert type(out) is type(target)


@pytest.mark.parametrize(
    ("value", "target"), [(2**70, np.int32(0)), (float("nan"), 0), (float("inf"), 0), (None, 0.0)]
)
def test_a_value_no_target_can_hold_is_refused_even_with_allow_cast(tmp_path, value, target):
    path = _saved(tmp_path, {"v": value})
    with pytest.raises(TargetMismatchError, match="'v'"):
        stepsafe.restore(path, {"v": target}, allow_cast=True)


def test_lossy_cast_is_refused_before_any_leaf_is_read(tmp_path):
    path = _saved(tmp_path, {"a": np.arange(4.0), "b": np.arange(4, dtype=np.int64)})
    target = {"a": np.zeros(4), "b": np.zeros(4, np.int32)}
    for f in (path / "items").glob("process_*"):
        f.write_bytes(b"\0" * f.stat().st_size)  # any read would fail its checksum
    with pytest.raises(TargetMismatchError, match=r"'b'.*int64.*int32"):
        stepsafe.restore(path, target)


def test_scalar_target_for_an_array_is_a_shape_error(tmp_path):
    path = _saved(tmp_path, {"x": np.arange(3.0)})
    with pytest.raises(TargetMismatchError, match=r"'x'.*shape \(3,\).*\(\)"):
        stepsafe.restore(path, {"x": 0.0})


def test_manager_restore_refuses_a_lossy_cast(tmp_path):
    from stepsafe.manager.manager import CheckpointManager, ManagerOptions

    with CheckpointManager(tmp_path, ManagerOptions(save_interval_steps=1)) as m:
        m.save(1, {"step": np.int64(2**40)})
        m.wait_until_finished()
        with pytest.raises(TargetMismatchError, match="'step'"):
            m.restore(1, {"step": np.int32(0)})


# -- JAX: typed PRNG keys, and the cast rule for jax targets ----------------------------------


@pytest.fixture
def jax():
    return pytest.importorskip("jax")


def _key_data(jax, k) -> np.ndarray:
    return np.asarray(jax.random.key_data(k))


def test_typed_prng_key_round_trips_as_a_typed_key(tmp_path, jax):
    k = jax.random.key(7)
    keys = jax.random.split(jax.random.key(8), 3)
    rbg = jax.random.key(9, impl="rbg")
    raw = jax.random.PRNGKey(3)
    stepsafe.save(tmp_path / "c", {"rng": k, "keys": keys, "rbg": rbg, "raw": raw})
    target = {
        "rng": jax.random.key(0),
        "keys": jax.ShapeDtypeStruct(keys.shape, keys.dtype),
        "rbg": jax.ShapeDtypeStruct((), rbg.dtype),
        "raw": jax.random.PRNGKey(0),
    }
    out = stepsafe.restore(tmp_path / "c", target)
    for name, want in [("rng", k), ("keys", keys), ("rbg", rbg)]:
        assert out[name].dtype == want.dtype and out[name].shape == want.shape, name
        np.testing.assert_array_equal(_key_data(jax, out[name]), _key_data(jax, want))
    np.testing.assert_array_equal(jax.random.normal(out["rng"], (4,)), jax.random.normal(k, (4,)))
    assert out["raw"].dtype == np.uint32  # raw keys stay plain uint32 arrays
    np.testing.assert_array_equal(np.asarray(out["raw"]), np.asarray(raw))


def test_typed_prng_key_without_target_is_its_data_under_its_impl(tmp_path, jax):
    k = jax.random.key(7)
    stepsafe.save(tmp_path / "c", {"rng": k})
    meta = stepsafe.metadata(tmp_path / "c")
    assert meta["rng"]["threefry2x32"] == stepsafe.ArrayMetadata((2,), np.dtype(np.uint32), 8)
    out = stepsafe.restore(tmp_path / "c")
    np.testing.assert_array_equal(out["rng"]["threefry2x32"], _key_data(jax, k))
    again = jax.random.wrap_key_data(out["rng"]["threefry2x32"], impl="threefry2x32")
    np.testing.assert_array_equal(jax.random.normal(again, (2,)), jax.random.normal(k, (2,)))
    sub = stepsafe.restore(tmp_path / "c", jax.random.key(0), select="rng")
    np.testing.assert_array_equal(_key_data(jax, sub), _key_data(jax, k))


def test_typed_prng_key_of_another_impl_is_refused(tmp_path, jax):
    stepsafe.save(tmp_path / "c", {"rng": jax.random.key(1, impl="rbg")})
    with pytest.raises(TargetMismatchError, match=r"'rng/unsafe_rbg'.*'rng/rbg'"):
        stepsafe.restore(tmp_path / "c", {"rng": jax.random.key(0, impl="unsafe_rbg")})


def test_sharded_typed_keys_restore_onto_the_targets_sharding(tmp_path, jax):
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    sharding = NamedSharding(Mesh(np.array(jax.devices()), ("d",)), P("d"))
    keys = jax.device_put(jax.random.split(jax.random.key(5), 8), sharding)
    from stepsafe.manager.manager import CheckpointManager, ManagerOptions

    with CheckpointManager(tmp_path, ManagerOptions(save_interval_steps=1)) as m:  # async copy
        m.save(1, {"keys": keys})
        m.wait_until_finished()
        for target in (keys, jax.ShapeDtypeStruct(keys.shape, keys.dtype, sharding=sharding)):
            out = m.restore(1, {"keys": target})["keys"]
            assert out.dtype == keys.dtype and out.sharding == sharding
            np.testing.assert_array_equal(_key_data(jax, out), _key_data(jax, keys))


def test_jax_targets_follow_the_cast_rule(tmp_path, jax):
    path = _saved(tmp_path, {"w": np.full(4, 1.1, np.float32), "lr": 0.1, "n": 5})
    lossy = {
        "w": jax.ShapeDtypeStruct((4,), ml_dtypes.bfloat16),
        "lr": jax.ShapeDtypeStruct((), np.float32),
        "n": jax.ShapeDtypeStruct((), np.int32),
    }
    with pytest.raises(TargetMismatchError, match=r"'w'.*float32.*bfloat16.*allow_cast=True"):
        stepsafe.restore(path, lossy)
    out = stepsafe.restore(path, lossy, allow_cast=True)
    assert isinstance(out["w"], jax.Array) and out["w"].dtype == ml_dtypes.bfloat16
    assert out["lr"].dtype == np.float32 and int(out["n"]) == 5
    lossless = {
        "w": jax.numpy.zeros(4, np.float32),
        "lr": 0.0,
        "n": jax.ShapeDtypeStruct((), np.int32),
    }
    out = stepsafe.restore(path, lossless)
    np.testing.assert_array_equal(np.asarray(out["w"]), np.full(4, 1.1, np.float32))
    assert out["lr"] == 0.1 and int(out["n"]) == 5
