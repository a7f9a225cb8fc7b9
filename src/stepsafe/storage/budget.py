"""How many bytes may be in flight to and from buckets at once.

Transfers to a bucket hold copies: each upload part is gathered into its own buffer, each
ranged read arrives as a fresh ``bytes`` before it is copied into the destination array. Many
in parallel is what makes buckets fast, and what could make a restore of a big state double
its memory. A budget (MaxText's ``checkpoint_storage_concurrent_gb``) bounds them: a transfer
waits until its bytes fit. One transfer larger than the whole budget still runs, alone, so a
small budget slows transfers down but never deadlocks them. Local files need no budget: they
stream straight between the caller's arrays and the page cache.

A budget belongs to a storage, which is handed it when it is made
(``storage_for(url, concurrent_bytes=...)``, as a ``CheckpointManager`` does with its
``concurrent_bytes`` option): making one never changes the budget of any other storage.
Storages made without one share the process default, ``IN_FLIGHT``, whose size is
``knobs.CONCURRENT_BYTES`` at the moment of each transfer.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

from stepsafe import knobs
from stepsafe.errors import ConfigError


class ByteBudget:
    """At most ``limit`` units in flight at once (bytes here; s3.py counts parts with one).

    Args:
        limit: the size; None follows the knob ``knob`` (read at each acquire).
        knob: the ``stepsafe.knobs`` attribute a budget without a fixed limit follows.
        option: the name a user gave ``limit`` under, for the error message.

    Raises:
        ConfigError: ``limit`` is below 1.
    """

    def __init__(
        self,
        limit: int | None = None,
        *,
        knob: str = "CONCURRENT_BYTES",
        option: str = "concurrent_bytes",
    ) -> None:
        if limit is not None and limit < 1:
            raise ConfigError(
                f"{option} must be at least 1 (bytes in flight to and from buckets at once), "
                f"got {limit}"
            )
        self._fixed = limit
        self._knob = knob
        self._reset()
        _every.add(self)

    def _reset(self) -> None:
        self._cond = threading.Condition()
        self.in_flight = 0
        self.peak = 0  # the most ever in flight at once (tests and benchmarks read it)

    @property
    def limit(self) -> int:
        return self._fixed if self._fixed is not None else int(getattr(knobs, self._knob))

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


_every: weakref.WeakSet[ByteBudget] = weakref.WeakSet()

IN_FLIGHT = ByteBudget()  # the process default: storages made without a budget share it


def _reset_in_child() -> None:
    """A forked child has none of its parent's transfers, which would never release their
    units there (and a condition's lock may have been held at the fork)."""
    for budget in list(_every):
        budget._reset()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_in_child)
