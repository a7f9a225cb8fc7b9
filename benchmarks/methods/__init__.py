"""Every method the benchmark runs, by name; each library's module is imported only by its case.

``kind`` tells the orchestrator which cases to run without importing any library:
``sync`` (save, then restores), ``async`` (save only: blocked and done times), ``memcpy``
(copies in memory, the ceiling for a warm restore). ``storages`` are where the method runs
(``benchmarks.storages``); the default run takes every method of the storages asked for.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

DISK = ("disk",)
BUCKETS = ("s3", "gcs")


@dataclass(frozen=True)
class Entry:
    module: str
    cls: str
    kind: str
    label: str
    storages: tuple[str, ...] = DISK


REGISTRY: dict[str, Entry] = {
    "stepsafe": Entry("stepsafe", "Stepsafe", "sync", "stepsafe", DISK + BUCKETS),
    "stepsafe-async": Entry(
        "stepsafe", "StepsafeManager", "async", "stepsafe async (CheckpointManager), JAX arrays"
    ),
    "stepsafe-async-numpy": Entry(
        "stepsafe",
        "StepsafeManagerNumpy",
        "async",
        "stepsafe async (CheckpointManager), numpy leaves: copied into fresh buffers",
    ),
    "stepsafe-thread": Entry(
        "stepsafe", "StepsafeThread", "async", "stepsafe async (thread: snapshot+write), JAX arrays"
    ),
    "stepsafe-staged": Entry(
        "stepsafe",
        "StepsafeThreadStaged",
        "async",
        "stepsafe async (thread), numpy leaves: staging buffers of an earlier save reused",
    ),
    "raw": Entry("raw", "Raw", "sync", "raw O_DIRECT write+fsync / read (O_DIRECT when cold)"),
    "one-object": Entry(
        "one_object", "OneObject", "sync", "one object, same client (best variant)", BUCKETS
    ),
    "safetensors": Entry("safetensors", "Safetensors", "sync", "safetensors"),
    "torch": Entry("torch_save", "TorchSave", "sync", "torch.save / torch.load"),
    "dcp": Entry("torch_dcp", "Dcp", "sync", "torch DCP"),
    "dcp-async": Entry("torch_dcp", "DcpAsync", "async", "torch DCP async_save"),
    "orbax": Entry("orbax", "Orbax", "sync", "Orbax (sync Checkpointer)", DISK + BUCKETS),
    "orbax-async": Entry("orbax", "OrbaxAsync", "async", "Orbax StandardCheckpointer (async)"),
    "disk": Entry("limits", "Disk", "sync", "limit: dd oflag=direct write+fdatasync / read"),
    "memcpy": Entry("limits", "Memcpy", "memcpy", "limit: memcpy"),
}

ALL = tuple(REGISTRY)


def runs_on(storage: str) -> tuple[str, ...]:
    """The methods that run on ``storage``, in the registry's order."""
    return tuple(name for name, e in REGISTRY.items() if storage in e.storages)


def load(name: str, storage: str = "disk", variant: str | None = None) -> Any:
    """An instance of method ``name`` for ``storage``; imports its library (do this before any
    clock starts)."""
    entry = REGISTRY[name]
    if storage not in entry.storages:
        raise ValueError(f"method {name!r} does not run on {storage!r} ({entry.storages})")
    module = importlib.import_module(f"benchmarks.methods.{entry.module}")
    return getattr(module, entry.cls)(storage, variant)
