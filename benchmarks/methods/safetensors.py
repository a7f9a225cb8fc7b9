"""safetensors (numpy flavour): ``save_file`` + fsync, ``load_file``.

safetensors does not fsync, so the file and its directory are fsynced inside the timed region.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from benchmarks import states
from benchmarks.fsutil import fsync_tree
from benchmarks.methods.base import Method


class Safetensors(Method):
    def make(self, state: str) -> Any:
        flat = {states.flat_name(s.key): a for s, a in states.random_leaves(state)}
        flat["step"] = np.asarray(states.STEP, np.int64)
        return flat

    def save(self, path: str, tree: Any) -> None:
        save_file(tree, path)
        fsync_tree(path)

    def restore(self, path: str, state: str) -> Any:
        return load_file(path)

    def leaf(self, tree: Any, key: states.Key) -> np.ndarray:
        return np.asarray(tree[states.flat_name(key)])
