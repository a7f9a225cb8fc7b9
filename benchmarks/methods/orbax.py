"""Orbax with its defaults: the synchronous Checkpointer and the async StandardCheckpointer.

The state is jax arrays on the CPU device, converted leaf by leaf outside the timed region.
On disk, ``fsync_tree`` after the save makes sure every file and directory is durable (an object
store acknowledges a PUT once stored). At a bucket URL the Checkpointer writes OCDBT through
tensorstore; its commit there:  on ``gs://`` Orbax itself picks ``CommitFileTemporaryPath``
(files written in place, a ``commit_success.txt`` last); on ``s3://`` its default, a rename of
the temporary directory, fails in epath/s3fs (``FileNotFoundError`` copying the directory's
key), so the same commit-file scheme it uses on GCS is asked for explicitly (and
``orbax_s3.allow_s3`` lets it write to ``s3://`` at all).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from benchmarks import states
from benchmarks.fsutil import fsync_tree
from benchmarks.methods.base import AsyncMethod, Method

logging.getLogger("absl").setLevel(logging.WARNING)


def abstract(state: str) -> dict[str, Any]:
    sharding = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    tree = states.nest(
        [
            (s.key, jax.ShapeDtypeStruct(s.shape, states.DTYPE, sharding=sharding))
            for s in states.specs(state)
        ]
    )
    tree["step"] = 0
    return tree


class Orbax(Method):
    def __init__(self, storage: str = "disk", variant: str | None = None) -> None:
        super().__init__(storage, variant)
        kwargs: dict[str, Any] = {}
        if storage == "s3":
            from orbax.checkpoint._src.path import atomicity

            from benchmarks.methods.orbax_s3 import allow_s3

            allow_s3()
            kwargs["temporary_path_class"] = atomicity.CommitFileTemporaryPath
        self.ckptr = ocp.Checkpointer(ocp.StandardCheckpointHandler(), **kwargs)

    def where(self, path: str) -> str:
        """Orbax wants absolute local paths; URLs as they are."""
        return os.path.abspath(path) if self.storage == "disk" else path

    def make(self, state: str) -> Any:
        return states.build(state, lambda a: jax.block_until_ready(jax.device_put(a)))

    def save(self, path: str, tree: Any) -> None:
        self.ckptr.save(self.where(path), args=ocp.args.StandardSave(tree))
        if self.storage == "disk":
            fsync_tree(path)

    def restore(self, path: str, state: str) -> Any:
        tree = self.ckptr.restore(self.where(path), args=ocp.args.StandardRestore(abstract(state)))
        return jax.block_until_ready(tree)

    def leaf(self, tree: Any, key: states.Key) -> np.ndarray:
        return np.asarray(super().leaf(tree, key))

    def close(self) -> None:
        self.ckptr.close()


class OrbaxAsync(AsyncMethod, Orbax):
    def __init__(self, storage: str = "disk", variant: str | None = None) -> None:
        Method.__init__(self, storage, variant)
        self.ckptr = ocp.StandardCheckpointer()

    def start(self, path: str, tree: Any) -> Callable[[], None]:
        self.ckptr.save(os.path.abspath(path), tree)

        def wait() -> None:
            self.ckptr.wait_until_finished()
            fsync_tree(path)

        return wait
