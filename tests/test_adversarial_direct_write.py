"""Adversarial review of data files written with O_DIRECT (commit 07690c3, ``direct_write``).

Real saves and restores on the real disk (ext4 here), on ramfs/tmpfs and on a tiny loop-mounted
ext4 where this process may mount (root, in a private mount namespace via ``unshare -m``, which
drops the mount when the command exits), and under RLIMIT_FSIZE in a child process.
"""

from __future__ import annotations

import errno
import fcntl
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import stepsafe
from stepsafe import knobs
from stepsafe.errors import StorageError
from stepsafe.storage import direct_write

PY = sys.executable


@pytest.fixture
def buf64k(monkeypatch):
    """A 64 KiB buffer: every edge of it is cheap to reach."""
    monkeypatch.setattr(knobs, "DIRECT_WRITE_BUFFER_BYTES", 65536)
    monkeypatch.setattr(direct_write._local, "buffers", None, raising=False)


def _same(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _items(path: Path) -> list[Path]:
    return sorted((path / "items").glob("*.data"))


# ---------------------------------------------------------------------------------------------
# Breaks
# ---------------------------------------------------------------------------------------------


def test_a_filesystem_that_refuses_o_direct_at_open_still_saves(tmp_path, monkeypatch):
    """Linux creates the file *before* it refuses O_DIRECT (do_dentry_open: EINVAL after the
    O_CREAT lookup made the inode; seen for real on ramfs, see the next test). open_direct then
    retries with O_CREAT|O_EXCL on the file it just made: EEXIST, and every save to such a
    filesystem fails ("File exists") -- the user cannot checkpoint there at all, although the
    fallback promises the buffered way. Emulated here exactly as the kernel does it."""
    real_open = os.open

    def kernel_like(path, flags, mode=0o777, *a, **kw):
        if flags & os.O_DIRECT:
            os.close(real_open(path, flags & ~os.O_DIRECT, mode))  # the inode is made first
            raise OSError(errno.EINVAL, "Invalid argument", str(path))
        return real_open(path, flags, mode, *a, **kw)

    monkeypatch.setattr(os, "open", kernel_like)
    tree = {"a": np.arange(10_000, dtype=np.float32)}
    stepsafe.save(str(tmp_path / "ck"), tree)
    assert _same(stepsafe.restore(str(tmp_path / "ck"))["a"], tree["a"])


def _unshare_ok() -> bool:
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return False
    r = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    return r.returncode == 0


SAVE_SCRIPT = """
import os, sys, numpy as np, stepsafe
d, n = sys.argv[1], int(sys.argv[2])
tree = {"a": np.frombuffer(np.random.default_rng(n).bytes(n), np.uint8)}
try:
    stepsafe.save(d + "/ck", tree)
    ok = stepsafe.restore(d + "/ck")["a"].tobytes() == tree["a"].tobytes()
    print("SAVED", ok, not stepsafe.verify(d + "/ck").problems)
except stepsafe.StorageError as e:
    print("STORAGEERROR", getattr(e, "errno", None), e)
print("LEFT", sorted(os.listdir(d)))
"""


def _in_mount(tmp_path: Path, mount: str, n: int, env: dict | None = None) -> str:
    script = tmp_path / "save.py"
    script.write_text(SAVE_SCRIPT)
    mnt = tmp_path / "mnt"
    mnt.mkdir(exist_ok=True)
    cmd = f"{mount} {mnt} || exit 77; {PY} {script} {mnt} {n}"
    r = subprocess.run(
        ["unshare", "-m", "sh", "-c", cmd],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )
    if r.returncode == 77:  # no loop device or ramfs here (a container): nothing to test
        pytest.skip(f"cannot mount here: {r.stderr.strip()[-200:]}")
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


@pytest.mark.skipif(not _unshare_ok(), reason="needs root and unshare -m to mount ramfs")
def test_a_save_to_ramfs_commits(tmp_path):
    """ramfs refuses O_DIRECT at open (after making the file): every save there fails with
    'File exists' instead of being written the buffered way."""
    out = _in_mount(tmp_path, "mount -t ramfs none", 10_000)
    assert "SAVED True True" in out, out


FSIZE_SCRIPT = """
import os, resource, signal, sys, numpy as np, stepsafe
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
d, n, lim = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
tree = {"a": np.frombuffer(np.random.default_rng(n).bytes(n), np.uint8)}
resource.setrlimit(resource.RLIMIT_FSIZE, (lim, resource.RLIM_INFINITY))
try:
    stepsafe.save(d + "/ck", tree)
    print("SAVED", stepsafe.restore(d + "/ck")["a"].tobytes() == tree["a"].tobytes())
except stepsafe.StorageError as e:
    print("STORAGEERROR", getattr(e, "errno", None), e)
print("LEFT", sorted(p for p in os.listdir(d)))
"""


def _fsize(tmp_path: Path, n: int, limit: int, buffer: int | None = 65536) -> str:
    script = tmp_path / "fsize.py"
    script.write_text(FSIZE_SCRIPT)
    out = tmp_path / f"out{n}_{limit}"
    out.mkdir()
    r = subprocess.run(
        [PY, str(script), str(out), str(n), str(limit)],
        capture_output=True,
        text=True,
        timeout=120,
        env={
            **{k: v for k, v in os.environ.items() if k != "STEPSAFE_DIRECT_WRITE_BUFFER_BYTES"},
            **({} if buffer is None else {"STEPSAFE_DIRECT_WRITE_BUFFER_BYTES": str(buffer)}),
        },
    )
    if r.returncode == 77:  # no loop device or ramfs here (a container): nothing to test
        pytest.skip(f"cannot mount here: {r.stderr.strip()[-200:]}")
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


@pytest.mark.parametrize("buffer", [65536, None])
def test_a_file_size_limit_the_data_fits_under_does_not_fail_the_save(tmp_path, buffer):
    """``ulimit -f`` is in KiB, so a limit not a multiple of 4 KiB is ordinary. A data file of
    buffer+5000 bytes under a limit of buffer+6000 fits (buffered: saved), but the padded last
    direct write crosses the limit, the kernel shortens it to an unaligned length and O_DIRECT
    answers EINVAL past the first flush: the save fails with 'Invalid argument' -- a checkpoint
    lost that the previous release wrote (checked: STEPSAFE_DIRECT_WRITE_BUFFER_BYTES=0 saves).
    None: the default 8 MiB buffer, as a user runs it."""
    size = 65536 if buffer else 8 << 20
    out = _fsize(tmp_path, size + 5000, size + 6000, buffer)
    assert "SAVED True" in out, out
    assert "SAVED True" in _fsize(tmp_path, size + 5000, size + 6000 + 1, buffer=0)


def test_a_file_size_limit_exceeded_is_reported_as_efbig(tmp_path):
    """A save over RLIMIT_FSIZE must say 'File too large' (errno EFBIG, which the CLI maps to
    'a file outgrew the size limit (ulimit -f)'); direct writes report 'Invalid argument'
    (EINVAL: the CLI's 'cannot access ... check the path and retry'), sending the user after a
    path problem that does not exist."""
    out = _fsize(tmp_path, 300_000, 100_000)
    assert "SAVED" not in out and "LEFT []" in out, out  # nothing committed (holds)
    assert f"STORAGEERROR {errno.EFBIG} " in out, out


# ---------------------------------------------------------------------------------------------
# Checks that hold (kept as regressions)
# ---------------------------------------------------------------------------------------------

EDGES = [0, 1, 511, 512, 4095, 4096, 4097, 65535, 65536, 65537, 2 * 65536 + 4095]


@pytest.mark.parametrize("file_size", [4096, 65536, 200_000])
def test_edge_sizes_several_arrays_and_files_round_trip(tmp_path, buf64k, file_size):
    rng = np.random.default_rng(file_size)
    tree = {f"a{i}_{n}": rng.integers(0, 256, n, dtype=np.uint8) for i, n in enumerate(EDGES)}
    tree["f"] = rng.standard_normal(70_001).astype(np.float32)
    path = str(tmp_path / "ck")
    stepsafe.save(path, tree, data_file_size_bytes=file_size)
    assert not stepsafe.verify(path).problems
    out = stepsafe.restore(path)
    assert all(_same(out[k], v) for k, v in tree.items())
    # no file keeps the padding of its last direct write past its true end
    total = sum(f.stat().st_size for f in _items(tmp_path / "ck"))
    assert total < sum(v.nbytes for v in tree.values()) + 4096 * len(_items(tmp_path / "ck"))


def test_odd_dtypes_and_layouts_round_trip(tmp_path, buf64k):
    rng = np.random.default_rng(1)
    base = rng.standard_normal((257, 129)).astype(np.float32)
    tree = {
        "bf16": base.astype(ml_dtypes.bfloat16),
        "f8": base.astype(ml_dtypes.float8_e4m3fn),
        "bool": base > 0,
        "zero_d": np.float64(3.5) * np.ones(()),
        "empty": np.zeros((0, 7), np.int16),
        "noncontig": base[::3, 1::2],
        "fortran": np.asfortranarray(base[:100, :77]),
        "big_endian": base.astype(">f4"),
        "c128": (base[:33] + 1j).astype(np.complex128),
    }
    path = str(tmp_path / "ck")
    stepsafe.save(path, tree, data_file_size_bytes=65536)
    assert not stepsafe.verify(path).problems
    out = stepsafe.restore(path)
    for k, v in tree.items():
        assert np.array_equal(np.asarray(out[k]).astype(v.dtype), v), k


def test_a_stream_that_raises_midway_commits_nothing(tmp_path, buf64k, monkeypatch):
    from stepsafe.storage.local import LocalTransaction

    real = LocalTransaction.write_file

    def boom(self, relpath, chunks):
        def gen():
            for i, c in enumerate(chunks):
                if i == 2:
                    raise RuntimeError("the producer died")
                yield c

        return real(self, relpath, gen() if relpath.endswith(".data") else chunks)

    monkeypatch.setattr(LocalTransaction, "write_file", boom)
    monkeypatch.setattr(knobs, "GATHER_BYTES", 1, raising=False)
    tree = {f"a{i}": np.full(70_000, i, np.uint8) for i in range(6)}
    with pytest.raises(RuntimeError):
        stepsafe.save(str(tmp_path / "ck"), tree)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("short", [512, 4096])
def test_short_aligned_direct_writes_still_write_every_byte(tmp_path, buf64k, monkeypatch, short):
    """The kernel may return a short direct write (in whole blocks): the rest goes on."""
    real = os.pwrite

    def short_pwrite(fd, data, offset):
        return real(fd, memoryview(data)[: min(short, len(data))], offset)

    monkeypatch.setattr(os, "pwrite", short_pwrite)
    data = np.frombuffer(np.random.default_rng(short).bytes(3 * 65536 + 777), np.uint8)
    stepsafe.save(str(tmp_path / "ck"), {"a": data}, data_file_size_bytes=100_000)
    assert _same(stepsafe.restore(str(tmp_path / "ck"))["a"], data)


def test_many_threads_saving_at_once_keep_their_bytes(tmp_path, buf64k):
    rng = np.random.default_rng(7)
    trees = [{"a": rng.integers(0, 256, 65536 * 2 + i * 999, dtype=np.uint8)} for i in range(8)]
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            for r in range(3):
                stepsafe.save(str(tmp_path / f"t{i}_{r}"), trees[i], data_file_size_bytes=65536)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    for i in range(8):
        for r in range(3):
            assert _same(stepsafe.restore(str(tmp_path / f"t{i}_{r}"))["a"], trees[i]["a"])


def test_a_forked_child_saves_with_the_inherited_buffer(tmp_path, buf64k):
    a = np.arange(50_000, dtype=np.int32)
    stepsafe.save(str(tmp_path / "parent"), {"a": a})  # the buffer exists now
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            stepsafe.save(str(tmp_path / "child"), {"a": a[::-1].copy()})
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    stepsafe.save(str(tmp_path / "parent2"), {"a": a})
    assert _same(stepsafe.restore(str(tmp_path / "child"))["a"], a[::-1])
    assert _same(stepsafe.restore(str(tmp_path / "parent2"))["a"], a)


def test_no_file_descriptors_leak_across_saves_and_failures(tmp_path, buf64k, monkeypatch):
    before = len(os.listdir("/proc/self/fd"))
    tree = {"a": np.arange(100_000, dtype=np.float32)}
    for i in range(20):
        stepsafe.save(str(tmp_path / f"ok{i}"), tree, data_file_size_bytes=65536)
    real = os.pwrite

    def enospc(fd, data, offset):
        if offset >= 65536:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", enospc)
    for i in range(5):
        with pytest.raises(StorageError, match="No space left"):
            stepsafe.save(str(tmp_path / f"bad{i}"), tree, data_file_size_bytes=1 << 20)
        assert not (tmp_path / f"bad{i}").exists()
    assert len(os.listdir("/proc/self/fd")) <= before


def test_save_to_dev_shm_round_trips(buf64k):
    if not os.path.isdir("/dev/shm") or not os.access("/dev/shm", os.W_OK):
        pytest.skip("no writable /dev/shm")
    d = Path("/dev/shm") / f"adv_dw_{os.getpid()}"
    d.mkdir()
    try:
        tree = {"a": np.arange(77_777, dtype=np.int16)}
        stepsafe.save(str(d / "ck"), tree)
        assert not stepsafe.verify(str(d / "ck")).problems
        assert _same(stepsafe.restore(str(d / "ck"))["a"], tree["a"])
    finally:
        shutil.rmtree(d)


@pytest.mark.parametrize("local_tier", [False, True])
def test_async_manager_saves_restore_right_after(tmp_path, buf64k, local_tier):
    """Async saves (and the local tier's copy) restore and verify the bytes at once."""
    opts = stepsafe.ManagerOptions(
        save_interval_steps=1,
        max_to_keep=10,
        data_file_size_bytes=65536,
        **(
            {"local_directory": str(tmp_path / "local"), "local_save_interval_steps": 1}
            if local_tier
            else {}
        ),
    )
    mgr = stepsafe.CheckpointManager(str(tmp_path / "run"), opts)
    try:
        states = {}
        for step in range(4):
            states[step] = {"w": np.random.default_rng(step).standard_normal(40_000 + step)}
            mgr.save(step, states[step])
        mgr.wait_until_finished()
        assert mgr.all_steps()
        for step in mgr.all_steps():
            assert _same(mgr.restore(step)["w"], states[step]["w"])
            assert not stepsafe.verify(mgr.step_path(step)).problems
    finally:
        mgr.close()


@pytest.mark.skipif(not _unshare_ok(), reason="needs root and unshare -m to mount a loop ext4")
def test_a_full_disk_says_no_space_and_commits_nothing(tmp_path):
    img = tmp_path / "img"
    with open(img, "wb") as f:
        f.truncate(16 << 20)
    r = subprocess.run(["mkfs.ext4", "-q", "-F", str(img)], capture_output=True)
    if r.returncode:
        pytest.skip("no mkfs.ext4")
    env = {"STEPSAFE_DIRECT_WRITE_BUFFER_BYTES": str(1 << 20)}
    out = _in_mount(tmp_path, f"mount -o loop {img}", 40_000_000, env)
    assert f"STORAGEERROR {errno.ENOSPC} " in out and "LEFT ['lost+found']" in out, out


KILL_SCRIPT = """
import sys, numpy as np, stepsafe
rng = np.random.default_rng(5)
tree = {f"a{i}": rng.integers(0, 256, 3_000_000 + i * 4097, dtype=np.uint8) for i in range(8)}
print("GO", flush=True)
stepsafe.save(sys.argv[1], tree, data_file_size_bytes=4 << 20)
print("DONE", flush=True)
"""


def test_sigkill_mid_save_leaves_nothing_or_the_whole_checkpoint(tmp_path):
    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT)
    rng = np.random.default_rng(5)
    want = {f"a{i}": rng.integers(0, 256, 3_000_000 + i * 4097, dtype=np.uint8) for i in range(8)}
    env = {**os.environ, "STEPSAFE_DIRECT_WRITE_BUFFER_BYTES": str(1 << 20)}
    delays = [0.0, 0.01, 0.03, 0.06, 0.1, 0.2]
    for k, delay in enumerate(delays):
        dest = tmp_path / f"ck{k}"
        p = subprocess.Popen([PY, str(script), str(dest)], stdout=subprocess.PIPE, env=env)
        assert p.stdout.readline().startswith(b"GO")
        try:
            p.wait(delay)
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGKILL)
        p.wait(60)
        if dest.exists():
            assert not stepsafe.verify(str(dest)).problems
            out = stepsafe.restore(str(dest))
            assert all(_same(out[key], v) for key, v in want.items())


def test_fcntl_still_reports_o_direct_on_ext4_files(tmp_path):
    """Guards the premise of the tests above: ext4 here takes O_DIRECT (else they test the
    buffered way only)."""
    fd, direct = direct_write.open_direct(tmp_path / "x.data")
    try:
        assert direct and fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT
    finally:
        os.close(fd)
    assert resource.getrlimit(resource.RLIMIT_FSIZE)[0] == resource.RLIM_INFINITY
