"""Adversarial review of two changes: double-buffered direct writes (commit 929c26e,
``storage/direct_write.py``) and host leaves restored as saved in one batch (commit 0071491,
``CheckpointReader.read_arrays``, ``restore.AS_SAVED``).

Real files on the real disk (ext4 here), tmpfs in /dev/shm, RLIMIT_FSIZE and signals in child
processes, a loop-mounted ext4 where this process may mount. Three breaks it found, fixed and
kept as tests: a Ctrl-C while the writer thread started leaked it; a process that could start
no more threads could no longer save a file of several buffers; a truncated file of a
many-shard or cast leaf was found only after the batch had read everything else.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from conftest import BUCKET_KINDS
from trees import bit_exact, odd_tree

import stepsafe
from stepsafe import knobs
from stepsafe.checkpoint.restore import open_checkpoint
from stepsafe.errors import ChecksumMismatchError, TruncatedDataError
from stepsafe.format import CommitRecord
from stepsafe.format.checksum import checksum
from stepsafe.storage import direct_write
from stepsafe.storage.direct_write import open_direct, write_direct
from stepsafe.storage.local import write_all

PY = sys.executable
BUF = 65536
WRITER = "stepsafe-direct-write"
METADATA = "_CHECKPOINT_METADATA"  # the commit record (as tests/test_hostile_input.py)


@pytest.fixture
def buf64k(monkeypatch):
    """A 64 KiB buffer: every edge of it (and of two of them) is cheap to reach."""
    monkeypatch.setattr(knobs, "DIRECT_WRITE_BUFFER_BYTES", BUF)
    monkeypatch.setattr(direct_write._local, "buffers", None, raising=False)


def _writers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == WRITER]


def _threads() -> set[threading.Thread]:
    """Threads alive, less the process-wide I/O pool's (it grows on demand and stays)."""
    return {t for t in threading.enumerate() if not t.name.startswith("stepsafe-io")}


def _data(n: int, salt: int = 0) -> bytes:
    return np.random.default_rng(n * 7 + salt).bytes(n)


_same = bit_exact  # dtype, shape and bytes; dicts leaf by leaf


def _write_file(path: Path, chunks) -> tuple[int, bool]:
    """write_direct ``chunks`` into a fresh ``path`` as a save does; (bytes, direct)."""
    fd, direct = open_direct(path)
    try:
        n = write_direct(fd, chunks, write_all) if direct else write_all(fd, chunks)
        os.fsync(fd)
    finally:
        os.close(fd)
    return n, direct


# ---------------------------------------------------------------------------------------------
# Change 1: the bytes on disk are the stream, for every size and chunking
# ---------------------------------------------------------------------------------------------

SIZES = [0, 1, 4095, 4096, 4097, BUF - 1, BUF, BUF + 1, 2 * BUF - 1, 2 * BUF, 2 * BUF + 1]
SIZES += [3 * BUF + 7, 5 * BUF + 4096, 7 * BUF - 4096 + 1]

_ODD = [np.complex128, np.float16, np.int32, np.uint64, np.bool_, ml_dtypes.bfloat16]


def _chunked(data: bytes, pattern: str) -> list:
    """``data`` cut as the pattern says; every chunk a different kind of buffer."""
    if pattern == "one":
        return [data]
    if pattern == "tiny":  # many chunks, none aligned
        return [memoryview(data)[i : i + 7] for i in range(0, len(data), 7)]
    if pattern == "empties":  # empty chunks everywhere, even where a buffer is exactly full
        out: list = [b""]
        for i in range(0, len(data), 4096):
            out += [memoryview(data)[i : i + 4096], b"", bytearray()]
        return out
    if pattern == "numpy":  # contiguous numpy views of odd dtypes, as byte views
        out, i, k = [], 0, 0
        while i < len(data):
            dtype = np.dtype(_ODD[k % len(_ODD)])
            n = min(len(data) - i, (BUF // 3 + 13) // dtype.itemsize * dtype.itemsize or 1)
            if n % dtype.itemsize:
                dtype, n = np.dtype(np.uint8), n
            arr = np.frombuffer(data, np.uint8, n, i).view(dtype).reshape(-1)
            out.append(arr.view(np.uint8) if dtype == ml_dtypes.bfloat16 else arr)
            i, k = i + n, k + 1
        return out
    if pattern == "buffer_cuts":  # cut exactly at buffer ends and one byte either side
        cuts = sorted({c for b in range(0, len(data) + BUF, BUF) for c in (b - 1, b, b + 1)})
        cuts = [0, *(c for c in cuts if 0 < c < len(data)), len(data)]
        return [memoryview(data)[a:b] for a, b in itertools.pairwise(cuts)]
    raise AssertionError(pattern)


@pytest.mark.parametrize("pattern", ["one", "tiny", "empties", "numpy", "buffer_cuts"])
@pytest.mark.parametrize("size", SIZES)
def test_bytes_on_disk_are_the_stream(tmp_path, buf64k, size, pattern):
    data = _data(size)
    before = _threads()
    n, direct = _write_file(tmp_path / "f.data", _chunked(data, pattern))
    assert direct, "ext4 takes O_DIRECT: the premise of this test"
    assert n == size
    assert (tmp_path / "f.data").read_bytes() == data
    assert _threads() == before and not _writers()


@pytest.mark.parametrize("knob", [1, 4095, 4097, 12345, 3 * 4096])
def test_odd_buffer_knobs_still_write_the_stream(tmp_path, monkeypatch, knob):
    """A buffer knob below or not a multiple of the alignment (``STEPSAFE_...`` set by hand):
    rounded to whole 4 KiB blocks, the bytes still the stream for sizes around it."""
    monkeypatch.setattr(knobs, "DIRECT_WRITE_BUFFER_BYTES", knob)
    monkeypatch.setattr(direct_write._local, "buffers", None, raising=False)
    for size in sorted({knob - 1, knob, knob + 1, 4096, 8192, 8193, 5 * knob + 4097}):
        data = _data(max(size, 0), knob)
        n, _ = _write_file(tmp_path / f"{size}.data", _chunked(data, "buffer_cuts"))
        assert n == len(data) and (tmp_path / f"{size}.data").read_bytes() == data
    assert not _writers()


def _mutating(pieces: list[bytes], seen: list[bytes]) -> Iterator[memoryview]:
    """Yield each piece from one reused bytearray, then scribble over it: a stream that
    reuses its buffer (a staging copy of a device array). ``seen``: the bytes at yield time."""
    scratch = bytearray(max((len(p) for p in pieces), default=1))
    for p in pieces:
        scratch[: len(p)] = p
        seen.append(bytes(scratch[: len(p)]))
        yield memoryview(scratch)[: len(p)]
        scratch[:] = b"\xff" * len(scratch)


@pytest.mark.parametrize("piece", [1, 4095, BUF - 1, BUF, BUF + 3, 3 * BUF])
def test_chunks_changed_after_yield_are_written_as_yielded(tmp_path, buf64k, piece):
    data = _data(6 * BUF + 11)
    pieces = [data[i : i + piece] for i in range(0, len(data), piece)]
    seen: list[bytes] = []
    n, _ = _write_file(tmp_path / "f.data", _mutating(pieces, seen))
    assert n == len(data) and b"".join(seen) == data
    assert (tmp_path / "f.data").read_bytes() == data


def test_buffers_are_reused_and_a_second_file_is_not_polluted(tmp_path, buf64k):
    """The padding zeros and the previous file's bytes left in the reused buffers never reach
    a later, shorter file."""
    big = _data(4 * BUF + 100, 1)
    small = _data(2 * BUF + 5, 2)
    _write_file(tmp_path / "a.data", [big])
    _write_file(tmp_path / "b.data", [small])
    _write_file(tmp_path / "c.data", [big[: BUF + 1]])
    assert (tmp_path / "a.data").read_bytes() == big
    assert (tmp_path / "b.data").read_bytes() == small
    assert (tmp_path / "c.data").read_bytes() == big[: BUF + 1]


# ---------------------------------------------------------------------------------------------
# Change 1: a stream that fails, in the caller's thread; no thread left
# ---------------------------------------------------------------------------------------------


class Boom(Exception):
    pass


def _raising(data: bytes, piece: int, at: int, error: BaseException) -> Iterator[memoryview]:
    for i in range(0, len(data), piece):
        if i >= at:
            raise error
        yield memoryview(data)[i : i + piece]


@pytest.mark.parametrize("error", [Boom("stream"), KeyboardInterrupt(), SystemExit(3)])
@pytest.mark.parametrize("at", [0, BUF, BUF + 1, 2 * BUF, 5 * BUF + 1000])
def test_a_stream_that_raises_is_raised_as_itself_and_leaves_no_thread(tmp_path, buf64k, error, at):
    data = _data(8 * BUF)
    before = _threads()
    with pytest.raises(type(error)) as got:
        _write_file(tmp_path / "f.data", _raising(data, 1000, at, error))
    assert got.value is error
    assert _threads() == before and not _writers()
    # Nothing was written after the failure past what the stream had given.
    assert (tmp_path / "f.data").stat().st_size <= -(-at // 4096) * 4096 + BUF
    # and this thread's buffers still work for the next file
    n, _ = _write_file(tmp_path / "g.data", [data])
    assert n == len(data) and (tmp_path / "g.data").read_bytes() == data


SIGINT_SCRIPT = r"""
import os, signal, sys, threading, time
sys.path.insert(0, sys.argv[2])
from stepsafe import knobs
knobs.DIRECT_WRITE_BUFFER_BYTES = 65536
from stepsafe.storage.direct_write import open_direct, write_direct
from stepsafe.storage.local import write_all
data = os.urandom(64 << 20)
delay = float(sys.argv[3])
writing = threading.Event()

def handler(signum, frame):  # Ctrl-C, while the write runs (ignored after it)
    if writing.is_set():
        raise KeyboardInterrupt

def kick():
    time.sleep(delay)
    signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

signal.signal(signal.SIGINT, handler)
fd, direct = open_direct(sys.argv[1])
writing.set()
threading.Thread(target=kick, daemon=True).start()
try:
    write_direct(fd, (memoryview(data)[i:i + 5000] for i in range(0, len(data), 5000)), write_all)
    writing.clear()
    print("FINISHED")
except KeyboardInterrupt:
    writing.clear()
    print("INTERRUPTED")
os.close(fd)
time.sleep(0.05)
print("WRITERS", sum(t.name == "stepsafe-direct-write" for t in threading.enumerate()))
"""


def _sigint_runs(tmp_path: Path, script_text: str, args: list[str]) -> str:
    script = tmp_path / "sigint.py"
    script.write_text(script_text)
    src = str(Path(stepsafe.__file__).parents[1])
    r = subprocess.run(
        [PY, str(script), str(tmp_path / "f"), src, *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


@pytest.mark.parametrize("delay", [0.02, 0.05, 0.1, 0.2])
def test_ctrl_c_mid_write_leaves_no_writer_thread(tmp_path, delay):
    """SIGINT to the caller's thread while the writer thread runs (waiting for a buffer, or
    filling one): KeyboardInterrupt (or done), never a hang, no writer thread left. Holds."""
    out = _sigint_runs(tmp_path, SIGINT_SCRIPT, [str(delay)])
    assert ("INTERRUPTED" in out or "FINISHED" in out) and "WRITERS 0" in out, out


SIGINT_AT_START_SCRIPT = r"""
import os, signal, sys, threading, time
sys.path.insert(0, sys.argv[2])
from stepsafe import knobs
knobs.DIRECT_WRITE_BUFFER_BYTES = 65536
from stepsafe.storage import direct_write
from stepsafe.storage.direct_write import open_direct, write_direct
from stepsafe.storage.local import write_all
data = os.urandom(3 * 65536)
hit = threading.Event()

def handler(signum, frame):  # Ctrl-C, landing while a _Writer starts its thread (else none)
    while frame is not None:
        if frame.f_code.co_name in ("__init__", "start") and isinstance(
            frame.f_locals.get("self"), direct_write._Writer
        ):
            hit.set()
            raise KeyboardInterrupt
        frame = frame.f_back

def spam():
    while not hit.is_set():
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
        time.sleep(0.0001)

signal.signal(signal.SIGINT, handler)
threading.Thread(target=spam, daemon=True).start()
for k in range(2000):
    fd, direct = open_direct(sys.argv[1] + str(k))
    try:
        write_direct(fd, [data], write_all)
    except KeyboardInterrupt:
        print("INTERRUPTED", k)
        break
    finally:
        os.close(fd)
time.sleep(0.2)
print("WRITERS", sum(t.name == "stepsafe-direct-write" for t in threading.enumerate()))
"""


def test_ctrl_c_while_the_writer_thread_starts_leaves_no_thread(tmp_path):
    """A Ctrl-C that lands while the writer thread is being started (found with random SIGINT
    timing: at delay 0 every run of 64 MiB was interrupted in ``Thread.start``, and a
    ``stepsafe-direct-write`` thread stayed). Made deterministic here: SIGINT is sent again
    and again, and the handler raises only while a ``_Writer`` is made or starts its thread."""
    out = _sigint_runs(tmp_path, SIGINT_AT_START_SCRIPT, [])
    if "INTERRUPTED" not in out:  # never landed there in 2000 files: nothing shown
        pytest.skip(f"SIGINT never landed while a _Writer started: {out}")
    assert "WRITERS 0" in out, out


NPROC_SCRIPT = r"""
import os, resource, sys, threading
import numpy as np
import stepsafe
from stepsafe import knobs
from stepsafe.storage.threads import io_pool

knobs.DIRECT_WRITE_BUFFER_BYTES = 65536
gate = threading.Barrier(knobs.IO_THREADS + 1)  # every I/O pool thread started first
futures = [io_pool().submit(gate.wait) for _ in range(knobs.IO_THREADS)]
gate.wait()
for f in futures:
    f.result()
os.setgid(65534)
os.setuid(65534)  # RLIMIT_NPROC binds only a user without CAP_SYS_RESOURCE
n = len(os.listdir("/proc/self/task"))
resource.setrlimit(resource.RLIMIT_NPROC, (n, n))  # no thread more than there are
tree = {"w": np.arange(300_000, dtype=np.float32)}  # 1.2 MB: a file of many buffers
try:
    stepsafe.save(sys.argv[1] + "/ck", tree)
    print("SAVED", stepsafe.restore(sys.argv[1] + "/ck")["w"].tobytes() == tree["w"].tobytes())
except BaseException as e:
    print("FAILED", type(e).__name__, e)
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become nobody (RLIMIT_NPROC)")
def test_a_save_where_no_thread_can_start_still_commits(tmp_path):
    import shutil
    import tempfile

    d = tempfile.mkdtemp(dir="/tmp")
    try:
        os.chmod(d, 0o777)  # nobody writes there
        script = Path(d) / "nproc.py"
        script.write_text(NPROC_SCRIPT)
        r = subprocess.run([PY, str(script), d], capture_output=True, text=True, timeout=120, cwd=d)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "SAVED True" in r.stdout, r.stdout


# ---------------------------------------------------------------------------------------------
# Change 1: refusals and real errors at the 1st / 2nd / nth write (RLIMIT_FSIZE, tmpfs, ENOSPC)
# ---------------------------------------------------------------------------------------------

FSIZE_SCRIPT = r"""
import json, os, resource, signal, sys, threading
sys.path.insert(0, sys.argv[2])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
from stepsafe import knobs
knobs.DIRECT_WRITE_BUFFER_BYTES = 65536
from stepsafe.storage.direct_write import open_direct, write_direct
from stepsafe.storage.local import write_all


def stream(data, piece):  # reuses its buffer after each yield: bytes taken at yield time
    scratch = bytearray(piece)
    for i in range(0, len(data), piece):
        p = data[i:i + piece]
        scratch[:len(p)] = p
        yield memoryview(scratch)[:len(p)]
        scratch[:] = b"\xee" * piece


results = []
for k, (n, limit, piece) in enumerate(json.loads(sys.argv[3])):
    path = f"{sys.argv[1]}/f{k}.data"
    data = os.urandom(n)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    fd, direct = open_direct(path)
    out = {"case": [n, limit, piece], "direct": direct}
    try:
        out["n"] = write_direct(fd, stream(data, piece), write_all)
    except OSError as e:
        out["errno"] = e.errno
    finally:
        os.close(fd)
        resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
    got = open(path, "rb").read()
    out["size"] = len(got)
    out["prefix"] = data[:len(got)] == got
    out["writers"] = sum(t.name == "stepsafe-direct-write" for t in threading.enumerate())
    results.append(out)
print(json.dumps(results))
"""


def _fsize(tmp_path: Path, cases: list[tuple[int, int, int]]) -> list[dict]:
    """Each case (bytes, RLIMIT_FSIZE, chunk size) written by write_direct in one child
    process (SIGXFSZ ignored, as a process that wants EFBIG does); what each got."""
    script = tmp_path / "fsize.py"
    script.write_text(FSIZE_SCRIPT)
    src = str(Path(stepsafe.__file__).parents[1])
    r = subprocess.run(
        [PY, str(script), str(tmp_path), src, json.dumps(cases)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_a_size_limit_the_data_fits_under_refuses_only_the_padding(tmp_path):
    """Limit one byte past the data (unaligned): the last padded direct write is cut short
    (EINVAL) with the other buffer queued or not; the rest goes buffered, every byte right.
    And a limit of exactly the data. Chunks smaller than, equal to and bigger than a buffer."""
    sizes = [BUF - 1, BUF, BUF + 1, 2 * BUF - 1, 2 * BUF, 2 * BUF + 100, 3 * BUF + 4095]
    sizes += [6 * BUF + 7, 9 * BUF + 12345]
    cases = [(n, n + extra, piece) for n in sizes for extra in (0, 1) for piece in (1000, BUF)]
    cases += [(n, n + 1, 3 * BUF + 1) for n in sizes]
    for out in _fsize(tmp_path, cases):
        n = out["case"][0]
        assert out["direct"] and out.get("n") == n and out["size"] == n, out
        assert out["prefix"] and out["writers"] == 0, out


def test_a_size_limit_crossed_at_the_nth_write_is_efbig_with_every_byte_before(tmp_path):
    """The data does not fit; the limit falls in the 1st, 2nd, 3rd or 6th direct write,
    unaligned (the write is cut to an unaligned length: EINVAL, then the buffered way meets
    the limit) or aligned (a short direct write, then EFBIG): EFBIG as itself, the bytes
    before the limit right, no thread left."""
    n = 8 * BUF + 333
    cases = [
        (n, write * BUF + past, piece)
        for write in (0, 1, 2, 5)
        for past in (100, 4096)
        for piece in (1000, 2 * BUF + 5)
    ]
    cases += [(BUF, BUF - 100, 1000), (BUF, BUF - 4096, BUF)]  # one buffer: written here
    for out in _fsize(tmp_path, cases):
        limit = out["case"][1]
        assert out.get("errno") == errno.EFBIG, out
        assert out["prefix"] and out["size"] <= limit and out["writers"] == 0, out


REFUSE_ONCE_SCRIPT = r"""
import fcntl, json, os, resource, signal, sys, threading, time
sys.path.insert(0, sys.argv[2])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
from stepsafe import knobs
knobs.DIRECT_WRITE_BUFFER_BYTES = 65536
from stepsafe.storage.direct_write import open_direct, write_direct
from stepsafe.storage.local import write_all
BUF, PIECE = 65536, 1000
results = []
for k in json.loads(sys.argv[3]):
    n = 6 * BUF + 777
    data = os.urandom(n)

    def stream():
        # Buffer k's direct write crosses an unaligned limit (EINVAL), then the limit is
        # lifted while the caller fills buffer k+1: the buffered way must then succeed.
        resource.setrlimit(resource.RLIMIT_FSIZE, (k * BUF + 100, resource.RLIM_INFINITY))
        lifted = False
        scratch = bytearray(PIECE)
        for i in range(0, n, PIECE):
            p = data[i:i + PIECE]
            scratch[:len(p)] = p
            yield memoryview(scratch)[:len(p)]
            scratch[:] = b"\xee" * PIECE
            if not lifted and i + PIECE >= (k + 1) * BUF:
                time.sleep(0.05)  # the writer thread writes buffer k meanwhile: refused
                resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
                lifted = True

    path = f"{sys.argv[1]}/r{k}.data"
    fd, direct = open_direct(path)
    try:
        got = write_direct(fd, stream(), write_all)
        still_direct = bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)
    finally:
        os.close(fd)
        resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
    results.append({
        "k": k, "direct": direct, "n": got == n, "bytes": open(path, "rb").read() == data,
        "refused": not still_direct,
        "writers": sum(t.name == "stepsafe-direct-write" for t in threading.enumerate()),
    })
print(json.dumps(results))
"""


def test_refused_at_the_nth_write_then_accepted_goes_on_buffered_from_there(tmp_path):
    """A real refusal (EINVAL from a direct write cut short by RLIMIT_FSIZE) of buffer k of
    7 while buffer k+1 fills, the limit then lifted: the refused buffer and the one queued
    behind it and the rest of the stream (reused after each yield) go the buffered way, and
    the file is the stream. k = 0 (the first write), 1, 3 and 5 (the one before the last)."""
    script = tmp_path / "refuse.py"
    script.write_text(REFUSE_ONCE_SCRIPT)
    src = str(Path(stepsafe.__file__).parents[1])
    r = subprocess.run(
        [PY, str(script), str(tmp_path), src, json.dumps([0, 1, 3, 5])],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    for out in json.loads(r.stdout.strip().splitlines()[-1]):
        assert out["direct"] and out["refused"], out  # the refusal did happen
        assert out["n"] and out["bytes"] and out["writers"] == 0, out


def test_tmpfs_in_dev_shm_round_trips_double_buffered(buf64k):
    """/dev/shm: tmpfs, which refuses O_DIRECT on older kernels (buffered way) and takes it on
    newer ones; either way the bytes are the stream."""
    if not os.path.isdir("/dev/shm") or not os.access("/dev/shm", os.W_OK):
        pytest.skip("no writable /dev/shm")
    import tempfile

    with tempfile.TemporaryDirectory(dir="/dev/shm") as d:
        for size in (0, BUF, BUF + 1, 5 * BUF + 17):
            data = _data(size)
            n, _ = _write_file(Path(d) / f"{size}.data", _chunked(data, "tiny"))
            assert n == size and (Path(d) / f"{size}.data").read_bytes() == data
        tree = {f"a{i}": np.arange(50_000 + i, dtype=np.float32) for i in range(3)}
        stepsafe.save(d + "/ck", tree, data_file_size_bytes=BUF)
        out = stepsafe.restore(d + "/ck")
        assert all(_same(out[k], v) for k, v in tree.items())
    assert not _writers()


def _unshare_ok() -> bool:
    import shutil

    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("mkfs.ext4"):
        return False
    return subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode == 0


ENOSPC_SCRIPT = r"""
import os, sys, threading
import numpy as np, stepsafe
d = sys.argv[1]
rng = np.random.default_rng(1)
tree = {f"a{i}": rng.integers(0, 256, 3_000_000 + 4097 * i, dtype=np.uint8) for i in range(8)}
try:
    stepsafe.save(d + "/ck", tree, data_file_size_bytes=6 << 20)
    print("SAVED")
except stepsafe.StorageError as e:
    print("STORAGEERROR", getattr(e, "errno", None))
print("WRITERS", sum(t.name == "stepsafe-direct-write" for t in threading.enumerate()))
print("LEFT", sorted(os.listdir(d)))
"""


@pytest.mark.skipif(not _unshare_ok(), reason="needs root, unshare -m and mkfs.ext4")
def test_a_full_small_filesystem_mid_double_buffer_is_enospc_and_leaves_nothing(tmp_path):
    """24 MB of arrays into a 16 MiB ext4, several data files written by several threads,
    each double-buffered with 256 KiB buffers: ENOSPC, nothing committed, no thread left."""
    img, mnt = tmp_path / "img", tmp_path / "mnt"
    with open(img, "wb") as f:
        f.truncate(16 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(img)], check=True, capture_output=True)
    mnt.mkdir()
    script = tmp_path / "enospc.py"
    script.write_text(ENOSPC_SCRIPT)
    cmd = f"mount -o loop {img} {mnt} || exit 77; {PY} {script} {mnt}"
    env = {**os.environ, "STEPSAFE_DIRECT_WRITE_BUFFER_BYTES": str(256 << 10)}
    r = subprocess.run(
        ["unshare", "-m", "sh", "-c", cmd], capture_output=True, text=True, timeout=120, env=env
    )
    if r.returncode == 77:
        pytest.skip(f"cannot mount here: {r.stderr.strip()[-200:]}")
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"STORAGEERROR {errno.ENOSPC}" in r.stdout, r.stdout
    assert "WRITERS 0" in r.stdout and "LEFT ['lost+found']" in r.stdout, r.stdout


RAMFS_SCRIPT = r"""
import os, sys, threading
import numpy as np, stepsafe
from stepsafe import knobs
knobs.DIRECT_WRITE_BUFFER_BYTES = 65536
from stepsafe.storage.direct_write import open_direct, write_direct
from stepsafe.storage.local import write_all
d = sys.argv[1]
ok = True
for n in (0, 65535, 65536, 65537, 3 * 65536 + 7):
    data = os.urandom(n)
    fd, direct = open_direct(f"{d}/f{n}")
    try:
        got = write_direct(fd, [data], write_all) if direct else write_all(fd, [data])
    finally:
        os.close(fd)
    ok = ok and not direct and got == n and open(f"{d}/f{n}", "rb").read() == data
rng = np.random.default_rng(0)
tree = {f"a{i}": rng.standard_normal(50_000 + i) for i in range(4)}
stepsafe.save(d + "/ck", tree, data_file_size_bytes=200_000)
out = stepsafe.restore(d + "/ck")
ok = ok and all(out[k].tobytes() == v.tobytes() for k, v in tree.items())
print("OK" if ok else "BAD", sum(t.name == "stepsafe-direct-write" for t in threading.enumerate()))
"""


def _unshare_mount_ok() -> bool:
    import shutil

    if os.geteuid() != 0 or not shutil.which("unshare"):
        return False
    return subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _unshare_mount_ok(), reason="needs root and unshare -m to mount ramfs")
def test_ramfs_refusing_o_direct_at_open_writes_multi_buffer_files_buffered(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    script = tmp_path / "ramfs.py"
    script.write_text(RAMFS_SCRIPT)
    cmd = f"mount -t ramfs none {mnt} || exit 77; {PY} {script} {mnt}"
    r = subprocess.run(["unshare", "-m", "sh", "-c", cmd], capture_output=True, text=True,
                       timeout=120)  # fmt: skip
    if r.returncode == 77:
        pytest.skip(f"cannot mount here: {r.stderr.strip()[-200:]}")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "OK 0" in r.stdout, r.stdout


# ---------------------------------------------------------------------------------------------
# Change 1: whole saves: many threads, fork, async manager (SIGKILL: test_adversarial_direct_write)
# ---------------------------------------------------------------------------------------------


def _tree(k: int = 0) -> dict:
    return odd_tree(k, 2 * BUF, nested=False)


@pytest.mark.parametrize("file_size", [4096, BUF, BUF + 1, 3 * BUF, 1 << 30])
def test_save_restore_is_bit_exact_with_small_buffers_and_files(tmp_path, buf64k, file_size):
    tree = _tree()
    before = _threads()
    stepsafe.save(str(tmp_path / "ck"), tree, data_file_size_bytes=file_size)
    assert _threads() == before and not _writers()
    assert not stepsafe.verify(str(tmp_path / "ck")).problems
    out = stepsafe.restore(str(tmp_path / "ck"))
    assert all(_same(out[k], v) for k, v in tree.items())


def test_many_threads_saving_many_data_files_at_once(tmp_path, buf64k):
    """Eight threads, each saving a tree split into many data files (its own I/O threads
    writing several double-buffered files at once): every checkpoint bit-exact."""
    trees = [_tree(k) for k in range(8)]
    errors: list[BaseException] = []

    def save(k: int) -> None:
        try:
            stepsafe.save(str(tmp_path / f"ck{k}"), trees[k], data_file_size_bytes=3 * BUF + 5)
        except BaseException as e:  # to the main thread
            errors.append(e)

    threads = [threading.Thread(target=save, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert not _writers()
    for k, tree in enumerate(trees):
        assert len(list((tmp_path / f"ck{k}" / "items").glob("*.data"))) > 3
        out = stepsafe.restore(str(tmp_path / f"ck{k}"))
        assert all(_same(out[key], v) for key, v in tree.items())


def test_fork_while_a_double_buffered_write_is_in_flight(tmp_path, buf64k):
    """Another thread is mid-way through a many-buffer write (its writer thread running) when
    this one forks: the child has no writer thread, writes its own big file with its own, and
    exits; the parent's file is whole."""
    data = _data(200 * BUF + 3)
    started = threading.Event()

    def slow() -> Iterator[memoryview]:
        for i in range(0, len(data), 20_000):
            if i > 3 * BUF:
                started.set()
            yield memoryview(data)[i : i + 20_000]

    result: list = []
    t = threading.Thread(
        target=lambda: result.append(_write_file(tmp_path / "parent.data", slow()))
    )
    t.start()
    assert started.wait(30)
    stepsafe.save(str(tmp_path / "warm"), {"x": np.zeros(3)})  # the parent's pool running
    pid = os.fork()
    if pid == 0:  # the child: no pytest from here, only os._exit
        code = 1
        try:
            kid = _data(7 * BUF + 1, 9)
            n, _ = _write_file(tmp_path / "child.data", [kid])
            ok = n == len(kid) and (tmp_path / "child.data").read_bytes() == kid
            tree = _tree(7)  # a whole save too: its I/O pool made afresh in the child
            stepsafe.save(str(tmp_path / "child_ck"), tree, data_file_size_bytes=3 * BUF)
            back = stepsafe.restore(str(tmp_path / "child_ck"))
            ok = ok and all(_same(back[k], v) for k, v in tree.items())
            code = 0 if ok and not _writers() else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    t.join(60)
    assert os.waitstatus_to_exitcode(status) == 0
    assert result and result[0][0] == len(data)
    assert (tmp_path / "parent.data").read_bytes() == data
    assert not _writers()


def test_async_manager_saves_restore_bit_exact(tmp_path, buf64k):
    """Async saves capture the state when ``save`` returns (README): the caller then
    overwrites its arrays in place while the double-buffered writes run; every step restores
    the bytes it had at ``save``."""
    opts = stepsafe.ManagerOptions(
        save_interval_steps=1,
        max_to_keep=10,
        async_save=True,
        data_file_size_bytes=2 * BUF + 1,
    )
    mgr = stepsafe.CheckpointManager(str(tmp_path / "run"), opts)
    try:
        state = _tree(0)
        want = {}
        for step in range(4):
            want[step] = {k: np.copy(v) for k, v in state.items()}
            mgr.save(step, state)
            for v in state.values():  # training goes on: the same buffers, new bytes
                if isinstance(v, np.ndarray) and v.size:
                    v.reshape(-1).view(np.uint8)[:] += np.uint8(step + 1)
        mgr.wait_until_finished()
        assert sorted(mgr.all_steps()) == [0, 1, 2, 3]
        for step in range(4):
            out = mgr.restore(step)
            assert all(_same(out[k], v) for k, v in want[step].items()), step
    finally:
        mgr.close()
    assert not _writers()


# ---------------------------------------------------------------------------------------------
# Change 2: the batch read of host leaves restored as saved
# ---------------------------------------------------------------------------------------------


def _all_dtypes() -> dict:
    rng = np.random.default_rng(3)
    f = rng.standard_normal(1000)
    return {
        "f32": f.astype(np.float32),
        "f64_0d": np.array(3.25),
        "bf16": f.astype(ml_dtypes.bfloat16).reshape(10, 100),
        "f8": f.astype(ml_dtypes.float8_e4m3fn),
        "f8e5": f.astype(ml_dtypes.float8_e5m2),
        "i4": rng.integers(-8, 8, 333).astype(ml_dtypes.int4),
        "bool": rng.integers(0, 2, 17).astype(bool),
        "c64": (f[:50] + 1j * f[50:100]).astype(np.complex64),
        "str": np.array(["abc", "defghij", ""], "<U7"),
        "bytes": np.array([b"ab", b"c"]),
        "dt": np.array(["2020-01-01T00:00:01", "NaT"], "datetime64[s]"),
        "td": np.array([1, -2], "timedelta64[ms]"),
        "big_endian": np.arange(9, dtype=">i4"),
        "empty": np.zeros((3, 0, 2), np.int16),
        "empty_str": np.zeros(0, "<U3"),
        "u16_0d": np.array(7, np.uint16),
    }


def test_every_dtype_comes_back_as_saved_as_fresh_writable_arrays(tmp_path):
    tree = {"a": _all_dtypes(), "b": {"x": np.arange(5)}}
    tree["a"]["same_object_twice"] = tree["b"]["x"]
    stepsafe.save(str(tmp_path / "ck"), tree, data_file_size_bytes=4096)
    for verify in (True, False):
        out = stepsafe.restore(str(tmp_path / "ck"), verify=verify)
        for k, v in tree["a"].items():
            assert _same(out["a"][k], v), k
        arrays = [*out["a"].values(), out["b"]["x"]]
        for i, a in enumerate(arrays):
            assert isinstance(a, np.ndarray) and a.flags.writeable and a.flags.c_contiguous
            for b in arrays[i + 1 :]:
                assert not np.shares_memory(a, b)
        out["b"]["x"][:] = 99  # its twin in "a" stays
        assert out["a"]["same_object_twice"].tolist() == [0, 1, 2, 3, 4]
    # targets of the saved dtype (the batch) give the same
    target = {"a": {k: np.zeros_like(v) for k, v in tree["a"].items()}, "b": {"x": None}}
    out = stepsafe.restore(str(tmp_path / "ck"), target)
    for k, v in tree["a"].items():
        assert _same(out["a"][k], v), k
        assert not np.shares_memory(out["a"][k], target["a"][k])


def test_select_a_subtree_reads_it_alone(tmp_path):
    tree = {"p": _all_dtypes(), "q": {"w": np.arange(10.0)}}
    stepsafe.save(str(tmp_path / "ck"), tree, data_file_size_bytes=4096)
    out = stepsafe.restore(str(tmp_path / "ck"), select="p")
    assert set(out) == set(tree["p"]) and all(_same(out[k], v) for k, v in tree["p"].items())
    out = stepsafe.restore(str(tmp_path / "ck"), {"w": np.zeros(10)}, select="q")
    assert _same(out["w"], tree["q"]["w"])


def test_targets_mixing_batch_plans_scalars_and_jax(tmp_path, mesh):
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    rng = np.random.default_rng(0)
    tree = {
        "same": rng.standard_normal((8, 6)).astype(np.float32),
        "cast": np.arange(12, dtype=np.int32),
        "bf16_same": rng.standard_normal(20).astype(ml_dtypes.bfloat16),
        "bf16_up": rng.standard_normal(20).astype(ml_dtypes.bfloat16),
        "py": np.array(4.5),
        "np_scalar": np.array(3, np.int64),
        "none": np.arange(3, dtype=np.uint8),
        "jax": rng.standard_normal((4, 8)).astype(np.float32),
        "jax_sds": rng.standard_normal((8, 4)).astype(np.float32),
        "shape0": np.zeros((0,), np.float32),
    }
    stepsafe.save(str(tmp_path / "ck"), tree, data_file_size_bytes=512)
    sharding = NamedSharding(mesh, P("data", "model"))
    target = {
        "same": np.zeros((8, 6), np.float32),
        "cast": np.zeros(12, np.int64),
        "bf16_same": np.zeros(20, ml_dtypes.bfloat16),
        "bf16_up": np.zeros(20, np.float32),
        "py": 0.0,
        "np_scalar": np.int64(0),
        "none": None,
        "jax": jax.device_put(np.zeros((4, 8), np.float32), sharding),
        "jax_sds": jax.ShapeDtypeStruct((8, 4), np.float32, sharding=sharding),
        "shape0": np.zeros((0,), np.float32),
    }
    out = stepsafe.restore(str(tmp_path / "ck"), target)
    assert _same(out["same"], tree["same"]) and _same(out["bf16_same"], tree["bf16_same"])
    assert _same(out["cast"], tree["cast"].astype(np.int64))
    assert _same(out["bf16_up"], tree["bf16_up"].astype(np.float32))
    assert out["py"] == 4.5 and type(out["py"]) is float
    assert out["np_scalar"] == 3 and isinstance(out["np_scalar"], np.int64)
    assert _same(out["none"], tree["none"]) and _same(out["shape0"], tree["shape0"])
    for k in ("jax", "jax_sds"):
        assert isinstance(out[k], jax.Array) and out[k].sharding == sharding
        assert _same(np.asarray(out[k]), tree[k])


def test_a_many_shard_jax_array_restores_onto_numpy_and_none(tmp_path, mesh):
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    host = np.arange(64 * 36, dtype=np.float32).reshape(64, 36)
    tree = {
        "sharded": jax.device_put(host, NamedSharding(mesh, P("data", "model"))),
        "rows": jax.device_put(host[:, :8].copy(), NamedSharding(mesh, P(("data", "model")))),
        "replicated": jax.device_put(host[:3], NamedSharding(mesh, P())),
        "plain": host[:5].copy(),
    }
    stepsafe.save(str(tmp_path / "ck"), tree, data_file_size_bytes=1000)
    with open_checkpoint(str(tmp_path / "ck")) as reader:
        assert len(reader.manifest.arrays["sharded"].shards) == 4
        assert len(reader.manifest.arrays["rows"].shards) == 4
    want = {k: np.asarray(v) for k, v in tree.items()}
    for target in (None, {k: np.zeros_like(v) for k, v in want.items()}):
        out = stepsafe.restore(str(tmp_path / "ck"), target)
        for k, v in want.items():
            assert _same(out[k], v), k
            assert out[k].flags.writeable
        out["sharded"][:] = -1
        assert _same(out["rows"], want["rows"]) and _same(out["plain"], want["plain"])


def test_a_local_tier_step_restores_bit_exact(tmp_path, buf64k):
    opts = stepsafe.ManagerOptions(
        save_interval_steps=100,
        local_directory=str(tmp_path / "local"),
        local_save_interval_steps=1,
        data_file_size_bytes=BUF,
    )
    mgr = stepsafe.CheckpointManager(str(tmp_path / "run"), opts)
    try:
        state = _tree(4)
        mgr.save(1, state)
        mgr.wait_until_finished()
        out = mgr.restore(1)
        assert all(_same(out[k], v) for k, v in state.items())
        out = mgr.restore(1, {k: np.zeros_like(v) for k, v in state.items()})
        assert all(_same(out[k], v) for k, v in state.items())
    finally:
        mgr.close()


# -- forged and damaged checkpoints ---------------------------------------------------------


def _record(step: Path) -> CommitRecord:
    return CommitRecord.from_json((step / METADATA).read_bytes(), "")


def _seal(step: Path, doc: dict) -> None:
    """Write ``doc`` as the manifest and its checksum into the commit record, as a forger."""
    raw = json.dumps(doc).encode()
    meta = _record(step)
    (step / meta.manifest_path).write_bytes(raw)
    meta.manifest_checksum = checksum(raw)
    (step / METADATA).write_bytes(meta.to_json())


def _chunks_of(step: Path, key: str):
    with open_checkpoint(str(step)) as reader:
        return [c for s in reader.manifest.arrays[key].shards for c in s.chunks]


@pytest.mark.parametrize("victim", ["f32", "bf16", "str", "dt", "i4", "f64_0d"])
@pytest.mark.parametrize("where", ["first", "last"])
def test_a_flipped_byte_names_the_right_array(tmp_path, victim, where):
    tree = _all_dtypes()
    step = tmp_path / "ck"
    stepsafe.save(str(step), tree, data_file_size_bytes=1 << 20)  # all in one file
    chunks = _chunks_of(step, victim)
    c = chunks[0] if where == "first" else chunks[-1]
    pos = c.offset if where == "first" else c.offset + c.length - 1
    with open(step / "items" / c.file, "r+b") as f:
        f.seek(pos)
        b = f.read(1)
        f.seek(pos)
        f.write(bytes([b[0] ^ 0x01]))
    with pytest.raises(ChecksumMismatchError, match=f"'{victim}'"):
        stepsafe.restore(str(step))
    with pytest.raises(ChecksumMismatchError, match=f"'{victim}'"):
        stepsafe.restore(str(step), {k: np.zeros_like(v) for k, v in tree.items()})
    out = stepsafe.restore(str(step), verify=False)
    assert not _same(out[victim], tree[victim])
    assert all(_same(out[k], v) for k, v in tree.items() if k != victim)


def test_a_truncated_file_of_a_cast_leaf_is_refused(tmp_path):
    tree = {"a": np.arange(5000, dtype=np.float32), "b": np.arange(5000, dtype=np.int32)}
    step = tmp_path / "ck"
    stepsafe.save(str(step), tree, data_file_size_bytes=4096)
    last = _chunks_of(step, "b")[-1]
    with open(step / "items" / last.file, "r+b") as f:
        f.truncate(last.offset + last.length - 1)
    for target in (None, {"a": np.zeros(5000, np.float32), "b": np.zeros(5000, np.int64)}):
        with pytest.raises(TruncatedDataError, match="truncated"):
            stepsafe.restore(str(step), target, verify=False)


HUGE_SCRIPT = r"""
import json, resource, sys
import stepsafe
from stepsafe.errors import TruncatedDataError
try:
    stepsafe.restore(sys.argv[1], verify=sys.argv[2] == "1")
    print("RESTORED")
except TruncatedDataError as e:
    print("TRUNCATED")
print("MAXRSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


@pytest.mark.parametrize("verify", ["1", "0"])
def test_a_forged_huge_array_allocates_nothing_before_refusal(tmp_path, verify):
    """A manifest (sealed with a right checksum) claiming a 16 GiB float32 array in a data
    file that holds 4 KiB: refused as truncated with the process staying small."""
    step = tmp_path / "ck"
    stepsafe.save(str(step), {"x": np.arange(1024, dtype=np.float32)})
    meta = _record(step)
    doc = json.loads((step / meta.manifest_path).read_bytes())
    (name,) = doc["files"]
    n = 4 << 30  # elements
    chunk = 1 << 26
    doc["files"] = {name: 4 * n}
    doc["arrays"]["x"]["shape"] = [n]
    doc["arrays"]["x"]["shards"][0]["index"] = [[0, n]]
    doc["arrays"]["x"]["shards"][0]["chunks"] = [
        [name, off, chunk, "0" * 16] for off in range(0, 4 * n, chunk)
    ]
    _seal(step, doc)
    script = tmp_path / "huge.py"
    script.write_text(HUGE_SCRIPT)
    r = subprocess.run([PY, str(script), str(step), verify], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "TRUNCATED" in r.stdout, r.stdout
    rss_kb = int(r.stdout.split("MAXRSS_KB")[1])
    assert rss_kb < 2 << 20, rss_kb  # under 2 GiB: nothing of 16 GiB was touched


def test_a_forged_manifest_with_a_different_dtype_reads_what_it_says(tmp_path):
    """A sealed manifest relabelling float32 bytes as int32: not an error (the checksums hold),
    and the batch must give exactly those bytes as int32, like the plan path."""
    step = tmp_path / "ck"
    x = np.arange(6, dtype=np.float32)
    stepsafe.save(str(step), {"x": x})
    meta = _record(step)
    doc = json.loads((step / meta.manifest_path).read_bytes())
    doc["arrays"]["x"]["dtype"] = "<i4"
    _seal(step, doc)
    out = stepsafe.restore(str(step))["x"]
    assert _same(out, x.view(np.int32))
    planned = stepsafe.restore(str(step), {"x": np.zeros(6, np.int64)})["x"]
    assert _same(planned, x.view(np.int32).astype(np.int64))


def test_read_arrays_keeps_the_order_of_keys_mixing_one_and_many_shards(tmp_path, mesh):
    """``read_arrays`` with single-shard (batch) and many-shard (plan) keys interleaved, and a
    key asked twice: each result in its place, fresh."""
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    host = np.arange(16 * 8, dtype=np.int32).reshape(16, 8)
    tree = {
        "m1": jax.device_put(host, NamedSharding(mesh, P("data", "model"))),
        "s1": host[:3].astype(np.float16),
        "m2": jax.device_put(host.T.copy(), NamedSharding(mesh, P("model"))),
        "s2": np.array(["x", "yy"], "<U2"),
    }
    stepsafe.save(str(tmp_path / "ck"), tree, data_file_size_bytes=200)
    keys = ["s2", "m1", "s1", "m2", "s1", "m1"]
    with open_checkpoint(str(tmp_path / "ck")) as reader:
        got = reader.read_arrays(keys)
    for k, a in zip(keys, got):
        assert _same(a, np.asarray(tree[k])), k
    for i, a in enumerate(got):
        for b in got[i + 1 :]:
            assert not np.shares_memory(a, b)


def test_many_threads_restoring_at_once_are_bit_exact(tmp_path):
    tree = _all_dtypes()
    stepsafe.save(str(tmp_path / "ck"), tree, data_file_size_bytes=512)
    bad: list = []

    def restore() -> None:
        try:
            for _ in range(5):
                out = stepsafe.restore(str(tmp_path / "ck"))
                if not all(_same(out[k], v) for k, v in tree.items()):
                    bad.append("bytes")
        except BaseException as e:  # to the main thread
            bad.append(e)

    threads = [threading.Thread(target=restore) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not bad, bad


def test_a_local_tier_step_of_sharded_jax_arrays_restores_onto_numpy_and_jax(tmp_path, mesh):
    """A local-tier (own shards) step of JAX arrays on a 2x2 mesh and host arrays: onto
    ShapeDtypeStruct targets with the sharding, and onto numpy (whole arrays here, one
    process), bit-exact and independent."""
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    sharding = NamedSharding(mesh, P("data", "model"))
    host = np.random.default_rng(2).standard_normal((8, 12)).astype(np.float32)
    state = {
        "w": jax.device_put(host, sharding),
        "rep": jax.device_put(host[:2], NamedSharding(mesh, P())),
        "h": np.arange(7, dtype=np.int16),
        "bf": host[0].astype(ml_dtypes.bfloat16),
    }
    opts = stepsafe.ManagerOptions(
        save_interval_steps=100,
        local_directory=str(tmp_path / "local"),
        local_save_interval_steps=1,
    )
    mgr = stepsafe.CheckpointManager(str(tmp_path / "run"), opts)
    try:
        mgr.save(1, state)
        mgr.wait_until_finished()
        target = {
            "w": jax.ShapeDtypeStruct((8, 12), np.float32, sharding=sharding),
            "rep": jax.ShapeDtypeStruct((2, 12), np.float32, sharding=state["rep"].sharding),
            "h": np.zeros(7, np.int16),
            "bf": np.zeros(12, ml_dtypes.bfloat16),
        }
        out = mgr.restore(1, target)
        assert out["w"].sharding == sharding and _same(np.asarray(out["w"]), host)
        assert _same(np.asarray(out["rep"]), host[:2])
        assert _same(out["h"], state["h"]) and _same(out["bf"], state["bf"])
        out2 = mgr.restore(1, target)
        out2["h"][:] = 5
        assert _same(out["h"], state["h"])
    finally:
        mgr.close()


def test_an_own_shards_step_restores_its_boxes_bit_exact(tmp_path, mesh, buf64k):
    """A local-tier step as one process writes it under several (``own_snapshot`` +
    ``write_own``): every box of each array a leaf of its own, all read back by the batch,
    then placed onto ShapeDtypeStruct (sharded) and numpy (whole) targets."""
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from stepsafe.checkpoint.own_shards import DESCRIPTOR, own_snapshot, write_own
    from stepsafe.storage import storage_for

    sharding = NamedSharding(mesh, P("data", "model"))
    host = np.random.default_rng(6).standard_normal((64, 300)).astype(np.float32)
    state = {
        "w": jax.device_put(host, sharding),
        "rep": jax.device_put(host[:2].astype(ml_dtypes.bfloat16), NamedSharding(mesh, P())),
        "h": np.arange(70_000, dtype=np.int16),
        "step": 3,
    }
    snap, desc = own_snapshot(state, copy=True)
    storage, local = storage_for(str(tmp_path / "own"))
    write_own(storage, local, snap, CommitRecord(step=3), {DESCRIPTOR: desc}, file_size=BUF)
    target = {
        "w": jax.ShapeDtypeStruct(host.shape, np.float32, sharding=sharding),
        "rep": np.zeros((2, 300), ml_dtypes.bfloat16),
        "h": np.zeros(70_000, np.int16),
        "step": 0,
    }
    out = stepsafe.restore(str(tmp_path / "own"), target)
    assert out["w"].sharding == sharding and _same(np.asarray(out["w"]), host)
    assert _same(out["rep"], np.asarray(state["rep"])) and _same(out["h"], state["h"])
    assert out["step"] == 3
    out["h"][:] = 1
    assert _same(stepsafe.restore(str(tmp_path / "own"), target)["h"], state["h"])


def _rchar() -> int:
    """Bytes this process has read through read(2)/pread(2) so far (/proc/self/io)."""
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar")).split()[1])


@pytest.mark.parametrize("other", ["sharded", "cast"])
def test_a_truncated_file_is_refused_before_the_batch_reads_anything(tmp_path, mesh, other):
    """A 32 MiB leaf restored as saved, and one more leaf (a many-shard array from a 2x2 mesh,
    or a leaf cast to its target's dtype) whose own data file lost its last byte. The restore
    must fail with TruncatedDataError before reading the 32 MiB (``_restore_all``: "check every
    leaf ... first"; ``read_arrays``: "every file is checked before anything is allocated")."""
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    small = np.arange(64 * 64, dtype=np.int32).reshape(64, 64)
    if other == "sharded":
        leaf = jax.device_put(small, NamedSharding(mesh, P("data", "model")))
        target = None
    else:
        leaf = small
        target = {"big": np.zeros(32 << 20, np.uint8), "o": np.zeros((64, 64), np.int64)}
    step = tmp_path / "ck"
    stepsafe.save(str(step), {"big": np.ones(32 << 20, np.uint8), "o": leaf},
                  data_file_size_bytes=1 << 20)  # fmt: skip
    big = {c.file for c in _chunks_of(step, "big")}
    (victim,) = sorted({c.file for c in _chunks_of(step, "o")} - big)[-1:]
    path = step / "items" / victim
    os.truncate(path, path.stat().st_size - 1)
    before = _rchar()
    with pytest.raises(TruncatedDataError):
        stepsafe.restore(str(step), target)
    assert _rchar() - before < 4 << 20, f"{(_rchar() - before) / 1e6:.1f} MB read first"
    with open_checkpoint(str(step)) as reader:  # read_arrays itself, many-shard key last
        before = _rchar()
        with pytest.raises(TruncatedDataError):
            reader.read_arrays(["big", "o"])
        assert _rchar() - before < 4 << 20, f"{(_rchar() - before) / 1e6:.1f} MB read first"


@pytest.mark.parametrize("bucket_url", BUCKET_KINDS, indirect=True)
def test_the_batch_reads_buckets_bit_exact(bucket_url):
    tree = _all_dtypes()
    stepsafe.save(bucket_url + "/ck", tree, data_file_size_bytes=4096)
    out = stepsafe.restore(bucket_url + "/ck")
    assert all(_same(out[k], v) for k, v in tree.items())
    out = stepsafe.restore(bucket_url + "/ck", {k: np.zeros_like(v) for k, v in tree.items()})
    assert all(_same(out[k], v) for k, v in tree.items())


def _planned(reader, key: str) -> np.ndarray:
    """``key`` read the per-array way (``plan`` + ``read``), as before the batch."""
    plan = reader.plan(key)
    reader.read([plan])
    return next(iter(plan.outs.values()))


def test_the_batch_reads_what_per_array_plans_read(tmp_path, mesh):
    """Differential: ``read_arrays`` over every array of three checkpoints (the checked-in
    format-1 one, the dtype zoo over many small files, arrays from a 2x2 mesh) equals reading
    each array through its own plan, byte for byte, dtype and shape."""
    import shutil

    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    golden = tmp_path / "golden"
    shutil.copytree(Path(__file__).parent / "data" / "format_v1", golden)
    stepsafe.save(str(tmp_path / "zoo"), _all_dtypes(), data_file_size_bytes=300)
    host = np.arange(40 * 12, dtype=np.float32).reshape(40, 12)
    sharded = {
        "a": jax.device_put(host, NamedSharding(mesh, P("data", "model"))),
        "b": jax.device_put(host[:4], NamedSharding(mesh, P(None, "model"))),
        "c": host[:7].astype(ml_dtypes.bfloat16),
    }
    stepsafe.save(str(tmp_path / "mesh"), sharded, data_file_size_bytes=700)
    steps = [str(golden / "checkpoints" / "7"), str(tmp_path / "zoo"), str(tmp_path / "mesh")]
    for step in steps:
        with open_checkpoint(step) as reader:
            keys = list(reader.manifest.arrays)
            assert keys
            for verify in (True, False):
                for key, got in zip(keys, reader.read_arrays(keys, verify)):
                    assert _same(got, _planned(reader, key)), (step, key)
