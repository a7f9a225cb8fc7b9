"""Every method the benchmark runs, by name; each library's module is imported only by its case.

``kind`` tells the orchestrator which cases to run without importing any library:
``sync`` (save, then cold and warm restore), ``async`` (save only: blocked and done times),
``memcpy`` (copies in memory, the ceiling for a warm restore).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Entry:
    module: str
    cls: str
    kind: str
    label: str


REGISTRY: dict[str, Entry] = {
    "stepsafe": Entry("stepsafe", "Stepsafe", "sync", "stepsafe"),
    "stepsafe-thread": Entry(
        "stepsafe", "StepsafeThread", "async", "stepsafe async (thread: snapshot+write)"
    ),
    "stepsafe-staged": Entry(
        "stepsafe",
        "StepsafeThreadStaged",
        "async",
        "stepsafe async (thread, staging buffers of an earlier save reused)",
    ),
    "raw": Entry("raw", "Raw", "sync", "raw write+fsync / readinto"),
    "safetensors": Entry("safetensors", "Safetensors", "sync", "safetensors"),
    "torch": Entry("torch_save", "TorchSave", "sync", "torch.save / torch.load"),
    "dcp": Entry("torch_dcp", "Dcp", "sync", "torch DCP"),
    "dcp-async": Entry("torch_dcp", "DcpAsync", "async", "torch DCP async_save"),
    "orbax": Entry("orbax", "Orbax", "sync", "Orbax (sync Checkpointer)"),
    "orbax-async": Entry("orbax", "OrbaxAsync", "async", "Orbax StandardCheckpointer (async)"),
    "disk": Entry("limits", "Disk", "sync", "limit: dd write+fdatasync / read"),
    "memcpy": Entry("limits", "Memcpy", "memcpy", "limit: memcpy"),
}

ALL = tuple(REGISTRY)


def load(name: str) -> Any:
    """An instance of method ``name``; imports its library (do this before any clock starts)."""
    entry = REGISTRY[name]
    module = importlib.import_module(f"benchmarks.methods.{entry.module}")
    return getattr(module, entry.cls)()
