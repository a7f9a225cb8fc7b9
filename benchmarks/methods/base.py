"""What a method is: build a state in its library's form, save it durably, restore it.

A method is made for one storage (``disk``, ``s3``, ``gcs``: ``benchmarks.storages``) and, where
it has them, one variant (a way of moving the bytes, ``benchmarks.plan``); ``location`` is a
path on disk or a bucket URL.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from benchmarks import states


class Method:
    """A synchronous save/restore. ``save`` returns only when every byte is durable."""

    def __init__(self, storage: str = "disk", variant: str | None = None) -> None:
        self.storage = storage
        self.variant = variant

    def prepare(self, location: str, op: str) -> None:
        """Untimed set-up before ``op`` (save or restore) at ``location``; most need none."""

    def make(self, state: str) -> Any:
        """The state as this library's users hold it (built outside the timed region)."""
        return states.build(state)

    def save(self, path: str, tree: Any) -> None:
        raise NotImplementedError

    def restore(self, path: str, state: str) -> Any:
        raise NotImplementedError

    def leaf(self, tree: Any, key: states.Key) -> np.ndarray:
        """One array of a saved or restored tree, as numpy, for the round-trip fingerprint."""
        node = tree
        for part in key:
            node = node[part]
        return np.asarray(node)

    def close(self) -> None:
        """Release background resources (thread pools) after the measurement."""


class AsyncMethod(Method):
    """A save that returns early: ``start`` returns a function that waits until it is durable."""

    def start(self, path: str, tree: Any) -> Callable[[], None]:
        raise NotImplementedError

    def save(self, path: str, tree: Any) -> None:
        self.start(path, tree)()
