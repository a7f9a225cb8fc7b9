"""Which storage holds a path: local paths and ``file://``, or a bucket URL by its scheme.

One client per scheme and configuration per process, made on first use: a bucket client holds
connection pools and an event loop worth reusing across saves, and the configuration is read
from the environment (see s3.py and gcs.py, each the one home of its settings) when it is made.
Making one walks the client's credential chain: no credentials is a ``CredentialsError``
naming the URL and what to set, within seconds, and nothing is cached, so setting them and
trying again works.

A storage asked for with its own bytes-in-flight budget shares the cached client but is a
storage of its own, never cached: other users of the same URL keep the process default budget.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

from stepsafe.errors import CredentialsError, StepsafeError
from stepsafe.storage.base import Storage
from stepsafe.storage.budget import ByteBudget
from stepsafe.storage.local import LocalStorage
from stepsafe.storage.remote import RemoteStorage

_cache: dict[tuple, RemoteStorage] = {}  # keyed by pid too: a forked child makes its own
_lock = threading.Lock()


def _new_lock_in_child() -> None:  # a parent's thread may have held it at the fork
    global _lock
    _lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_lock_in_child)


def _s3() -> tuple[tuple, Callable[[], RemoteStorage]]:
    from stepsafe.storage import s3

    return s3.config_key(), lambda: s3.S3Storage(s3.s3_filesystem())


def _gcs() -> tuple[tuple, Callable[[], RemoteStorage]]:
    from stepsafe.storage import gcs

    def make() -> RemoteStorage:
        fs = gcs.gcs_filesystem()
        return gcs.GCSStorage(fs, endpoint=gcs.gcs_endpoint())

    return gcs.config_key(), make


def _memory() -> tuple[tuple, Callable[[], RemoteStorage]]:
    from stepsafe.storage.memory import MemoryStorage, memory_filesystem

    return (), lambda: MemoryStorage(memory_filesystem())


Backend = Callable[[], tuple[tuple, Callable[[], RemoteStorage]]]  # -> (configuration, maker)
# scheme -> (its backend, the pip extra, the modules that extra brings)
_BACKENDS: dict[str, tuple[Backend, str, tuple[str, ...]]] = {
    "s3": (_s3, "s3", ("fsspec", "s3fs")),
    "gs": (_gcs, "gcs", ("fsspec", "gcsfs")),
    "gcs": (_gcs, "gcs", ("fsspec", "gcsfs")),
    "memory": (_memory, "s3", ("fsspec",)),
}


def remote_storage(scheme: str) -> RemoteStorage:
    """The (cached) storage for URLs of ``scheme``; a StepsafeError naming the extra to install
    when its client library is missing."""
    if scheme not in _BACKENDS:
        raise StepsafeError(
            f"{scheme}:// paths are not supported: use a local path, gs://, s3:// or memory://"
        )
    backend, extra, modules = _BACKENDS[scheme]
    config, make = backend()
    key = (scheme, os.getpid(), *config)
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


def is_bucket(path: str) -> bool:
    """Whether ``path`` is a bucket URL (``s3://``, ``gs://``, ``memory://``), not a local
    path (``file://`` or none): code that hands paths to other libraries (which read local
    files only) asks this, never which storage class it got."""
    return "://" in path and not path.startswith("file://")


def storage_for(path: str, concurrent_bytes: int | None = None) -> tuple[Storage, str]:
    """The storage that holds ``path`` and the path in that storage's syntax.

    Args:
        path: a local path, ``file://...``, or a bucket URL (``s3://``, ``gs://``,
            ``memory://``).
        concurrent_bytes: for a bucket, a bytes-in-flight budget of this size for the
            returned storage alone (budget.py); None shares the process default. Local
            storage needs none and ignores it.

    Raises:
        CredentialsError: ``path`` is a bucket URL and its client found no credentials.
        ConfigError: ``concurrent_bytes`` is below 1.
        StepsafeError: an unknown scheme, or its client library is not installed.
    """
    budget = ByteBudget(concurrent_bytes) if concurrent_bytes is not None else None
    if is_bucket(path):
        scheme = path.split("://", 1)[0].lower()
        try:
            storage = remote_storage(scheme)
        except CredentialsError as e:
            raise CredentialsError(f"cannot access {path}: {e}") from None
        return (storage if budget is None else storage.with_budget(budget)), path
    local = path[len("file://") :] if path.startswith("file://") else path
    return LocalStorage(), local
