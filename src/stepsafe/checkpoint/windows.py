"""Restore planned leaves a window at a time, in the order their bytes lie in the data files."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from stepsafe import knobs
from stepsafe.format import CheckpointReader
from stepsafe.format.regions import ArrayRead

# knobs.WINDOW_BYTES: host bytes of device targets read as one batch (host targets are the
# result: no bound). The bound trades memory for batching. Measured, m95 (1.15 GB) saved
# unsharded, restored warm onto 4 sharded CPU devices, peak RSS of a process that also holds the
# saved tree: 0.6-0.7 s and 3.2 GB at 256 MiB, 3.8 GB at 512 MiB, 4.6 GB unbounded (per-leaf
# reads before: 1.4 s, 2.9 GB).


@dataclass
class LeafPlan:
    """One leaf of a restore, checked against the checkpoint: the array read it needs (planned
    only when its window comes, so that nothing is allocated early; None for a value) and
    what makes the leaf once it is read."""

    plan: Callable[[], ArrayRead | None]
    finish: Callable[[ArrayRead | None], Any]
    transient: int = 0  # host bytes held only until the leaf is made (device targets)


def restore_in_windows(
    reader: CheckpointReader, keys: list[str], plans: list[LeafPlan], verify: bool
) -> list:
    """Restore leaves a window at a time, in the order their bytes lie in the data files: a
    window's reads go to the storage as one batch (neighbours merge into large requests on
    buckets). Host copies of device arrays count against ``knobs.WINDOW_BYTES``, so that a restore
    onto devices never holds much more than that on the host."""
    arrays = reader.manifest.arrays

    def position(i: int) -> tuple[str, int]:
        entry = arrays.get(keys[i])
        if entry is None or entry.grid is not None:  # a grid's chunks are in part files
            return ("", 0)
        first = next((c for s in entry.shards for c in s.chunks), None)
        return (first.file, first.offset) if first else ("", 0)

    out: list[Any] = [None] * len(keys)
    window: list[int] = []
    size = 0
    limit = knobs.WINDOW_BYTES  # once: a knob read costs microseconds, and this loops per leaf
    for i in [*sorted(range(len(keys)), key=position), None]:
        nbytes = plans[i].transient if i is not None else 0
        if window and (i is None or size + nbytes > limit):
            _read_window(reader, {j: plans[j] for j in window}, out, verify)
            window, size = [], 0
        if i is not None:
            window.append(i)
            size += nbytes
    return out


def _read_window(
    reader: CheckpointReader, plans: dict[int, LeafPlan], out: list[Any], verify: bool
) -> None:
    """Read the leaves of one window as one batch; each leaf is made as soon as it is read, on
    that I/O thread, and its host buffers are freed then (device targets), so that host
    memory holds only the leaves still in flight."""
    reads = {j: p.plan() for j, p in plans.items()}
    leaf_of = {id(r): j for j, r in reads.items() if r is not None}

    def ready(read: ArrayRead) -> None:
        j = leaf_of[id(read)]
        out[j] = plans[j].finish(read)
        read.outs.clear()  # the leaf holds what it needs of them

    for j in [j for j, r in reads.items() if r is None]:  # values: nothing to read
        out[j] = plans[j].finish(None)
    batch = [r for r in reads.values() if r is not None]
    del reads
    reader.read(batch, verify, ready)
