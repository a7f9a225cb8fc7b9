"""Data files written around the page cache (``storage.direct_write``): the same bytes as a
buffered write whatever the sizes and alignment, and the same bytes when the filesystem refuses
``O_DIRECT`` at open or at any write (then written the buffered way). A file bigger than one
buffer is double-buffered: one buffer is written by a short-lived thread while the caller fills
the other; its errors reach the caller as themselves, and nothing is written after one."""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import threading
import time

import numpy as np
import pytest

import stepsafe
from stepsafe import knobs
from stepsafe.storage import direct_write
from stepsafe.storage.local import write_all

SIZES = [0, 1, 4095, 4096, 4097, 8191, 8192, 8193, 3 * 8192 + 5, 4 * 8192, 7 * 8192 + 4097]


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
    monkeypatch.setattr(direct_write._local, "buffers", None, raising=False)


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


def _writer_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "stepsafe-direct-write"]


def _is_direct(fd: int) -> bool:
    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & getattr(os, "O_DIRECT", 0))


def _open_direct_or_skip(path) -> int:
    fd, direct = direct_write.open_direct(path)
    if not direct:
        os.close(fd)
        pytest.skip("this filesystem refuses O_DIRECT")
    return fd


def test_the_next_buffer_fills_while_the_last_one_is_written(tmp_path, small_buffer, monkeypatch):
    """The first direct write waits (up to 5 s) until the stream has been asked for its third
    chunk: it can only see that if the caller went on filling the second buffer meanwhile
    (written in the caller's thread, the write would wait out the 5 s and see nothing)."""
    real_pwrite, asked_for_third = os.pwrite, threading.Event()
    seen: list[tuple[int, bool, bool]] = []  # (offset, the third chunk asked for, caller's thread)
    caller = threading.get_ident()

    def slow_disk(fd, data, offset):
        if offset == 0 and _is_direct(fd):
            seen.append((offset, asked_for_third.wait(5), threading.get_ident() == caller))
        return real_pwrite(fd, data, offset)

    def stream(data: bytes):
        view = memoryview(data)
        yield view[:8192]
        yield view[8192:16384]
        asked_for_third.set()
        yield view[16384:]

    monkeypatch.setattr(os, "pwrite", slow_disk)
    data = os.urandom(3 * 8192 + 100)
    fd = _open_direct_or_skip(tmp_path / "f.data")
    try:
        assert direct_write.write_direct(fd, stream(data), write_all) == len(data)
    finally:
        os.close(fd)
    assert seen == [(0, True, False)]
    assert (tmp_path / "f.data").read_bytes() == data
    assert not _writer_threads()


@pytest.mark.parametrize("size", [100, 8192])
def test_a_file_in_one_buffer_starts_no_thread(tmp_path, small_buffer, monkeypatch, size):
    started: list[threading.Thread] = []
    real_start = threading.Thread.start

    def spy(self):
        started.append(self)
        return real_start(self)

    monkeypatch.setattr(threading.Thread, "start", spy)
    data = os.urandom(size)
    n, _ = _write(tmp_path / "f.data", data, 3000)
    assert n == size and (tmp_path / "f.data").read_bytes() == data and not started


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EFBIG, errno.EIO])
@pytest.mark.parametrize("failing", [0, 8192, 3 * 8192])
def test_a_failed_write_is_raised_as_itself_and_nothing_is_written_after_it(
    tmp_path, small_buffer, monkeypatch, err, failing
):
    """The writer thread's error is raised in the caller's thread (the same object), the
    writes queued behind it are skipped, and the thread is gone when write_direct returns."""
    real_pwrite, tried, raised = os.pwrite, [], []

    def failing_disk(fd, data, offset):
        tried.append(offset)
        if offset == failing:
            raised.append(OSError(err, os.strerror(err)))
            raise raised[-1]
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", failing_disk)
    data = os.urandom(6 * 8192 + 10)
    fd = _open_direct_or_skip(tmp_path / "f.data")
    try:
        with pytest.raises(OSError) as info:
            direct_write.write_direct(fd, _chunks(data, 3000), write_all)
    finally:
        os.close(fd)
    assert info.value is raised[0] and info.value.errno == err
    assert tried == list(range(0, failing + 1, 8192))  # in order, and none after the failure
    assert not _writer_threads()


@pytest.mark.parametrize("refused_at", [8192, 2 * 8192, 5 * 8192, 6 * 8192])
def test_refused_at_a_later_write_goes_on_buffered_from_there(
    tmp_path, small_buffer, monkeypatch, refused_at
):
    """EINVAL at any direct write, with the other buffer filled or queued behind it: O_DIRECT
    is turned off, the direct writes before it stay, and the rest is written the buffered way
    from its offset (the last, 6 * 8192, is the padded one)."""
    real_pwrite, direct_offsets = os.pwrite, []

    def refuse_one(fd, data, offset):
        if _is_direct(fd):
            direct_offsets.append(offset)
            if offset == refused_at:
                raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", refuse_one)
    data = os.urandom(6 * 8192 + 10)
    n, direct = _write(tmp_path / "f.data", data, 3000)
    if not direct:
        pytest.skip("this filesystem refuses O_DIRECT")
    assert n == len(data) and (tmp_path / "f.data").read_bytes() == data
    assert direct_offsets == list(range(0, refused_at + 1, 8192))
    assert not _writer_threads()


def test_a_stream_that_raises_stops_the_writer(tmp_path, small_buffer):
    """The producer's own error comes out unchanged, with the writer thread joined."""

    def dying(data: bytes):
        yield from _chunks(data[: 4 * 8192], 5000)
        raise RuntimeError("the producer died")

    fd = _open_direct_or_skip(tmp_path / "f.data")
    try:
        with pytest.raises(RuntimeError, match="producer died"):
            direct_write.write_direct(fd, dying(os.urandom(5 * 8192)), write_all)
    finally:
        os.close(fd)
    assert not _writer_threads()


def test_two_buffers_per_thread_reused_across_files(tmp_path, small_buffer, monkeypatch):
    """Every direct write comes from this thread's pair of buffers, the same pair file after
    file: memory stays at two buffers per writing thread."""
    real_pwrite, sources = os.pwrite, set()

    def note_source(fd, data, offset):
        if _is_direct(fd):
            sources.add(id(memoryview(data).obj))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", note_source)
    pair = direct_write.thread_buffers()
    for i in range(3):
        data = os.urandom(5 * 8192 + i)
        assert _write(tmp_path / f"f{i}.data", data, 3000)[0] == len(data)
        assert (tmp_path / f"f{i}.data").read_bytes() == data
    assert direct_write.thread_buffers() is pair and pair[0].obj is not pair[1].obj
    if sources:  # empty where the filesystem refuses O_DIRECT
        assert sources == {id(pair[0].obj), id(pair[1].obj)}


def test_a_forked_child_writes_with_a_writer_of_its_own(tmp_path, small_buffer):
    """A child forked after (and while another thread runs) a double-buffered write has no
    writer thread of its parent's: it starts its own and writes every byte."""
    data = os.urandom(5 * 8192 + 7)
    _write(tmp_path / "parent.data", data, 3000)
    busy = threading.Thread(target=_write, args=(tmp_path / "busy.data", data * 40, 3000))
    busy.start()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            n, _ = _write(tmp_path / "child.data", data[::-1], 1000)
            code = 0 if n == len(data) and not _writer_threads() else 2
        finally:
            os._exit(code)
    busy.join()
    for _ in range(300):  # a child stuck on a lock it inherited would hang the suite: 30 s
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.1)
    else:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the forked child hung")
    assert os.waitstatus_to_exitcode(status) == 0
    assert (tmp_path / "child.data").read_bytes() == data[::-1]
    assert (tmp_path / "busy.data").read_bytes() == data * 40
