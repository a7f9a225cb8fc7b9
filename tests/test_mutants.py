"""Promises that no other test could see broken (each found by a mutation audit of the code).

Each test observes real behaviour: the order of the system calls a commit makes (recorded
in-process, since a SIGKILL cannot see a missing fsync), real subprocesses that exit or die
mid-save, and deletions recorded as they happen. Where a test needs a save to be slow, it
delays each file write (``slow_writes``), as a slow disk would.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from iterators import Opaque
from trees import assert_bit_exact

import stepsafe
from stepsafe.errors import StepsafeError
from stepsafe.format import COMMIT_FILE, delete_checkpoint
from stepsafe.manager import CheckpointManager, ManagerOptions, load_initial_state
from stepsafe.storage.local import LocalStorage, LocalTransaction
from stepsafe.storage.temporaries import TMP_MARK


def state_at(step: int) -> dict:
    rng = np.random.default_rng(step)
    return {
        "step": step,
        "params": {"w": rng.standard_normal((32, 32)).astype(np.float32)},
        "opt_state": {"mu": rng.standard_normal(100).astype(np.float64)},
    }


@pytest.fixture
def slow_writes(monkeypatch):
    """Every file of a local save is written ``delay`` seconds after it is handed over (the
    bytes are read from the snapshot only then), like a slow disk would."""

    def install(delay: float) -> None:
        real = LocalTransaction.write_file

        def slow(self, relpath, chunks):
            time.sleep(delay)
            return real(self, relpath, chunks)

        monkeypatch.setattr(LocalTransaction, "write_file", slow)

    return install


# -- 1. durability: every file and directory fsynced before the rename, the parent after --------
class SyscallLog:
    """``os.open``/``os.fsync``/``os.fdatasync``/``os.rename`` as they happen, with the path
    each fsynced fd was opened at."""

    def __init__(self, monkeypatch) -> None:
        self.events: list[tuple[str, str, str]] = []
        self._paths: dict[int, str] = {}
        self._lock = threading.Lock()
        real_open, real_fsync, real_fdatasync, real_rename = (
            os.open, os.fsync, os.fdatasync, os.rename
        )  # fmt: skip

        def open_(path, flags, mode=0o777, *, dir_fd=None):
            fd = real_open(path, flags, mode, dir_fd=dir_fd)
            if dir_fd is None:
                with self._lock:
                    self._paths[fd] = os.path.abspath(os.fsdecode(path))
            return fd

        def sync(real):
            def f(fd):
                n = fd if isinstance(fd, int) else fd.fileno()
                real(fd)
                with self._lock:
                    self.events.append(("fsync", self._paths.get(n, f"fd {n}"), ""))

            return f

        def rename(src, dst, *args, **kwargs):
            real_rename(src, dst, *args, **kwargs)
            with self._lock:
                self.events.append(("rename", os.fsdecode(src), os.fsdecode(dst)))

        monkeypatch.setattr(os, "open", open_)
        monkeypatch.setattr(os, "fsync", sync(real_fsync))
        monkeypatch.setattr(os, "fdatasync", sync(real_fdatasync))
        monkeypatch.setattr(os, "rename", rename)


class Cursor:
    def __init__(self, position: int) -> None:
        self.position = position

    def get_state(self):
        return {"position": self.position}

    def set_state(self, state) -> None:
        self.position = state["position"]


@pytest.mark.parametrize("how", ["save", "manager"])
def test_commit_fsyncs_every_file_and_dir_before_the_rename_and_the_parent_after(
    tmp_path, monkeypatch, how
):
    state = {"big": np.arange(1 << 19, dtype=np.float32), **state_at(1)}  # 2 MiB and small
    final = tmp_path / "run" / "checkpoints" / "1"
    final.parent.mkdir(parents=True)
    log = SyscallLog(monkeypatch)
    if how == "save":
        stepsafe.save(final, state, data_file_size_bytes=1 << 20)
    else:
        opts = ManagerOptions(async_save=True, data_file_size_bytes=1 << 20)
        with CheckpointManager(str(final.parent), opts) as m:
            m.save(1, state, data_iterator=Cursor(5), force=True)
    monkeypatch.undo()

    renames = [i for i, e in enumerate(log.events) if e[0] == "rename" and e[2] == str(final)]
    assert len(renames) == 1, log.events
    at = renames[0]
    tmp = log.events[at][1]
    assert TMP_MARK in Path(tmp).name and Path(tmp).parent == final.parent
    before = {p for kind, p, _ in log.events[:at] if kind == "fsync"}
    after = {p for kind, p, _ in log.events[at + 1 :] if kind == "fsync"}
    files = [p.relative_to(final) for p in final.rglob("*") if p.is_file()]
    dirs = [Path(".")] + [p.relative_to(final) for p in final.rglob("*") if p.is_dir()]
    assert len(files) >= 4 and Path("items") in dirs
    assert how == "save" or Path("iter") in dirs
    for rel in files + dirs:
        assert os.path.normpath(Path(tmp) / rel) in before, f"{rel} not fsynced before the rename"
    assert str(final.parent) in after, "the parent directory is not fsynced after the rename"
    assert_bit_exact(stepsafe.restore(final)["big"], state["big"])


# -- 2. retention runs only after the new step committed ---------------------------------------
def _fail_rename_of(monkeypatch, name: str) -> None:
    """The commit of step ``name`` fails at its very last moment, as a full or dying disk can."""
    real = os.rename

    def rename(src, dst, *args, **kwargs):
        if os.path.basename(os.fsdecode(dst)) == name and TMP_MARK in os.fsdecode(src):
            raise OSError(errno.EIO, "injected I/O error", os.fsdecode(dst))
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "rename", rename)


@pytest.mark.parametrize("existing", [2, 4])
@pytest.mark.parametrize("async_save", [True, False])
def test_failed_save_deletes_no_older_step(tmp_path, monkeypatch, existing, async_save):
    """keep=2 over 2 steps (the new one would make room) and over 4 (left by a keep-all run):
    a save whose commit fails must leave every existing step in place."""
    with CheckpointManager(str(tmp_path), ManagerOptions(async_save=False)) as m:
        for s in range(1, existing + 1):
            m.save(s, state_at(s), force=True)
    opts = ManagerOptions(async_save=async_save, max_to_keep=2, save_interval_steps=1)
    m = CheckpointManager(str(tmp_path), opts)
    before = m.all_steps()
    assert before == list(range(1, existing + 1))
    new = existing + 1
    _fail_rename_of(monkeypatch, str(new))
    with pytest.raises((OSError, StepsafeError), match="injected"):
        m.save(new, state_at(new))
        m.wait_until_finished()
    monkeypatch.undo()
    assert m.all_steps() == before
    for s in before:
        assert_bit_exact(stepsafe.restore(tmp_path / str(s)), state_at(s))
    assert not [p for p in os.listdir(tmp_path) if TMP_MARK in p]  # the failed save cleaned up
    m.save(new, state_at(new))  # and the manager goes on: now retention may run
    m.close()
    assert m.all_steps() == [existing, new]


# -- 3. a run's own latest step wins over load_parameters_path / load_full_state_path ---------
@pytest.mark.parametrize("flag", ["load_parameters_path", "load_full_state_path"])
def test_own_latest_step_wins_over_paths_from_another_run(tmp_path, flag):
    other = tmp_path / "other" / "checkpoints" / "100"
    stepsafe.save(other, state_at(100))
    run = tmp_path / "run" / "checkpoints"
    with CheckpointManager(str(run), ManagerOptions(async_save=False)) as m:
        m.save(3, state_at(3), force=True)
        m.save(6, state_at(6), force=True)
        loaded = load_initial_state(m, state_at(0), **{flag: str(other)})
    assert loaded.source == "resume"
    assert loaded.path == m.step_path(6)
    assert_bit_exact(loaded.state, state_at(6))
    with CheckpointManager(str(tmp_path / "fresh" / "checkpoints")) as fresh:
        assert load_initial_state(fresh, state_at(0), **{flag: str(other)}).source != "resume"


# -- 4. stale temporaries are removed when a manager starts -----------------------------------
DIE_BEFORE_RENAME = """
import os, sys
import numpy as np
import stepsafe

def die(*args, **kwargs):
    os._exit(0)  # the machine died just before the rename: the temporary is complete

os.rename = die
stepsafe.save(sys.argv[1], {"w": np.arange(1000, dtype=np.float32)})
"""


def test_manager_start_removes_a_dead_save_s_temporary_and_keeps_a_live_one(tmp_path):
    d = tmp_path / "checkpoints"
    with CheckpointManager(str(d), ManagerOptions(async_save=False)) as m:
        m.save(1, state_at(1), force=True)
    subprocess.run([sys.executable, "-c", DIE_BEFORE_RENAME, str(d / "2")], check=True)
    (dead,) = [p for p in os.listdir(d) if TMP_MARK in p]
    assert dead.startswith("2" + TMP_MARK) and (d / dead / COMMIT_FILE).is_file()
    live = LocalStorage().transaction(str(d / "3"))  # a save of this (live) process, unfinished
    live.write_file("items/x.data", [b"x" * 100])
    try:
        m = CheckpointManager(str(d), ManagerOptions(async_save=False))
        assert not (d / dead).exists()
        assert live.tmp.is_dir()
        assert m.all_steps() == [1]
        assert_bit_exact(stepsafe.restore(d / "1"), state_at(1))
        m.close()
    finally:
        live.abort()


# -- 6. the interpreter waits for an in-flight async save before exiting -----------------------
EXIT_AFTER_ASYNC_SAVE = """
import sys, time
import numpy as np
from stepsafe.manager import CheckpointManager, ManagerOptions
from stepsafe.storage.local import LocalTransaction

real = LocalTransaction.write_file

def slow(self, relpath, chunks):  # a slow disk: the save outlives the main thread by far
    time.sleep(0.3)
    return real(self, relpath, chunks)

LocalTransaction.write_file = slow
m = CheckpointManager(sys.argv[1], ManagerOptions(async_save=True))
m.save(9, {"w": np.arange(1000, dtype=np.float32), "step": 9}, force=True)
print("returned", flush=True)
"""  # ...and the script ends here, without wait_until_finished()


def test_process_that_exits_right_after_an_async_save_still_commits_it(tmp_path):
    d = tmp_path / "checkpoints"
    p = subprocess.run(
        [sys.executable, "-c", EXIT_AFTER_ASYNC_SAVE, str(d)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert p.returncode == 0 and p.stdout == "returned\n", p.stderr
    out = stepsafe.restore(d / "9")
    assert_bit_exact(out, {"w": np.arange(1000, dtype=np.float32), "step": 9})
    assert not [n for n in os.listdir(d) if TMP_MARK in n]


# -- 7. an async snapshot never overwrites the buffers a running save still writes from --------
def test_consecutive_async_saves_of_an_array_changed_in_place(tmp_path, slow_writes):
    slow_writes(0.15)
    w = np.zeros((64, 64), np.float32)
    state = {"params": {"w": w}, "b": np.zeros(10, np.int64)}
    with CheckpointManager(str(tmp_path), ManagerOptions(save_interval_steps=1)) as m:
        for s in range(1, 5):
            w[:] = s  # the caller updates its state in place, as an optimizer step does
            state["b"][:] = -s
            assert m.save(s, state)
    assert m.all_steps() == [1, 2, 3, 4]
    for s in range(1, 5):
        out = stepsafe.restore(tmp_path / str(s))
        np.testing.assert_array_equal(out["params"]["w"], np.full((64, 64), s, np.float32))
        np.testing.assert_array_equal(out["b"], np.full(10, -s, np.int64))


# -- 8. a deleted checkpoint loses its commit marker before anything else ----------------------
class DeletionLog:
    """Storage deletions as they are made, and whether the step's marker still existed then."""

    def __init__(self, monkeypatch, storage_cls: type) -> None:
        self.calls: list[tuple[str, str, bool]] = []
        for name in ("delete_file", "delete_tree"):
            real = getattr(storage_cls, name)

            def record(self_, path, _real=real, _name=name):
                self.calls.append((_name, path, self_.exists(self_.join(path, COMMIT_FILE))))
                return _real(self_, path)

            monkeypatch.setattr(storage_cls, name, record)


def _marker_went_first(calls: list[tuple[str, str, bool]], step_dir: str) -> None:
    mine = [c for c in calls if c[1] == step_dir or c[1].startswith(step_dir.rstrip("/") + "/")]
    assert mine, calls
    marker = step_dir.rstrip("/") + "/" + COMMIT_FILE
    first = mine[0]
    assert first[0] == "delete_file" and first[1].replace(os.sep, "/") == marker.replace(
        os.sep, "/"
    ), mine


def test_retention_deletes_the_marker_before_the_rest(tmp_path, monkeypatch):
    log = DeletionLog(monkeypatch, LocalStorage)
    unlinked: list[tuple[str, bool]] = []  # every file unlinked in step 1, marker present then?
    real_unlink = os.unlink
    step1 = str(tmp_path / "1")

    def unlink(path, *, dir_fd=None):
        full = os.fsdecode(path)
        if dir_fd is not None:
            full = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), full)
        if full.startswith(step1 + os.sep):
            unlinked.append((full, os.path.exists(os.path.join(step1, COMMIT_FILE))))
        return real_unlink(path, dir_fd=dir_fd)

    monkeypatch.setattr(os, "unlink", unlink)
    opts = ManagerOptions(async_save=False, max_to_keep=1, data_file_size_bytes=1024)
    with CheckpointManager(str(tmp_path), opts) as m:
        m.save(1, state_at(1), data_iterator=Cursor(1), force=True)
        m.save(2, state_at(2), data_iterator=Cursor(2), force=True)
    monkeypatch.undo()
    assert m.all_steps() == [2] and not os.path.exists(step1)
    _marker_went_first(log.calls, step1)
    others = [(p, present) for p, present in unlinked if not p.endswith(COMMIT_FILE)]
    assert len(others) >= 4, unlinked  # data files, manifest, iterator state
    assert not any(present for _, present in others), unlinked


def test_delete_checkpoint_in_a_bucket_deletes_the_marker_first(monkeypatch):
    from stepsafe.storage import storage_for

    storage, root = storage_for("memory://bucket/mutants-delete")
    path = storage.join(root, "5")
    stepsafe.save("memory://bucket/mutants-delete/5", state_at(5))
    log = DeletionLog(monkeypatch, type(storage))
    delete_checkpoint(storage, path)
    monkeypatch.undo()
    _marker_went_first(log.calls, path)
    assert storage.list_dir(path) == []


# -- 9. a data iterator's state round-trips with its type: bytes as bytes, JSON as JSON --------
@pytest.mark.parametrize(
    "state",
    [
        b"\x00\xff\xfe raw \x80 not utf-8",
        b'{"position": 3}',  # bytes that happen to be JSON stay bytes
        b"",
        {"position": 3, "files": ["a", "b"], "rng": [1, 2, 3], "done": False, "x": None},
        "position=3",
        [1, 2.5, "x"],
    ],
    ids=["bytes", "json-like-bytes", "empty-bytes", "dict", "str", "list"],
)
def test_iterator_state_round_trips_exactly(tmp_path, state):
    with CheckpointManager(str(tmp_path), ManagerOptions(async_save=True)) as m:
        m.save(1, state_at(1), data_iterator=Opaque(state), force=True)
    it = Opaque()
    m2 = CheckpointManager(str(tmp_path), ManagerOptions(async_save=False))
    m2.restore(1, state_at(0), data_iterator=it)
    assert type(it.state) is type(state) and it.state == state
    m2.close()


def test_unserialisable_iterator_state_is_refused_at_save(tmp_path):
    m = CheckpointManager(str(tmp_path), ManagerOptions(async_save=False))
    with pytest.raises(StepsafeError, match="iterator"):
        m.save(1, state_at(1), data_iterator=Opaque({"f": 1.5j}), force=True)
    assert m.all_steps() == []
    m.close()
