"""How many bytes may be in flight to and from buckets at once, per process.

Transfers to a bucket hold copies: each upload part is gathered into its own buffer, each
ranged read arrives as a fresh ``bytes`` before it is copied into the destination array. Many
in parallel is what makes buckets fast, and what could make a restore of a big state double
its memory. One budget per process (MaxText's ``checkpoint_storage_concurrent_gb``, 96 GB by
default, as in Orbax) bounds them all: a transfer waits until its bytes fit. One transfer
larger than the whole budget still runs, alone, so a small budget slows transfers down but
never deadlocks them. Local files need no budget: they stream straight between the caller's
arrays and the page cache.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

DEFAULT_CONCURRENT_BYTES = 96 * 10**9


class ByteBudget:
    def __init__(self, limit: int) -> None:
        self._cond = threading.Condition()
        self.limit = limit
        self.in_flight = 0
        self.peak = 0  # the most bytes ever in flight at once (tests and benchmarks read it)

    def set_limit(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"the bytes-in-flight budget must be positive, got {limit}")
        with self._cond:
            self.limit = limit
            self._cond.notify_all()

    def reset_peak(self) -> None:
        with self._cond:
            self.peak = self.in_flight

    def acquire(self, n: int) -> None:
        with self._cond:
            while self.in_flight and self.in_flight + n > self.limit:
                self._cond.wait()
            self.in_flight += n
            self.peak = max(self.peak, self.in_flight)

    def release(self, n: int) -> None:
        with self._cond:
            self.in_flight -= n
            self._cond.notify_all()

    @contextmanager
    def hold(self, n: int) -> Iterator[None]:
        self.acquire(n)
        try:
            yield
        finally:
            self.release(n)


IN_FLIGHT = ByteBudget(DEFAULT_CONCURRENT_BYTES)


def _reset_in_child() -> None:
    """A forked child has none of its parent's transfers, which would never release their
    bytes there (and the condition's lock may have been held at the fork)."""
    IN_FLIGHT.__init__(IN_FLIGHT.limit)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_in_child)


def set_concurrent_bytes(limit: int) -> None:
    """Bound the bytes this process keeps in flight to and from buckets (all transfers)."""
    IN_FLIGHT.set_limit(limit)
