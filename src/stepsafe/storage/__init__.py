"""Bytes at paths: local POSIX, and buckets (s3://, gs://, memory://) through fsspec.
Knows nothing of trees."""

from __future__ import annotations

from stepsafe.storage.base import ReadHandle, Storage, Transaction
from stepsafe.storage.budget import IN_FLIGHT, ByteBudget
from stepsafe.storage.dispatch import is_bucket, remote_storage, storage_for
from stepsafe.storage.local import LocalStorage
from stepsafe.storage.ranges import RangeRead
from stepsafe.storage.remote import COMMIT_MARKER, RemoteStorage
from stepsafe.storage.temporaries import remove_stale_temporaries, stale_temporaries
from stepsafe.storage.threads import io_pool, run_all

__all__ = [
    "is_bucket",
    "COMMIT_MARKER",
    "ByteBudget",
    "IN_FLIGHT",
    "LocalStorage",
    "RangeRead",
    "ReadHandle",
    "RemoteStorage",
    "Storage",
    "Transaction",
    "io_pool",
    "remove_stale_temporaries",
    "remote_storage",
    "run_all",
    "stale_temporaries",
    "storage_for",
]
