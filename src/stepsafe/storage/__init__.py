"""Bytes at paths: local POSIX now, buckets through fsspec later. Knows nothing of trees."""

from __future__ import annotations

from stepsafe.errors import StepsafeError
from stepsafe.storage.base import ReadHandle, Storage, Transaction
from stepsafe.storage.local import (
    LocalStorage,
    is_temporary,
    remove_stale_temporaries,
    stale_temporaries,
)
from stepsafe.storage.threads import io_pool, run_all


def storage_for(path: str) -> tuple[Storage, str]:
    """The storage that holds ``path`` and the path in that storage's syntax."""
    if "://" in path and not path.startswith("file://"):
        scheme = path.split("://", 1)[0]
        raise StepsafeError(
            f"{scheme}:// paths are not supported yet; use a local path (bucket support is "
            "tracked in the buckets issue)"
        )
    local = path[len("file://") :] if path.startswith("file://") else path
    return LocalStorage(), local


__all__ = [
    "LocalStorage",
    "ReadHandle",
    "Storage",
    "Transaction",
    "io_pool",
    "is_temporary",
    "remove_stale_temporaries",
    "run_all",
    "stale_temporaries",
    "storage_for",
]
