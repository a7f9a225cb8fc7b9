"""Batched ranged reads: how ranges merge into requests, and that every byte lands where it
belongs, on a local disk and on buckets alike; and how wanted boxes map onto saved shards."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import BUCKET_KINDS

from stepsafe.errors import TruncatedDataError
from stepsafe.format.manifest import ArrayEntry, Chunk, Shard
from stepsafe.format.regions import plan_array_read
from stepsafe.storage import RangeRead, storage_for
from stepsafe.storage.ranges import plan_spans


def reads_of(*ranges: tuple[str, int, int]) -> list[RangeRead]:
    return [RangeRead(p, o, memoryview(bytearray(n))) for p, o, n in ranges]


def test_neighbours_merge_across_small_gaps_and_files_stay_apart():
    reads = reads_of(("b", 0, 10), ("a", 100, 10), ("a", 0, 64), ("a", 64, 30), ("b", 50, 5))
    spans = plan_spans(reads, max_span=1000, max_gap=8)
    assert [(s.path, s.start, s.end) for s in spans] == [("a", 0, 110), ("b", 0, 10), ("b", 50, 55)]
    a = spans[0]  # the read at 100 sits 6 bytes after the one ending at 94: fetched and dropped
    assert sorted(a.pieces) == [(1, 0, 100, 10), (2, 0, 0, 64), (3, 0, 64, 30)]


def test_spans_never_exceed_the_limit_and_big_reads_are_split():
    reads = reads_of(("f", 0, 250), ("f", 250, 10), ("f", 260, 100))
    spans = plan_spans(reads, max_span=100, max_gap=0)
    assert [(s.start, s.end) for s in spans] == [(0, 100), (100, 200), (200, 300), (300, 360)]
    covered = {i: 0 for i in range(3)}
    for s in spans:
        assert s.end - s.start <= 100
        for i, at, pos, n in s.pieces:
            assert reads[i].offset + at == s.start + pos
            covered[i] += n
    assert covered == {0: 250, 1: 10, 2: 100}


def test_overlapping_reads_share_the_bytes():
    reads = reads_of(("f", 0, 40), ("f", 10, 20))
    (span,) = plan_spans(reads, max_span=100, max_gap=0)
    assert (span.start, span.end) == (0, 40)


def check_every_byte_lands_where_it_belongs(base: str) -> None:
    """Random ranges of two files, some adjacent, some overlapping, some far apart, in random
    order: each buffer ends up holding exactly its range, and ``done`` runs once per read."""
    rng = np.random.default_rng(7)
    storage, local = storage_for(base)
    blobs = {name: rng.bytes(3 << 20) for name in ("x", "y")}
    with storage.transaction(storage.join(local, "d")) as txn:
        for name, blob in blobs.items():
            txn.write_file(name, [blob])
        txn.write_file("_CHECKPOINT_METADATA", [b"{}"])
        txn.commit()
    wanted = []
    for _ in range(300):
        name = str(rng.choice(["x", "y"]))
        n = int(rng.choice([1, 100, 4096, 1 << 20]))
        wanted.append((name, int(rng.integers(0, (3 << 20) - n)), n))
    reads = reads_of(*((storage.join(local, "d", f), o, n) for f, o, n in wanted))
    done: list[int] = []
    storage.read_ranges(reads, done.append)
    assert sorted(done) == list(range(len(reads)))
    for r, (name, offset, n) in zip(reads, wanted):
        assert bytes(r.buf) == blobs[name][offset : offset + n]


def test_every_byte_lands_where_it_belongs_on_disk(tmp_path):
    check_every_byte_lands_where_it_belongs(str(tmp_path))


@pytest.mark.parametrize("bucket_url", BUCKET_KINDS, indirect=True)
def test_every_byte_lands_where_it_belongs_on_buckets(bucket_url):
    check_every_byte_lands_where_it_belongs(bucket_url)


@pytest.mark.parametrize("bucket_url", ["memory"], indirect=True)
def test_a_read_past_the_end_is_a_truncation(bucket_url):
    storage, local = storage_for(bucket_url)
    with storage.transaction(local) as txn:
        txn.write_file("f", [b"x" * 1000])
        txn.write_file("_CHECKPOINT_METADATA", [b"{}"])
        txn.commit()
    with pytest.raises(TruncatedDataError, match="truncated"):
        storage.read_ranges(reads_of((storage.join(local, "f"), 900, 200)))


def test_boxes_that_share_a_saved_shard_read_it_once():
    """Four column blocks of an array saved whole: one staging read of the saved shard, four
    copies out of it; the same array saved in row blocks and wanted whole: read in place."""
    whole = Shard(((0, 8), (0, 8)), (Chunk("f", 0, 256, "x"),))
    entry = ArrayEntry(np.dtype(np.float32), "float32", (8, 8), (whole,))
    boxes = [((0, 8), (2 * i, 2 * i + 2)) for i in range(4)]
    plan = plan_array_read("a", entry, boxes)
    assert len(plan.reads) == 1 and plan.reads[0][1].nbytes == 256  # the whole shard, once
    assert len(plan.copies) == 4 and set(plan.outs) == set(boxes)

    rows = tuple(
        Shard(((4 * i, 4 * i + 4), (0, 8)), (Chunk("f", 128 * i, 128, "x"),)) for i in (0, 1)
    )
    entry = ArrayEntry(np.dtype(np.float32), "float32", (8, 8), rows)
    plan = plan_array_read("a", entry, [((0, 8), (0, 8))])
    out = plan.outs[((0, 8), (0, 8))]
    assert not plan.copies and all(np.shares_memory(dest, out) for _, dest in plan.reads)


def test_a_box_reads_only_the_chunks_that_hold_its_bytes():
    """An array saved whole in 8 chunks (one per row) and wanted in row quarters by different
    processes: each quarter reads its own 2 chunks, never the whole shard; a column box needs
    a span of every row, so it reads them all."""
    chunks = tuple(Chunk("f", 32 * i, 32, f"c{i}") for i in range(8))
    entry = ArrayEntry(np.dtype(np.float32), "float32", (8, 8), (Shard(((0, 8), (0, 8)), chunks),))
    for q in range(4):
        plan = plan_array_read("a", entry, [((2 * q, 2 * q + 2), (0, 8))])
        (read,) = plan.reads
        assert read[0] == chunks[2 * q : 2 * q + 2] and read[1].nbytes == 64, (q, read[0])
    # a box inside rows 3..5 and columns 2..4: chunks 3 and 4 only
    (read,) = plan_array_read("a", entry, [((3, 5), (2, 4))]).reads
    assert read[0] == chunks[3:5]
    (read,) = plan_array_read("a", entry, [((0, 8), (6, 8))]).reads
    assert read[0] == chunks
