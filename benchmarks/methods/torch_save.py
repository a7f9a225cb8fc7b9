"""torch.save / torch.load of a nested dict of CPU tensors; torch.save is fsynced by us.

Tensors share memory with the numpy values (``torch.from_numpy``), so building costs no copy.
"""

from __future__ import annotations

from typing import Any

import torch

from benchmarks import states
from benchmarks.fsutil import fsync_tree
from benchmarks.methods.base import Method


class TorchSave(Method):
    def make(self, state: str) -> Any:
        return states.build(state, torch.from_numpy)

    def save(self, path: str, tree: Any) -> None:
        torch.save(tree, path)
        fsync_tree(path)

    def restore(self, path: str, state: str) -> Any:
        return torch.load(path, weights_only=True)
