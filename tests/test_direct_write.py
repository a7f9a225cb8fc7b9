"""Data files written around the page cache (``storage.direct_write``): the same bytes as a
buffered write whatever the sizes and alignment, and the same bytes when the filesystem refuses
``O_DIRECT`` at open or at the first write (then written the buffered way)."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest

import stepsafe
from stepsafe import knobs
from stepsafe.storage import direct_write
from stepsafe.storage.local import write_all

SIZES = [0, 1, 4095, 4096, 4097, 8191, 8192, 8193, 3 * 8192 + 5]


def _chunks(data: bytes, cut: int) -> list[memoryview]:
    view = memoryview(data)
    return [view[i : i + cut] for i in range(0, len(data), cut)] or []


def _write(path, data: bytes, cut: int) -> tuple[int, bool]:
    fd, direct = direct_write.open_direct(path)
    try:
        if direct:
            n = direct_write.write_direct(fd, _chunks(data, cut), write_all)
        else:
            n = write_all(fd, _chunks(data, cut))
        os.fsync(fd)
    finally:
        os.close(fd)
    return n, direct


@pytest.fixture
def small_buffer(monkeypatch):
    monkeypatch.setattr(knobs, "DIRECT_WRITE_BUFFER_BYTES", 8192)  # two blocks: edges are cheap
    monkeypatch.setattr(direct_write._local, "buffer", None, raising=False)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("cut", [1000, 4096, 1 << 20])
def test_direct_writes_are_the_bytes_whatever_the_sizes(tmp_path, small_buffer, size, cut):
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    n, direct = _write(tmp_path / "f.data", data, cut)
    assert n == size and (tmp_path / "f.data").read_bytes() == data
    if not direct:
        pytest.skip("this filesystem refuses O_DIRECT: the buffered way was taken (checked)")


def test_refused_at_open_is_written_buffered(tmp_path, small_buffer, monkeypatch):
    """A filesystem that refuses the flag (ramfs: EINVAL once the file exists) is written the
    buffered way, the file made once."""
    import fcntl

    real_fcntl = fcntl.fcntl

    def no_direct(fd, cmd, arg=0):
        if cmd == fcntl.F_SETFL and arg & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "O_DIRECT not supported")
        return real_fcntl(fd, cmd, arg)

    monkeypatch.setattr(fcntl, "fcntl", no_direct)
    data = os.urandom(20_000)
    n, direct = _write(tmp_path / "f.data", data, 3000)
    assert not direct and n == len(data) and (tmp_path / "f.data").read_bytes() == data


@pytest.mark.parametrize("size", [100, 8192, 20_000])
def test_refused_at_the_first_write_goes_on_buffered(tmp_path, small_buffer, monkeypatch, size):
    """A filesystem that opens with O_DIRECT but refuses its writes (EINVAL): the flag is
    turned off on the file and every byte still lands, in order."""
    real_pwrite, refused = os.pwrite, []

    def refuse_direct(fd, data, offset):
        import fcntl

        if fcntl.fcntl(fd, fcntl.F_GETFL) & getattr(os, "O_DIRECT", 0):
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", refuse_direct)
    data = os.urandom(size)
    n, direct = _write(tmp_path / "f.data", data, 3000)
    assert n == size and (tmp_path / "f.data").read_bytes() == data
    if direct:  # a file smaller than the buffer is never written direct
        assert refused == ([0] if size >= 8192 else [])


def test_a_save_with_direct_writes_off_or_on_reads_back_alike(tmp_path, monkeypatch):
    tree = {"a": np.arange(100_000, dtype=np.float32), "b": np.ones((3, 7)), "s": 3}
    stepsafe.save(str(tmp_path / "on"), tree)
    monkeypatch.setattr(knobs, "DIRECT_WRITE_BUFFER_BYTES", 0)
    stepsafe.save(str(tmp_path / "off"), tree)
    for name in ("on", "off"):
        out = stepsafe.restore(str(tmp_path / name))
        assert out["a"].tobytes() == tree["a"].tobytes() and out["s"] == 3
    assert not stepsafe.verify(str(tmp_path / "on")).problems
