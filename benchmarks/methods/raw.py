"""The baseline: every array's bytes into one file (write + fsync), read back with readinto.

No format, no checksums, no metadata: what any checkpointing library must come close to.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from benchmarks import states
from benchmarks.fsutil import fsync_path
from benchmarks.methods.base import Method


def _bytes(a: np.ndarray) -> memoryview:
    return memoryview(a.reshape(-1).view(np.uint8))


class Raw(Method):
    state = ""  # set by ``make``: the save writes leaves in the specs' order

    def save(self, path: str, tree: Any) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            for spec in states.specs(self.state):
                view = _bytes(self.leaf(tree, spec.key))
                while view:
                    view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_path(os.path.dirname(path))

    def make(self, state: str) -> Any:
        self.state = state
        return super().make(state)

    def restore(self, path: str, state: str) -> Any:
        items = []
        with open(path, "rb", buffering=0) as f:
            for spec in states.specs(state):
                out = np.empty(spec.shape, states.DTYPE)
                view = _bytes(out)
                while view:
                    n = f.readinto(view)
                    if not n:
                        raise EOFError(f"{path} is shorter than the state")
                    view = view[n:]
                items.append((spec.key, out))
        return states.nest(items)
