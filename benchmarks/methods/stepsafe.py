"""stepsafe itself: ``save``/``restore``; async saves through ``CheckpointManager``; and the
manager's two halves (``snapshot`` + ``write``) run in a thread by hand.

``StepsafeManager`` is the public async API: ``CheckpointManager(async_save=True).save``
blocks while the state is captured, the write runs in the background; its state is JAX arrays
on the CPU device, as a training run holds it and as the Orbax arms save it (stepsafe takes
them as views: they are immutable). ``StepsafeThread`` is the same split without the manager
(no lease, no listing of committed steps), the floor of what the manager can block for.
``StepsafeManagerNumpy`` saves the state as numpy arrays, which an async save must copy (the
caller may change them in place): a process's first save, into fresh buffers.
``StepsafeThreadStaged`` is the steady state of numpy leaves in a run that saves repeatedly:
the snapshot copies into the staging buffers an earlier save left mapped (that earlier save is
outside the clock), as the manager's own staging does from its second save on.
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
from stepsafe.manager import CheckpointManager, ManagerOptions


def file_size_bytes(variant: str) -> int:
    """``files-128M`` -> 128 MiB."""
    return int(variant.removeprefix("files-").removesuffix("M")) << 20


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
    """``stepsafe.save`` / ``stepsafe.restore`` at a path or a bucket URL.

    On a bucket, ``prepare`` makes stepsafe's client before the clock: stepsafe makes one client
    per process on first use and keeps it (storage.dispatch), as a training run that saves
    repeatedly would; without this the first save of each process would also time importing
    s3fs/aiobotocore (or gcsfs) and building the client. Variant ``files-<N>M`` saves with
    ``data_file_size_bytes=N MiB`` (``benchmarks.plan``); none, stepsafe's defaults.
    """

    def save(self, path: str, tree: Any) -> None:
        if self.variant is None:
            stepsafe.save(path, tree)
        else:
            stepsafe.save(path, tree, data_file_size_bytes=file_size_bytes(self.variant))

    def restore(self, path: str, state: str) -> Any:
        return stepsafe.restore(path, target(state))

    def prepare(self, location: str, op: str) -> None:
        if self.storage != "disk":
            from benchmarks.methods.buckets import warm_up
            from stepsafe.storage.dispatch import remote_storage

            warm_up(remote_storage(location.split("://", 1)[0]).fs, location)


def jax_state(state: str) -> Any:
    """``state`` as JAX arrays on the CPU device (made outside the clock, like Orbax's)."""
    import jax

    return states.build(state, lambda a: jax.block_until_ready(jax.device_put(a)))


class StepsafeManagerNumpy(AsyncMethod):
    """``CheckpointManager.save`` with ``async_save``; the manager (and its lease on the run
    directory) is made before the clock, as a training run makes it once."""

    def prepare(self, location: str, op: str) -> None:
        self.manager = CheckpointManager(location, ManagerOptions(async_save=True))

    def start(self, path: str, tree: Any) -> Callable[[], None]:
        self.manager.save(states.STEP, tree, force=True)
        return self.manager.wait_until_finished

    def close(self) -> None:
        self.manager.close()


class StepsafeManager(StepsafeManagerNumpy):
    def make(self, state: str) -> Any:
        return jax_state(state)


class StepsafeThread(AsyncMethod):
    def make(self, state: str) -> Any:
        return jax_state(state)

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
