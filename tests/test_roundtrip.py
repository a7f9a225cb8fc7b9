"""Random trees round-trip bit-exactly: nesting, dtypes, shapes (0-d and empty included)."""

from __future__ import annotations

import itertools
import math
from typing import NamedTuple

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from trees import assert_bit_exact

import stepsafe

DTYPES = [
    np.bool_, np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64, np.uint64,
    np.float16, np.float32, np.float64, np.complex64, np.complex128, np.dtype(">f4"),
    np.dtype(">i8"), np.dtype("U3"), np.dtype("S4"), np.dtype("M8[ns]"), np.dtype("m8[s]"),
    ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2, ml_dtypes.int4,
    ml_dtypes.uint4, ml_dtypes.float8_e4m3fnuz,
]  # fmt: skip


def random_array(rng: np.random.Generator, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """Arbitrary bit patterns (NaNs with payloads included) for fixed-width types."""
    dtype = np.dtype(dtype)
    n = math.prod(shape)
    if dtype.kind == "U":
        chars = rng.integers(0x20, 0x2FFF, size=(n, dtype.itemsize // 4), dtype=np.uint32)
        return chars.view(dtype).reshape(shape)
    if dtype.kind == "b":
        return rng.integers(0, 2, size=shape).astype(bool)
    raw = rng.integers(0, 256, size=n * dtype.itemsize, dtype=np.uint8)
    if dtype.name in ("int4", "uint4"):
        raw &= 0x0F
    return raw.view(dtype).reshape(shape)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


shapes = st.lists(st.integers(0, 5), min_size=0, max_size=3).map(tuple)
arrays = st.builds(
    lambda seed, dtype, shape: random_array(np.random.default_rng(seed), dtype, shape),
    st.integers(0, 2**32 - 1),
    st.sampled_from(DTYPES),
    shapes,
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
)
keys = st.one_of(st.text(min_size=0, max_size=6), st.integers(-5, 50))
trees = st.recursive(
    st.one_of(arrays, scalars),
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.lists(children, max_size=4).map(tuple),
        st.dictionaries(keys, children, max_size=4).filter(
            lambda d: len({str(k) for k in d}) == len(d)
        ),
    ),
    max_leaves=20,
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(tree=trees, file_size=st.sampled_from([64, 100, 4096, 2 << 30]))
def test_random_trees_round_trip(tmp_path_factory, tree, file_size):
    path = tmp_path_factory.mktemp("rt") / "ckpt"
    stepsafe.save(path, tree, data_file_size_bytes=file_size)
    assert_bit_exact(tree, stepsafe.restore(path))
    assert_bit_exact(tree, stepsafe.restore(path, tree))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_dtype_0d_empty_and_views(tmp_path, dtype):
    rng = np.random.default_rng(1)
    base = random_array(rng, dtype, (6, 8))
    tree = {
        "zero_d": random_array(rng, dtype, ()),
        "empty": random_array(rng, dtype, (0, 3)),
        "strided": base[::2, 1::3],
        "transposed": base.T,
        "fortran": np.asfortranarray(base),
    }
    stepsafe.save(tmp_path / "c", tree)
    out = stepsafe.restore(tmp_path / "c")
    for k, v in tree.items():
        assert same_bits(np.array(v, order="C"), out[k]), k


class Point(NamedTuple):
    x: np.ndarray
    label: str


def test_containers_round_trip_exactly_with_target(tmp_path):
    tree = {
        "b": [Point(np.arange(3), "p"), (1, 2.5, None)],
        "a": {"nested": (np.float32(2.0), True)},
        7: "int key",
    }
    stepsafe.save(tmp_path / "c", tree)
    out = stepsafe.restore(tmp_path / "c", tree)
    assert type(out["b"][0]) is Point and out["b"][0].label == "p"
    assert list(out) == ["b", "a", 7]
    assert isinstance(out["a"]["nested"][0], np.float32)
    plain = stepsafe.restore(tmp_path / "c")
    assert plain["b"][0] == {"x": plain["b"][0]["x"], "label": "p"}
    assert plain["b"][1] == (1, 2.5, None)


def test_metadata_reads_manifest_only(tmp_path):
    tree = {"w": np.zeros((4, 5), ml_dtypes.bfloat16), "step": 3}
    stepsafe.save(tmp_path / "c", tree, custom_metadata={"loss": 1.5})
    for f in (tmp_path / "c" / "items").glob("*.data"):
        f.unlink()  # metadata must not need them
    meta = stepsafe.metadata(tmp_path / "c")
    assert meta["w"] == stepsafe.ArrayMetadata((4, 5), np.dtype(ml_dtypes.bfloat16), 40)
    assert meta["step"] == 3
    info = stepsafe.info(tmp_path / "c")
    assert info.custom_metadata == {"loss": 1.5} and info.nbytes == 40
    assert info.commit_timestamp_nsecs >= info.init_timestamp_nsecs


def test_large_array_splits_across_files_and_chunks(tmp_path):
    a = np.random.default_rng(0).integers(0, 255, size=150 << 20, dtype=np.uint8)
    stepsafe.save(tmp_path / "c", {"a": a}, data_file_size_bytes=40 << 20)
    files = sorted((tmp_path / "c" / "items").glob("*.data"))
    assert len(files) == 4 and all(f.stat().st_size <= 40 << 20 for f in files)
    assert same_bits(stepsafe.restore(tmp_path / "c")["a"], a)


def test_paths_as_the_seeds_write_them(tmp_path):
    run = tmp_path / "run"
    for step in (100, 200):
        stepsafe.save(run / "checkpoints" / str(step), {"step": step})
    (run / "checkpoints" / "300").mkdir()  # an uncommitted step is never chosen
    for path, step in itertools.chain(
        [(run, 200), (run / "checkpoints", 200), (run / "checkpoints" / "100", 100)],
        [
            (run / "checkpoints" / "100" / "items", 100),
            (run / "checkpoints" / "items" / "100", 100),
        ],
    ):
        assert stepsafe.restore(path)["step"] == step, path
