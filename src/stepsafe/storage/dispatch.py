"""Which storage holds a path: local paths and ``file://``, or a bucket URL by its scheme.

One client per scheme and configuration per process, made on first use: a bucket client holds
connection pools and an event loop worth reusing across saves, and the configuration is read
from the environment (see s3.py and gcs.py) when it is made. Making one walks the client's
credential chain: no credentials is a ``CredentialsError`` naming the URL and what to set,
within seconds, and nothing is cached, so setting them and trying again works.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

from stepsafe.errors import CredentialsError, StepsafeError
from stepsafe.storage.base import Storage
from stepsafe.storage.local import LocalStorage
from stepsafe.storage.remote import RemoteStorage

_ENV_KEYS = (
    "STEPSAFE_S3_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ENDPOINT_URL",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ACCESS_KEY_ID",
    "AWS_PROFILE",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "STEPSAFE_S3_ANON",
    "STEPSAFE_S3_MAX_ATTEMPTS",
    "STEPSAFE_S3_READ_TIMEOUT",
    "STEPSAFE_GCS_ENDPOINT_URL",
    "STORAGE_EMULATOR_HOST",
    "STEPSAFE_GCS_TOKEN",
    "GOOGLE_APPLICATION_CREDENTIALS",
    "GOOGLE_CLOUD_PROJECT",
)
_cache: dict[tuple, RemoteStorage] = {}  # keyed by pid too: a forked child makes its own
_lock = threading.Lock()


def _new_lock_in_child() -> None:  # a parent's thread may have held it at the fork
    global _lock
    _lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_lock_in_child)


def _make_s3() -> RemoteStorage:
    from stepsafe.storage.s3 import S3Storage, s3_filesystem

    return S3Storage(s3_filesystem())


def _make_gcs() -> RemoteStorage:
    from stepsafe.storage.gcs import GCSStorage, gcs_filesystem

    return GCSStorage(gcs_filesystem())


def _make_memory() -> RemoteStorage:
    from stepsafe.storage.memory import MemoryStorage, memory_filesystem

    return MemoryStorage(memory_filesystem())


_BACKENDS: dict[str, tuple[Callable[[], RemoteStorage], str, tuple[str, ...]]] = {
    "s3": (_make_s3, "s3", ("fsspec", "s3fs")),
    "gs": (_make_gcs, "gcs", ("fsspec", "gcsfs")),
    "gcs": (_make_gcs, "gcs", ("fsspec", "gcsfs")),
    "memory": (_make_memory, "s3", ("fsspec",)),
}


def remote_storage(scheme: str) -> RemoteStorage:
    """The (cached) storage for URLs of ``scheme``; a StepsafeError naming the extra to install
    when its client library is missing."""
    if scheme not in _BACKENDS:
        raise StepsafeError(
            f"{scheme}:// paths are not supported: use a local path, gs://, s3:// or memory://"
        )
    make, extra, modules = _BACKENDS[scheme]
    key = (scheme, os.getpid(), *(os.environ.get(k) for k in _ENV_KEYS))
    with _lock:
        storage = _cache.get(key)
        if storage is None:
            try:
                storage = make()
            except ImportError as e:
                raise StepsafeError(
                    f"{scheme}:// paths need {' and '.join(modules)}, which are not installed "
                    f"({e}): pip install 'stepsafe[{extra}]'"
                ) from e
            _cache[key] = storage
        return storage


def storage_for(path: str) -> tuple[Storage, str]:
    """The storage that holds ``path`` and the path in that storage's syntax.

    Raises:
        CredentialsError: ``path`` is a bucket URL and its client found no credentials.
        StepsafeError: an unknown scheme, or its client library is not installed.
    """
    if "://" in path and not path.startswith("file://"):
        scheme = path.split("://", 1)[0].lower()
        try:
            return remote_storage(scheme), path
        except CredentialsError as e:
            raise CredentialsError(f"cannot access {path}: {e}") from None
    local = path[len("file://") :] if path.startswith("file://") else path
    return LocalStorage(), local
