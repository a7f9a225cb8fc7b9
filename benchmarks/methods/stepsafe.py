"""stepsafe itself: ``save``/``restore``, and the snapshot+write split run in a thread.

``stepsafe.save`` has no async form; ``StepsafeThread`` measures one built from
``snapshot(tree, copy=True)`` (the caller waits for this) and ``write`` in a background thread.
``StepsafeThreadStaged`` is the steady state of a run that saves repeatedly: the snapshot copies
into the staging buffers an earlier save left mapped (that earlier save is outside the clock).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

import stepsafe
from benchmarks import states
from benchmarks.methods.base import AsyncMethod, Method
from stepsafe.arrays import StagingBuffers
from stepsafe.checkpoint.save import snapshot, write


@dataclass(frozen=True)
class Abstract:
    """A target leaf that says shape and dtype without holding memory (like ShapeDtypeStruct)."""

    shape: tuple[int, ...]
    dtype: np.dtype


def target(state: str) -> dict[str, Any]:
    tree = states.nest([(s.key, Abstract(s.shape, states.DTYPE)) for s in states.specs(state)])
    tree["step"] = 0
    return tree


class Stepsafe(Method):
    def save(self, path: str, tree: Any) -> None:
        stepsafe.save(path, tree)

    def restore(self, path: str, state: str) -> Any:
        return stepsafe.restore(path, target(state))


class StepsafeThread(AsyncMethod):
    def start(self, path: str, tree: Any) -> Callable[[], None]:
        snap = snapshot(tree, copy=True)
        thread = threading.Thread(target=write, args=(path, snap))
        thread.start()
        return thread.join


class StepsafeThreadStaged(AsyncMethod):
    def make(self, state: str) -> Any:
        tree = super().make(state)
        self.staging = StagingBuffers()
        snapshot(tree, copy=True, staging=self.staging)  # "the previous save", untimed
        return tree

    def start(self, path: str, tree: Any) -> Callable[[], None]:
        snap = snapshot(tree, copy=True, staging=self.staging)
        thread = threading.Thread(target=write, args=(path, snap))
        thread.start()
        return thread.join
