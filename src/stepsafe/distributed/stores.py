"""The key-value stores a :class:`~stepsafe.distributed.coordinator.Coordinator` runs on.

Two implementations of the same few operations: the jax.distributed coordinator for a real job,
and an in-memory dictionary for a single process, so that the exchanges are written once and
callers need no branches. Both raise :class:`StoreFailure` with the store's own one-line reason;
the coordinator turns it into a ``CoordinationError`` that names the exchange.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Protocol


class StoreFailure(Exception):
    """A store operation failed (timeout, missing key, lost peer); carries a one-line reason."""


class Store(Protocol):
    """The operations the exchanges need; timeouts are in milliseconds as the coordinator uses."""

    def set(self, key: str, value: bytes) -> None: ...
    def get(self, key: str, timeout_ms: int) -> bytes: ...
    def try_get(self, key: str) -> bytes | None: ...
    def dir_get(self, prefix: str) -> list[tuple[str, bytes]]: ...
    def delete(self, key: str) -> None: ...
    def barrier(self, barrier_id: str, timeout_ms: int) -> None: ...


def _first_line(error: BaseException) -> str:
    line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return line if len(line) <= 240 else line[:237] + "..."


class JaxStore:
    """The jax.distributed coordinator's key-value store and barriers (client: ``client.py``)."""

    def __init__(self, client: Any) -> None:
        from jax.errors import JaxRuntimeError  # only when JAX is in use

        self._client, self._error = client, JaxRuntimeError

    def _call(self, method: str, *args: Any) -> Any:
        try:
            return getattr(self._client, method)(*args)
        except self._error as e:
            raise StoreFailure(_first_line(e)) from e

    def set(self, key: str, value: bytes) -> None:
        self._call("key_value_set_bytes", key, value)

    def get(self, key: str, timeout_ms: int) -> bytes:
        return self._call("blocking_key_value_get_bytes", key, timeout_ms)

    def try_get(self, key: str) -> bytes | None:
        try:
            return self._call("key_value_try_get_bytes", key)
        except StoreFailure:  # NOT_FOUND, or the coordinator is gone: either way, not there
            return None

    def dir_get(self, prefix: str) -> list[tuple[str, bytes]]:
        return list(self._call("key_value_dir_get_bytes", prefix))

    def delete(self, key: str) -> None:
        self._call("key_value_delete", key)

    def barrier(self, barrier_id: str, timeout_ms: int) -> None:
        self._call("wait_at_barrier", barrier_id, timeout_ms)


class LocalStore:
    """One process, no coordinator: a dictionary; a barrier of one returns at once.

    ``get`` still waits (up to its timeout) for another thread of this process to set the key,
    as the real store does, so that code written for many processes behaves the same here.
    """

    def __init__(self) -> None:
        self._values: dict[str, bytes] = {}
        self._changed = threading.Condition()

    def set(self, key: str, value: bytes) -> None:
        with self._changed:
            if key in self._values:
                raise StoreFailure(f"ALREADY_EXISTS: key {key} already exists.")
            self._values[key] = bytes(value)
            self._changed.notify_all()

    def get(self, key: str, timeout_ms: int) -> bytes:
        deadline = time.monotonic() + timeout_ms / 1000
        with self._changed:
            while key not in self._values:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise StoreFailure(f"DEADLINE_EXCEEDED: timed out waiting for key {key}")
                self._changed.wait(left)
            return self._values[key]

    def try_get(self, key: str) -> bytes | None:
        with self._changed:
            return self._values.get(key)

    def dir_get(self, prefix: str) -> list[tuple[str, bytes]]:
        with self._changed:
            return sorted((k, v) for k, v in self._values.items() if k.startswith(prefix))

    def delete(self, key: str) -> None:
        with self._changed:
            for k in [k for k in self._values if k == key or k.startswith(key.rstrip("/") + "/")]:
                del self._values[k]

    def barrier(self, barrier_id: str, timeout_ms: int) -> None:
        return None
