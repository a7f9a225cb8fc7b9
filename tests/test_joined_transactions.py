"""Transactions that several processes write (a multi-host save), checked in one process: the
joined writer writes into the opener's temporary only, never commits, and on abort removes only
its own files; a token cannot lead it anywhere else; storages that live in one process's
memory refuse to be joined."""

from __future__ import annotations

from pathlib import Path

import pytest

from stepsafe.errors import StorageError
from stepsafe.storage import LocalStorage, storage_for


def test_a_joined_local_writer_writes_into_the_opener_s_temporary(tmp_path: Path) -> None:
    storage = LocalStorage()
    final = str(tmp_path / "7")
    opener = storage.transaction(final)
    joined = storage.join_transaction(final, opener.token())
    opener.write_file("items/a.data", [b"a" * 10])
    joined.write_file("items/b.data", [b"b" * 20])
    joined.prepare()
    with pytest.raises(StorageError, match="only the process that opened"):
        joined.commit()
    opener.write_file("_CHECKPOINT_METADATA", [b"{}"])
    opener.commit()
    assert sorted(p.name for p in (tmp_path / "7" / "items").iterdir()) == ["a.data", "b.data"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["7"]


def test_a_joined_writer_s_abort_removes_only_its_own_files(tmp_path: Path) -> None:
    storage = LocalStorage()
    final = str(tmp_path / "8")
    opener = storage.transaction(final)
    joined = storage.join_transaction(final, opener.token())
    opener.write_file("items/a.data", [b"a"])
    joined.write_file("items/b.data", [b"b"])
    joined.abort()
    tmp = tmp_path / opener.token()
    assert sorted(p.name for p in (tmp / "items").iterdir()) == ["a.data"]
    opener.abort()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("token", ["../x", "7.stepsafe-tmp-h-1-ab/../..", "other", "", "8"])
def test_a_token_that_is_not_the_step_s_temporary_is_refused(tmp_path: Path, token: str) -> None:
    storage = LocalStorage()
    opener = storage.transaction(str(tmp_path / "7"))
    with pytest.raises(StorageError, match="cannot join"):
        storage.join_transaction(str(tmp_path / "7"), token)
    # a real temporary's name, but of another step
    other = storage.transaction(str(tmp_path / "9"))
    with pytest.raises(StorageError, match="not its temporary"):
        storage.join_transaction(str(tmp_path / "7"), other.token())
    opener.abort()
    other.abort()


def test_a_temporary_this_host_cannot_see_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="not visible on this host"):
        LocalStorage().join_transaction(str(tmp_path / "7"), "7.stepsafe-tmp-otherhost-1-ab")


def test_memory_storage_cannot_be_joined() -> None:
    storage, path = storage_for("memory://bucket/joined")
    with pytest.raises(StorageError, match="cannot be written by several processes"):
        storage.join_transaction(path, "")
