"""One long-lived pool of I/O threads for the whole process.

Starting a thread costs about a millisecond on a busy 2-core machine, which is as much as a
whole tiny checkpoint may take; so threads are started once and reused. Tasks given to this
pool must never wait on other tasks of the pool (no nesting), or it could deadlock.

A forked child inherits the pool but not its threads: tasks it submitted would wait forever for
workers that exist only in the parent (and ``_lock`` may have been held by a parent's thread at
the fork). So the child starts from no pool and a fresh lock, and makes its own pool on first use.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from stepsafe import knobs

_pool: ThreadPoolExecutor | None = None
_lock = threading.Lock()


def io_pool() -> ThreadPoolExecutor:
    global _pool
    with _lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(
                max_workers=knobs.IO_THREADS, thread_name_prefix="stepsafe-io"
            )
        return _pool


def _forget_in_child() -> None:
    global _pool, _lock
    _pool, _lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):  # not on Windows, which has no fork
    os.register_at_fork(after_in_child=_forget_in_child)


def run_all(fn: Callable[[Any], Any], items: Iterable[Any]) -> list[Any]:
    """``[fn(x) for x in items]`` on the I/O threads (inline for a single item); the first
    failure is raised after every task has finished, so none is left running."""
    items = list(items)
    if len(items) <= 1:
        return [fn(x) for x in items]
    futures = [io_pool().submit(fn, x) for x in items]
    errors = [f.exception() for f in futures]
    for e in errors:
        if e is not None:
            raise e
    return [f.result() for f in futures]
