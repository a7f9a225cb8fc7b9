"""Barriers and small exchanges between the processes of one job, every one with a timeout.

Multi-host saves need all processes to agree (one save id, who wrote what, whether the commit
happened) from the background thread of an async save, where JAX collectives cannot run and must
never hang forever. The jax.distributed coordinator's key-value store fits: blocking calls take a
timeout and release the GIL. Every key lives under ``stepsafe/``; every exchange uses a fresh id
(a failed barrier id is unusable in JAX, so the same name used twice gets ``name#1``, ``name#2``)
and deletes its keys once every process has read them.

A single process gets the same class over an in-memory store: ``barrier`` returns at once,
``broadcast`` returns its own value and ``all_gather`` returns ``[mine]``.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from stepsafe import knobs
from stepsafe.distributed.client import jax_client
from stepsafe.distributed.processes import process_count, process_index
from stepsafe.distributed.stores import JaxStore, LocalStore, Store, StoreFailure
from stepsafe.errors import CoordinationError

#: Seconds an exchange waits for the other processes when the caller gives no timeout.
#: Read at the moment of use, so tests can assign it (Orbax's barrier timeout is also 300 s).

_ROOT = "stepsafe"
T = TypeVar("T")


class Coordinator:
    """Exchanges between the processes of one job; safe to use from any thread.

    Every process must make the same calls with the same names in the same order, as with any
    collective; the timeouts turn a process that never comes into a ``CoordinationError``.
    """

    def __init__(self, store: Store, index: int, count: int) -> None:
        self.store, self.index, self.count = store, index, count
        self._uses: dict[str, int] = {}
        self._lock = threading.Lock()

    # -- single keys -------------------------------------------------------------------------

    def set(self, key: str, value: bytes) -> None:
        """Publish ``value`` under ``key`` for every process (a key is set once).

        Raises:
            CoordinationError: the key already exists or the coordinator is unreachable.
        """
        self._run("set", key, None, lambda: self.store.set(_key(key), bytes(value)))

    def get(self, key: str, timeout_s: float | None = None) -> bytes:
        """The value some process set under ``key``, waiting up to ``timeout_s`` for it.

        Raises:
            CoordinationError: nobody set it in time.
        """
        timeout = _timeout(timeout_s)
        return self._run("get", key, timeout, lambda: self.store.get(_key(key), _ms(timeout)))

    def try_get(self, key: str) -> bytes | None:
        """The value under ``key`` if some process has set it, else None, without waiting:
        one read of the store (about a millisecond), cheap enough to poll."""
        return self.store.try_get(_key(key))

    def delete(self, key: str) -> None:
        """Remove ``key`` (and every key below it, if it names a directory)."""
        self._run("delete", key, None, lambda: self.store.delete(_key(key)))

    # -- exchanges ---------------------------------------------------------------------------

    def barrier(self, name: str, timeout_s: float | None = None) -> None:
        """Return once every process has called ``barrier(name)``.

        Raises:
            CoordinationError: not every process came within ``timeout_s``; names the ones missing.
        """
        self._barrier(self._fresh(name), name, _timeout(timeout_s), time.monotonic())

    def broadcast(self, name: str, value: bytes | None, timeout_s: float | None = None) -> bytes:
        """Process 0's ``value``, on every process (the others' ``value`` is ignored).

        Raises:
            ValueError: process 0 passed None.
            CoordinationError: process 0's value or another process did not come in time.
        """
        if self.index == 0 and value is None:
            raise ValueError(f"broadcast {name!r}: process 0 must give a value")
        exchange, timeout, start = self._fresh(name), _timeout(timeout_s), time.monotonic()
        key = f"{exchange}/value"
        if self.index == 0:
            self._run("broadcast", name, timeout, lambda: self.store.set(key, bytes(value or b"")))
        got = self._run(
            "broadcast", name, timeout, lambda: self.store.get(key, _left(start, timeout)), [0]
        )
        self._finish(exchange, name, timeout, start)
        return got

    def all_gather(self, name: str, mine: bytes, timeout_s: float | None = None) -> list[bytes]:
        """Every process's ``mine``, in process order, on every process.

        Raises:
            CoordinationError: some process's value did not come in time; names the ones missing.
        """
        exchange, timeout, start = self._fresh(name), _timeout(timeout_s), time.monotonic()
        self._run(
            "all_gather",
            name,
            timeout,
            lambda: self.store.set(_part(exchange, self.index), bytes(mine)),
        )
        values = self._collect("all_gather", name, exchange, timeout, start)
        self._finish(exchange, name, timeout, start)
        return values

    def gather(self, name: str, mine: bytes, timeout_s: float | None = None) -> list[bytes] | None:
        """Every process's ``mine``, in process order, on process 0; None on the others, who
        return as soon as theirs is sent (what a commit needs: only process 0 merges, and
        sending every part to every process would cost each of them the whole job's parts).

        Raises:
            CoordinationError: on process 0, some process's value did not come in time; names
                the ones missing.
        """
        exchange, timeout, start = self._fresh(name), _timeout(timeout_s), time.monotonic()
        key = _part(exchange, self.index)
        self._run("gather", name, timeout, lambda: self.store.set(key, bytes(mine)))
        if self.index != 0:
            return None
        try:
            return self._collect("gather", name, exchange, timeout, start)
        finally:
            with contextlib.suppress(StoreFailure):  # a leftover key harms nobody
                self.store.delete(exchange + "/")  # read or given up: nobody reads it again

    # -- helpers -----------------------------------------------------------------------------

    def _fresh(self, name: str) -> str:
        """A key prefix and barrier id used once: ``stepsafe/x/<name>#<n>``."""
        if not name or "#" in name:
            raise ValueError(f"exchange name {name!r} must be non-empty and contain no '#'")
        with self._lock:
            n = self._uses[name] = self._uses.get(name, 0) + 1
        return f"{_ROOT}/x/{name}#{n}"

    def _collect(
        self, what: str, name: str, exchange: str, timeout: float, start: float
    ) -> list[bytes]:
        """Every process's value of ``exchange``, waiting until ``timeout`` since ``start``."""
        values = []
        for p in range(self.count):
            try:
                values.append(self.store.get(_part(exchange, p), _left(start, timeout)))
            except StoreFailure as e:
                missing = [
                    q for q in range(self.count) if self.store.try_get(_part(exchange, q)) is None
                ]
                raise self._error(what, name, timeout, e, missing) from e
        return values

    def _barrier(self, exchange: str, name: str, timeout: float, start: float) -> None:
        arrived = f"{exchange}/arrived"
        self._run("barrier", name, timeout, lambda: self.store.set(_part(arrived, self.index), b""))
        try:
            self.store.barrier(exchange, _left(start, timeout))
        except StoreFailure as e:
            there = {k.rsplit("/", 1)[-1] for k, _ in _safe_dir_get(self.store, arrived + "/")}
            missing = [p for p in range(self.count) if f"p{p}" not in there] or None
            raise self._error("barrier", name, timeout, e, missing) from e
        # Everyone passed, so nobody reads the arrival keys again: each process removes its own.
        self._run("barrier", name, timeout, lambda: self.store.delete(_part(arrived, self.index)))

    def _finish(self, exchange: str, name: str, timeout: float, start: float) -> None:
        """Wait until everyone has read the exchange's values, then process 0 deletes them;
        also when someone never came: a late process must time out, not pair with stale
        values of an exchange the others gave up on."""
        try:
            self._barrier(f"{exchange}/read", name, timeout, start)
        except CoordinationError:
            if self.index == 0:
                with contextlib.suppress(StoreFailure):
                    self.store.delete(exchange + "/")
            raise
        if self.index == 0:
            self._run("cleanup", name, timeout, lambda: self.store.delete(exchange + "/"))

    def _run(
        self,
        what: str,
        name: str,
        timeout: float | None,
        call: Callable[[], T],
        missing: list[int] | None = None,
    ) -> T:
        try:
            return call()
        except StoreFailure as e:
            raise self._error(what, name, timeout, e, missing) from e

    def _error(
        self,
        what: str,
        name: str,
        timeout: float | None,
        cause: StoreFailure,
        missing: list[int] | None,
    ) -> CoordinationError:
        who = f"; process(es) {missing} did not answer" if missing else ""
        within = f" within {timeout:g} s" if timeout is not None else ""
        return CoordinationError(
            f"{what} {name!r} failed on process {self.index} of {self.count}{within}{who} "
            f"(a process may be slow, failed or gone): {cause}"
        )


def coordinator() -> Coordinator:
    """The :class:`Coordinator` of this process: over jax.distributed when it is initialised,
    else over a local in-memory store. The same object is returned while the job is the same, so
    that names reused by successive calls still get fresh ids."""
    global _current
    client = jax_client()
    if _current is None or _current[0] is not client:
        store: Store = LocalStore() if client is None else JaxStore(client)
        _current = (client, Coordinator(store, process_index(), process_count()))
    return _current[1]


_current: tuple[object, Coordinator] | None = None


def _key(key: str) -> str:
    if not key or key.startswith("/"):
        raise ValueError(f"coordination key {key!r} must be non-empty and relative")
    return f"{_ROOT}/kv/{key}"


def _part(prefix: str, process: int) -> str:
    return f"{prefix}/p{process}"


def _timeout(timeout_s: float | None) -> float:
    return knobs.COORDINATION_TIMEOUT_S if timeout_s is None else float(timeout_s)


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


def _left(start: float, timeout: float) -> int:
    """Milliseconds left of ``timeout`` since ``start`` (at least 1: 0 may mean "forever")."""
    return _ms(timeout - (time.monotonic() - start))


def _safe_dir_get(store: Store, prefix: str) -> list[tuple[str, bytes]]:
    try:
        return store.dir_get(prefix)
    except StoreFailure:
        return []
