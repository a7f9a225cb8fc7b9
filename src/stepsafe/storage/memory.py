"""``memory://``: fsspec's in-process store, for tests and for trying bucket code paths.

It behaves like a bucket (no rename, marker commit) but lives only as long as the process, and
its conditional create is atomic only within this process (a lock), which is all it serves.
"""

from __future__ import annotations

import threading
from typing import Any

from stepsafe.storage.base import Storage
from stepsafe.storage.remote import RemoteStorage

_create_lock = threading.Lock()


def memory_filesystem() -> Any:
    from fsspec.implementations.memory import MemoryFileSystem

    return MemoryFileSystem()


class MemoryStorage(RemoteStorage):
    scheme = "memory"

    def create_exclusive(self, path: str, data: bytes) -> None:
        with _create_lock:
            if self.fs.exists(path):
                raise FileExistsError(path)
            self.fs.pipe_file(path, data)

    def join_transaction(self, path: str, token: str) -> Any:
        """Refused: each process has its own memory, so another process's writes would never
        reach the one that commits."""
        return Storage.join_transaction(self, path, token)
