"""A local commit renames only once every file and directory of the checkpoint is fsynced, and
the parent after; a failed fsync fails the save and commits nothing. ``_fsync`` is wrapped, not
replaced: the real fsyncs run."""

from __future__ import annotations

import errno
import os
import threading

import numpy as np
import pytest

import stepsafe
from stepsafe.errors import StorageError
from stepsafe.storage import local

TREE = {"a": np.arange(10, dtype=np.float32), "b": {"c": np.ones((3, 3))}, "step": 3}


def _spy(monkeypatch, fail_on: str | None = None) -> tuple[list[str], list[str]]:
    synced: list[str] = []
    events: list[str] = []
    lock = threading.Lock()
    real_fsync, real_rename = local._fsync, os.rename

    def fsync(path) -> None:
        if fail_on is not None and str(path).endswith(fail_on):
            raise OSError(errno.EIO, "Input/output error", str(path))
        real_fsync(path)
        with lock:
            synced.append(str(path))

    def rename(src, dst) -> None:
        events.append(f"rename {os.path.basename(src)}")
        real_rename(src, dst)

    monkeypatch.setattr(local, "_fsync", fsync)
    monkeypatch.setattr(local.os, "rename", rename)
    return synced, events


def test_every_file_and_directory_is_synced_before_the_rename(tmp_path, monkeypatch):
    synced, events = _spy(monkeypatch)
    stepsafe.save(tmp_path / "c", TREE)
    assert len(events) == 1
    tmp_name = events[0].removeprefix("rename ")
    before = {os.path.relpath(p, tmp_path / tmp_name) for p in synced[:-1]}
    written = {
        os.path.relpath(os.path.join(d, n), tmp_path / "c")
        for d, dirs, files in os.walk(tmp_path / "c")
        for n in [*dirs, *files]
    }
    assert written <= before  # every file and directory inside, synced before the rename
    assert "." in before  # the step directory itself
    assert synced[-1] == str(tmp_path)  # the parent, after the rename
    np.testing.assert_array_equal(stepsafe.restore(tmp_path / "c")["a"], TREE["a"])


@pytest.mark.parametrize("which", [".data", ".json", "_CHECKPOINT_METADATA"])
def test_a_failed_fsync_commits_nothing(tmp_path, monkeypatch, which):
    _spy(monkeypatch, fail_on=which)
    with pytest.raises(StorageError, match="syncing its files to disk"):
        stepsafe.save(tmp_path / "c", TREE)
    assert os.listdir(tmp_path) == []  # no checkpoint, no temporary left
    monkeypatch.undo()
    stepsafe.save(tmp_path / "c", TREE)  # the next save works
    assert stepsafe.restore(tmp_path / "c")["step"] == 3
