"""The manifest is built from what was written: a storage that stops reading a data file's
stream commits nothing, parts that leave a gap or overlap are refused at the merge, what a
process writes goes to storage without copies, and ``verify`` (built on the reader) collects
every problem, reading in windows of ``knobs.WINDOW_BYTES``."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from trees import assert_bit_exact

import stepsafe
from stepsafe import knobs
from stepsafe.errors import ConfigError, ManifestError
from stepsafe.format import CheckpointReader, CommitRecord, HostArray, write_checkpoint
from stepsafe.format.manifest import Chunk, Shard
from stepsafe.format.merge import merge_parts
from stepsafe.format.plan import FilePlan, Piece, PlannedShard, WritePlan, plan_files
from stepsafe.format.writer import commit_manifest
from stepsafe.format.written import WrittenPart, write_files
from stepsafe.storage import LocalStorage, Transaction

SAVE_ID = "0123456789abcdef"


class _Wrapped(Transaction):
    """A real local transaction whose data files go through ``feed`` on the way in."""

    def __init__(self, inner: Transaction, feed) -> None:
        self.inner, self.feed = inner, feed

    def write_file(self, relpath: str, chunks: Iterable[memoryview | bytes]) -> None:
        if relpath.startswith("items/process_"):
            chunks = self.feed(chunks)
        self.inner.write_file(relpath, chunks)

    def commit(self) -> None:
        self.inner.commit()

    def abort(self) -> None:
        self.inner.abort()


class _FeedStorage(LocalStorage):
    """Local disk, with every data file's stream passed through ``feed`` first."""

    def __init__(self, feed) -> None:
        super().__init__()
        self.feed = feed

    def transaction(self, path: str) -> Transaction:
        return _Wrapped(super().transaction(path), self.feed)


def _one_shard(key: str, a: np.ndarray) -> HostArray:
    return HostArray(key, a.dtype, a.shape, [(tuple((0, n) for n in a.shape), a)])


def _structure(keys: list[str]) -> list:
    return ["dict", keys, [["leaf"] for _ in keys]]


def _write(storage, path: Path, arrays: list[HostArray], **kwargs) -> None:
    write_checkpoint(
        storage,
        str(path),
        _structure([a.path for a in arrays]),
        arrays,
        {},
        record=CommitRecord(step=1, save_id=SAVE_ID),
        **kwargs,
    )


def _nothing_committed(path: Path) -> None:
    assert not path.exists()
    assert not path.parent.exists() or os.listdir(path.parent) == []  # no temporary either


BIG = np.arange(3 << 20, dtype=np.uint8)  # three pieces of 1 MiB and more (GATHER_BYTES)


@pytest.mark.parametrize("keep", [0, 1])
def test_a_storage_that_stops_reading_a_stream_early_commits_nothing(tmp_path, keep):
    """It returns without error after ``keep`` buffers: the writer sees that the stream was
    not read to its end, and no manifest is built from it."""
    storage = _FeedStorage(lambda chunks: itertools.islice(chunks, keep))
    arrays = [_one_shard("a", BIG), _one_shard("b", BIG[::-1].copy())]
    path = tmp_path / "run" / "1"
    with pytest.raises(ManifestError, match=r"'a', 'b' were not written in full.*nothing was"):
        _write(storage, path, arrays)
    _nothing_committed(path)


def test_a_storage_that_reads_every_buffer_commits(tmp_path):
    storage = _FeedStorage(lambda chunks: list(chunks))
    arrays = [_one_shard("a", BIG), _one_shard("b", BIG[::-1].copy())]
    _write(storage, tmp_path / "1", arrays)
    out = stepsafe.restore(tmp_path / "1")
    assert_bit_exact(out, {"a": arrays[0].shards[0][1], "b": arrays[1].shards[0][1]})


def test_big_pieces_reach_the_storage_as_the_callers_memory(tmp_path):
    """No copy on the way: each big shard is handed over as a view of the caller's array."""
    seen: list = []

    def feed(chunks):
        for c in chunks:
            seen.append(c)
            yield c

    arrays = [_one_shard("a", BIG), _one_shard("b", np.ones(5, np.int8))]
    _write(_FeedStorage(feed), tmp_path / "1", arrays)
    assert any(isinstance(c, memoryview) and np.shares_memory(np.asarray(c), BIG) for c in seen)


def test_data_file_size_too_small_is_a_config_error_naming_the_option(tmp_path):
    with pytest.raises(ConfigError, match="data_file_size_bytes must be at least 64, got 10"):
        _write(LocalStorage(), tmp_path / "run" / "1", [_one_shard("a", BIG)], file_size=10)
    with pytest.raises(stepsafe.StepsafeError, match="data_file_size_bytes"):
        stepsafe.save(tmp_path / "run" / "2", {"a": BIG}, data_file_size_bytes=63)
    _nothing_committed(tmp_path / "run" / "1")


def test_the_files_written_do_not_depend_on_the_gather_knob(tmp_path, monkeypatch):
    """``GATHER_BYTES`` changes how bytes are handed over, never the bytes of any file."""
    rng = np.random.default_rng(3)
    tree = [_one_shard(f"s{i}", rng.integers(0, 9, 7 * i + 1, np.int16)) for i in range(40)]
    tree.append(_one_shard("big", rng.standard_normal(70_000)))
    written = []
    for n, gather in enumerate([1, 4096, 1 << 20, 1 << 30]):
        monkeypatch.setattr(knobs, "GATHER_BYTES", gather)
        _write(LocalStorage(), tmp_path / str(n), tree, file_size=200_000)
        root = tmp_path / str(n) / "items"
        written.append({p.name: p.read_bytes() for p in sorted(root.iterdir())})
    assert len(written[0]) == 4  # the manifest and three data files
    assert all(w == written[0] for w in written)


@pytest.mark.parametrize(
    ("second", "problem"),
    [(0, "piece 0 was written twice"), (2, r"'v': shard \(\(0, 32\),\) was not written in full")],
    ids=["twice", "never"],
)
def test_every_planned_piece_must_be_written_exactly_once(tmp_path, second, problem):
    """The part is assembled from the files' records and the plan: a piece written twice, or
    one that no file's record holds, is refused (plans with such a bug, made by hand: shard
    'v' is pieces 0 and 1, and the second file holds piece ``second``)."""
    data = memoryview(np.arange(32, dtype=np.uint8))
    files = [
        FilePlan(
            f"process_0.0000{n}.{SAVE_ID}.data", [Piece(i, "v", 0, 16, data[16 * n :][:16])], 16
        )
        for n, i in enumerate([0, second])
    ]
    plan = WritePlan(files, [PlannedShard("v", ((0, 32),), range(2))], 3)
    path = tmp_path / "run" / "1"
    txn = LocalStorage().transaction(str(path))
    with pytest.raises(ManifestError, match=rf"{problem}: nothing was committed"), txn:
        write_files(txn, plan)
        txn.commit()
    _nothing_committed(path)


# -- parts: what each process wrote, merged into one manifest ------------------------------

FULL = (np.arange(48, dtype=np.float32).reshape(8, 6) - 7).astype(ml_dtypes.bfloat16)


def _part_of(txn: Transaction, process: int, boxes: list) -> WrittenPart:
    shards = [(b, np.ascontiguousarray(FULL[tuple(slice(*r) for r in b)])) for b in boxes]
    arrays = [HostArray("w", FULL.dtype, FULL.shape, shards)]
    return write_files(txn, plan_files(arrays, 80, process, SAVE_ID))


def _merge_and_commit(path: Path, parts_boxes: list[list]) -> None:
    arrays = [HostArray("w", FULL.dtype, FULL.shape, [])]  # only key, dtype, shape are used
    with LocalStorage().transaction(str(path)) as txn:
        parts = [_part_of(txn, p, boxes) for p, boxes in enumerate(parts_boxes)]
        manifest = merge_parts(_structure(["w", "n"]), arrays, {"n": 3}, parts, SAVE_ID)
        commit_manifest(txn, manifest.to_json(), CommitRecord(step=5, save_id=SAVE_ID))


def test_parts_of_two_processes_merge_into_one_checkpoint(tmp_path):
    """Each 'process' plans and writes its own files; one manifest covers both halves."""
    top, bottom = [((0, 4), (0, 6))], [((4, 8), (0, 6))]
    _merge_and_commit(tmp_path / "5", [top, bottom])
    assert_bit_exact(stepsafe.restore(tmp_path / "5"), {"w": FULL, "n": 3})
    names = sorted(p.name for p in (tmp_path / "5" / "items").glob("*.data"))
    assert {n.split(".")[0] for n in names} == {"process_0", "process_1"}
    assert stepsafe.verify(str(tmp_path / "5")).ok


@pytest.mark.parametrize(
    ("parts", "problem"),
    [
        ([[((0, 4), (0, 6))], [((4, 7), (0, 6))]], "leave gaps in"),
        ([[((0, 4), (0, 6))], []], "leave gaps in"),  # a process that wrote nothing
        ([[((0, 5), (0, 6))], [((4, 8), (0, 6))]], "overlap"),
        ([[((0, 8), (0, 6))], [((0, 8), (0, 6))]], "overlap"),  # both wrote everything
        ([[((0, 4), (0, 3)), ((4, 8), (0, 6))], [((0, 4), (2, 6))]], "overlap"),
    ],
    ids=["gap", "missing-part", "overlap", "twice", "irregular-overlap"],
)
def test_a_merge_that_leaves_a_gap_or_an_overlap_is_refused(tmp_path, parts, problem):
    path = tmp_path / "run" / "5"
    with pytest.raises(ManifestError, match=rf"'w': its shards {problem}.*nothing was committed"):
        _merge_and_commit(path, parts)
    _nothing_committed(path)


def _chunk_part(
    file: str, index, length: int, key: str = "v", points_at: str | None = None
) -> WrittenPart:
    chunk = Chunk(points_at or file, 0, length, "0" * 16)
    return WrittenPart({file: length}, {key: [Shard(index, (chunk,))]})


F0, F1 = (f"process_{p}.00000.{SAVE_ID}.data" for p in (0, 1))


@pytest.mark.parametrize(
    ("parts", "message"),
    [
        ([_chunk_part(F0, ((0, 2),), 8), _chunk_part(F0, ((2, 4),), 8)], "not one of its data"),
        ([_chunk_part(F0, ((0, 4),), 12)], r"written with 12 bytes, its box holds 16"),
        ([_chunk_part(F0, ((0, 5),), 20)], r"lies outside its shape \(4,\)"),
        ([_chunk_part(F0, ((0, 4),), 16, key="x")], "'x' was written but is not in the tree"),
        ([_chunk_part("f0", ((0, 4),), 16)], "'f0', which is not one of its data files"),
        ([_chunk_part(F0.replace(SAVE_ID, "a" * 16), ((0, 4),), 16)], "not one of its data"),
        (
            [_chunk_part(F0, ((0, 2),), 8), _chunk_part(F1, ((2, 4),), 8, points_at=F0)],
            "process 1 points at a data file it did not write",
        ),
    ],
    ids=[
        "another-process-file", "short-shard", "outside", "unknown-array", "not-a-data-file",
        "another-save", "points-elsewhere",
    ],
)  # fmt: skip
def test_merge_refuses_parts_that_do_not_describe_the_tree(parts, message):
    arrays = [HostArray("v", np.dtype(np.float32), (4,), [])]
    with pytest.raises(ManifestError, match=rf"{message}.*nothing was committed"):
        merge_parts(_structure(["v"]), arrays, {}, parts, SAVE_ID)


# -- verify, on the reader: every problem collected, windows of knobs.WINDOW_BYTES ---------


def test_verify_collects_every_problem_in_windows(tmp_path, monkeypatch):
    rng = np.random.default_rng(5)
    tree = {f"a{i}": rng.standard_normal(1000) for i in range(6)}
    stepsafe.save(tmp_path / "1", tree, data_file_size_bytes=16_000)  # two arrays a file
    with CheckpointReader(LocalStorage(), str(tmp_path / "1")) as reader:
        first = {k: reader.manifest.arrays[k].shards[0].chunks[0] for k in tree}
        total = reader.manifest.nbytes
    items = tmp_path / "1" / "items"
    for key in ("a0", "a3"):  # one flipped byte in two arrays, in two files
        c = first[key]
        data = bytearray((items / c.file).read_bytes())
        data[c.offset + 5] ^= 1
        (items / c.file).write_bytes(bytes(data))
    os.truncate(items / first["a5"].file, first["a5"].offset + 100)  # a5 cut short
    monkeypatch.setattr(knobs, "WINDOW_BYTES", 8000)  # one array a window
    seen = []
    report = stepsafe.verify(str(tmp_path / "1"), progress=lambda d, t: seen.append((d, t)))
    kinds = [(p.kind, p.key) for p in report.problems]
    assert kinds == [("size", None), ("checksum", "a0"), ("checksum", "a3"), ("unreadable", "a5")]
    assert report.bytes_total == total and report.bytes_checked == total - 8000
    assert len(seen) == 6 and seen[-1] == (total, total)
