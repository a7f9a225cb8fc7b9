"""Cold reads around the page cache (storage/direct_read.py): the same bytes as a buffered read
at every alignment, the page cache used where the file is in it, a short file still refused,
and filesystems without O_DIRECT read the buffered way. Real files on the test's disk; the
page cache is emptied for a file with ``posix_fadvise(DONTNEED)`` after an fsync."""

from __future__ import annotations

import os

import numpy as np
import pytest

import stepsafe
from stepsafe import knobs
from stepsafe.errors import ChecksumMismatchError, TruncatedDataError
from stepsafe.storage import direct_read, direct_write
from stepsafe.storage.local import LocalReadHandle

BUF = 65536


@pytest.fixture
def small_buffer(monkeypatch):
    """64 KiB buffers: every edge of one is cheap to reach."""
    monkeypatch.setattr(knobs, "DIRECT_WRITE_BUFFER_BYTES", BUF)
    monkeypatch.setattr(direct_write._local, "buffers", None, raising=False)


def _uncache(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _cache(path) -> None:
    with open(path, "rb") as f:
        while f.read(1 << 20):
            pass


def _file(tmp_path, n: int = 5 * BUF + 123) -> tuple[str, bytes]:
    data = np.random.default_rng(n).bytes(n)
    path = str(tmp_path / "f.data")
    with open(path, "wb") as f:
        f.write(data)
    _uncache(path)
    return path, data


def _spy(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = direct_read.read_direct

    def spy(fd, offset, views):
        calls.append(offset)
        return real(fd, offset, views)

    monkeypatch.setattr("stepsafe.storage.local.read_direct", spy)
    return calls


@pytest.mark.parametrize("offset", [0, 1, 63, 4095, 4096, BUF - 1, BUF + 4097])
@pytest.mark.parametrize("pieces", [[BUF], [1, BUF - 1, 7], [3000] * 30, [BUF * 2, 1, 4096]])
def test_direct_reads_fill_any_views_at_any_offset(tmp_path, small_buffer, offset, pieces):
    path, data = _file(tmp_path)
    fd = direct_read.reopen_direct(os.open(path, os.O_RDONLY))
    if fd is None:
        pytest.skip("this filesystem refuses O_DIRECT")
    outs = [bytearray(n) for n in pieces]
    filled = direct_read.read_direct(fd, offset, [memoryview(o) for o in outs])
    want = data[offset : offset + sum(pieces)]
    assert filled == len(want)
    assert b"".join(outs)[:filled] == want


def test_a_run_past_the_end_of_the_file_is_refused(tmp_path, small_buffer):
    path, data = _file(tmp_path)
    h = LocalReadHandle(path)
    try:
        out = memoryview(bytearray(2 * BUF))
        with pytest.raises(TruncatedDataError, match="truncated"):
            h.read_run(len(data) - BUF, [out])
        out = memoryview(bytearray(2 * BUF))
        h.read_run(len(data) - 2 * BUF, [out])  # up to the very end: whole
        assert bytes(out) == data[-2 * BUF :]
    finally:
        h.close()


def test_cold_runs_go_around_the_cache_and_cached_ones_through_it(
    tmp_path, small_buffer, monkeypatch
):
    path, data = _file(tmp_path)
    calls = _spy(monkeypatch)
    h = LocalReadHandle(path)
    try:
        out = memoryview(bytearray(3 * BUF))
        h.read_run(100, [out])
        assert bytes(out) == data[100 : 100 + 3 * BUF]
        assert calls == [100] or h._buffered_only  # direct where the filesystem allows it
        small = memoryview(bytearray(BUF - 1))  # smaller than a buffer: buffered
        h.read_run(7, [small])
        assert bytes(small) == data[7 : 7 + BUF - 1]
        _cache(path)
        calls.clear()
        h.read_run(100, [out])
        assert calls == [] and bytes(out) == data[100 : 100 + 3 * BUF]
    finally:
        h.close()


def test_mostly_cached_follows_the_page_cache(tmp_path):
    path, _ = _file(tmp_path, 8 << 20)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert not direct_read.mostly_cached(fd, 4096, 4 << 20)
        _cache(path)
        assert direct_read.mostly_cached(fd, 4096, 4 << 20)
    finally:
        os.close(fd)


def test_a_filesystem_without_o_direct_is_read_buffered(small_buffer):
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    path = f"/dev/shm/stepsafe-direct-read-{os.getpid()}"
    data = np.random.default_rng(1).bytes(4 * BUF)
    try:
        with open(path, "wb") as f:
            f.write(data)
        h = LocalReadHandle(path)
        out = memoryview(bytearray(3 * BUF))
        h.read_run(5, [out])
        h.close()
        assert bytes(out) == data[5 : 5 + 3 * BUF]
    finally:
        os.unlink(path)


def _tree() -> dict:
    rng = np.random.default_rng(3)
    return {
        "w": rng.standard_normal((300, 257)).astype(np.float32),
        "v": rng.integers(0, 9, (200001,), dtype=np.int64),
        "h": rng.standard_normal(12345).astype(np.float16),
        "step": 5,
    }


def test_a_cold_restore_reads_around_the_cache_bit_exact(tmp_path, small_buffer, monkeypatch):
    monkeypatch.setattr(knobs, "PARALLEL_BYTES", 1)  # reads on the I/O threads
    tree = _tree()
    stepsafe.save(tmp_path / "c", tree, data_file_size_bytes=1 << 20)
    data = sorted((tmp_path / "c" / "items").glob("*.data"))
    assert len(data) > 1  # several files, read on several threads
    for p in data:
        _uncache(p)
    calls = _spy(monkeypatch)
    out = stepsafe.restore(tmp_path / "c")
    for k in ("w", "v", "h"):
        np.testing.assert_array_equal(out[k], tree[k])
    if direct_read.reopen_direct(os.open(data[0], os.O_RDONLY)) is not None:
        assert calls  # the cold runs went around the cache
    calls.clear()
    out = stepsafe.restore(tmp_path / "c")  # warm now? only what the buffered reads cached
    np.testing.assert_array_equal(out["w"], tree["w"])


def test_a_flipped_byte_read_around_the_cache_fails_its_checksum(tmp_path, small_buffer):
    tree = _tree()
    stepsafe.save(tmp_path / "c", tree)
    (path,) = (tmp_path / "c" / "items").glob("*.data")
    with open(path, "r+b") as f:
        f.seek(200_000)
        b = f.read(1)
        f.seek(200_000)
        f.write(bytes([b[0] ^ 1]))
    _uncache(path)
    with pytest.raises(ChecksumMismatchError):
        stepsafe.restore(tmp_path / "c")
