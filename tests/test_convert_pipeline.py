"""A conversion's arrays are made ahead of their writer on a thread of their own, within a
budget (#15: conversions at the disk's copy speed), into reused buffers: the bytes written must
be the same as made in series, whatever the order the writer asks in, an error must reach the
writer at the array that failed with nothing committed, and a buffer must never be reused while
anything still refers to the block in it."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from safetensors import safe_open

import stepsafe
from stepsafe.convert import convert_checkpoint, ops
from stepsafe.convert.buffers import Pool, empty, pooled
from stepsafe.convert.lazy_leaf import OutLeaf
from stepsafe.convert.pipeline import Ahead
from stepsafe.convert.safetensors_files import write_safetensors
from stepsafe.convert.write_tree import write_tree
from stepsafe.errors import StepsafeError
from stepsafe.format import CheckpointReader
from stepsafe.storage import storage_for

MIB = 1 << 20


class Made:
    """Leaves that record which were made, on which thread, and how many were made but not
    yet let go of by the writer (the writer calls ``done``)."""

    def __init__(self, arrays: list[np.ndarray], fail_at: int | None = None) -> None:
        self.arrays, self.fail_at = arrays, fail_at
        self.lock = threading.Lock()
        self.threads: list[str] = []
        self.made: list[int] = []
        self.out = 0  # made, not yet let go of
        self.most_out = 0
        self.ready = {i: threading.Event() for i in range(len(arrays))}

    def leaves(self) -> list[OutLeaf]:
        return [
            OutLeaf(a.shape, a.dtype, lambda i=i: self.make(i)) for i, a in enumerate(self.arrays)
        ]

    def make(self, i: int) -> np.ndarray:
        if i == self.fail_at:
            raise ValueError(f"array {i} cannot be read")
        with self.lock:
            self.threads.append(threading.current_thread().name)
            self.made.append(i)
            self.out += 1
            self.most_out = max(self.most_out, self.out)
        self.ready[i].set()
        return self.arrays[i].copy()

    def done(self) -> None:
        with self.lock:
            self.out -= 1


def arrays(n: int, size: int = MIB) -> list[np.ndarray]:
    rng = np.random.default_rng(n)
    return [rng.integers(0, 1 << 30, size // 4, dtype=np.int32) for _ in range(n)]


def test_blocks_are_made_ahead_on_another_thread_in_order():
    made = Made(arrays(6))
    ahead = Ahead(made.leaves(), 8 * MIB)
    try:
        first = list(ahead.blocks(0))
        # while the writer holds array 0, the thread goes on to the next ones
        assert made.ready[1].wait(30), "array 1 was not made ahead"
        got = [first] + [list(ahead.blocks(i)) for i in range(1, 6)]
    finally:
        ahead.close()
    for blocks, want in zip(got, made.arrays):
        assert len(blocks) == 1 and np.array_equal(blocks[0], want)
    assert made.made == list(range(6))
    assert set(made.threads) == {"stepsafe-convert-ahead"}


def test_the_thread_stays_within_its_budget():
    made = Made(arrays(12))  # 1 MiB each, a budget of 3 MiB
    ahead = Ahead(made.leaves(), 3 * MIB)
    try:
        for i in range(12):
            for _ in ahead.blocks(i):
                made.ready[min(i + 2, 11)].wait(30)  # let the thread run ahead as far as it may
                assert made.out <= 3 + 1, f"{made.out} arrays made ahead of the writer"
            made.done()
    finally:
        ahead.close()
    assert made.most_out <= 4  # the budget's 3, and the one the writer just let go of
    assert made.made == list(range(12))


def test_asked_out_of_order_the_rest_is_made_on_the_writers_thread():
    made = Made(arrays(5))
    ahead = Ahead(made.leaves(), 4 * MIB)
    try:
        assert np.array_equal(next(iter(ahead.blocks(2))), made.arrays[2])  # 0 and 1 passed over
        again = list(ahead.blocks(1))  # behind: the pipeline stops, made here
        rest = [list(ahead.blocks(i)) for i in (3, 4)]
    finally:
        ahead.close()
    assert np.array_equal(again[0], made.arrays[1])
    assert all(np.array_equal(b[0], made.arrays[i]) for b, i in zip(rest, (3, 4)))
    assert made.threads[-3:] == [threading.current_thread().name] * 3


def test_an_error_reaches_the_writer_at_the_array_that_failed():
    made = Made(arrays(4), fail_at=2)
    ahead = Ahead(made.leaves(), 2 * MIB)
    try:
        assert np.array_equal(next(iter(ahead.blocks(0))), made.arrays[0])
        assert np.array_equal(next(iter(ahead.blocks(1))), made.arrays[1])
        with pytest.raises(ValueError, match="array 2 cannot be read"):
            list(ahead.blocks(2))
    finally:
        ahead.close()
    assert not any(t.name == "stepsafe-convert-ahead" for t in threading.enumerate())


def test_close_stops_the_thread_and_drops_what_it_made():
    made = Made(arrays(20))
    ahead = Ahead(made.leaves(), 4 * MIB)
    next(iter(ahead.blocks(0)))
    ahead.close()
    assert not any(t.name == "stepsafe-convert-ahead" for t in threading.enumerate())
    assert len(made.made) < 20  # it stopped at its budget and then for good


def test_a_buffer_is_reused_only_once_nothing_refers_to_its_block():
    pool = Pool(64 * MIB)
    for n in (1000, 8 * MIB):  # numpy's allocator, and a mapping of its own (host_memory)
        a = pool.empty((n // 4,), np.float32)
        a[:] = 1.5
        where = a.__array_interface__["data"][0]
        view = memoryview(a.reshape(-1).view(np.uint8))[8:16]  # what a writer may still hold
        del a
        b = pool.empty((n // 4,), np.float32)
        assert b.__array_interface__["data"][0] != where  # the block is still referred to
        assert bytes(view) == np.full(2, 1.5, np.float32).tobytes()
        del view
        c = pool.empty((n // 8,), np.float32)  # smaller: fits in the free buffer
        assert c.__array_interface__["data"][0] == where
        del b, c
    assert pool.free_bytes() == pool.nbytes > 0
    pool.trim(0)
    assert pool.nbytes == 0


def test_empty_is_plain_numpy_outside_a_pool_and_pooled_inside():
    assert empty((3, 4), np.float32).shape == (3, 4)
    with pooled(16 * MIB) as pool:
        a = empty((1024, 1024), np.float32)
        assert pool.nbytes == 4 * MIB and a.flags.c_contiguous
        assert empty((), np.float32).shape == ()
    assert pool.nbytes == 0


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_unstacked_layers_written_through_reused_buffers_are_bit_exact(tmp_path, axis):
    """Many layers through a budget of a few: every buffer is reused several times."""
    rng = np.random.default_rng(axis)
    shape = [64, 48, 32]
    shape[axis] = 12  # the layers
    w = rng.standard_normal(shape, dtype=np.float32)
    src = tmp_path / "src"
    b = np.take(w, [0], axis=(axis + 1) % 3)  # another array with the same layers
    stepsafe.save(str(src), {"params": {"layers": {"w": w, "b": b}}, "step": 3})
    dst = tmp_path / "dst"
    convert_checkpoint(str(src), str(dst), param_only=True, unstack=True, scan_axis=axis)
    got = CheckpointReader(*storage_for(str(dst)))
    for i in range(12):
        want = np.take(w, i, axis=axis)
        assert np.array_equal(got.read_array(f"params/layers_{i}/w"), want)
        assert np.array_equal(got.read_array(f"params/layers_{i}/b"), np.take(b, i, axis=axis))


def test_safetensors_through_the_pipeline_is_bit_exact(tmp_path):
    rng = np.random.default_rng(7)
    stacked = rng.standard_normal((256, 10, 1664), dtype=np.float32)  # layers of 1.6 MiB
    tensors = [(f"layers.{i}.w", x) for i, x in enumerate(ops.layers(stacked, axis=1))]
    tensors.append(("lm_head", ops.as_leaf(rng.standard_normal((7, 5)).astype(np.float16))))
    out = tmp_path / "hf"  # tensors written in pieces (WRITE_PIECE), through reused buffers
    files = write_safetensors(str(out), tensors, max_shard_bytes=4 * MIB)
    assert len([f for f in files if f.endswith(".safetensors")]) > 1
    found = {}
    for f in files:
        if f.endswith(".safetensors"):
            with safe_open(str(out / f), framework="numpy") as r:
                found |= {k: r.get_tensor(k) for k in r.keys()}  # noqa: SIM118
    for i in range(10):
        assert np.array_equal(found[f"layers.{i}.w"], stacked[:, i])
    assert np.array_equal(found["lm_head"], np.asarray(tensors[-1][1]))


def test_a_failure_midway_commits_nothing_and_stops_the_thread(tmp_path):
    good = np.arange(1 << 18, dtype=np.float32)

    def broken() -> np.ndarray:
        raise StepsafeError("the source went away")

    tree = {
        "a": OutLeaf(good.shape, good.dtype, lambda: good),
        "b": OutLeaf(good.shape, good.dtype, broken),
        "c": OutLeaf(good.shape, good.dtype, lambda: good),
    }
    storage, path = storage_for(str(tmp_path / "ckpt"))
    with pytest.raises(StepsafeError, match="the source went away"):
        write_tree(storage, path, tree, step=1)
    assert not (tmp_path / "ckpt").exists()
    with pytest.raises(StepsafeError, match="the source went away"):
        write_safetensors(str(tmp_path / "hf"), list(tree.items()))
    assert not (tmp_path / "hf").exists()
    assert not any(t.name == "stepsafe-convert-ahead" for t in threading.enumerate())
