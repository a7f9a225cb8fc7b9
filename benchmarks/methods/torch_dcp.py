"""torch.distributed.checkpoint in one process (no process group): save, async_save, load.

DCP fsyncs its files (``sync_files=True``); ``fsync_tree`` adds the directories. Load is
in place, into tensors the caller allocated, as DCP users do.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed.checkpoint as dcp

from benchmarks import states
from benchmarks.fsutil import fsync_tree
from benchmarks.methods.base import AsyncMethod, Method

warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")


class Dcp(Method):
    def make(self, state: str) -> Any:
        return states.build(state, torch.from_numpy)

    def save(self, path: str, tree: Any) -> None:
        dcp.save(tree, checkpoint_id=path)
        fsync_tree(path)

    def restore(self, path: str, state: str) -> Any:
        tree = states.nest([(s.key, torch.empty(s.shape)) for s in states.specs(state)])
        tree["step"] = 0
        dcp.load(tree, checkpoint_id=path)
        return tree


class DcpAsync(AsyncMethod, Dcp):
    def start(self, path: str, tree: Any) -> Callable[[], None]:
        future = dcp.async_save(tree, checkpoint_id=path)

        def wait() -> None:
            future.result()
            fsync_tree(path)

        return wait
