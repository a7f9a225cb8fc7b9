"""Which saved shards fill the wanted boxes of an array, and where their bytes go.

A restore wants boxes (a whole array, or the shards this process's devices hold) that need not
match the boxes it was saved in. Each saved shard that overlaps is read once: straight into an
output when it lands there as one contiguous block (always for an array restored as it was
saved, and for shards split along the first axis), else into a buffer of its own, shared by
every box that needs part of it, and copied from. Planning first and reading later lets the
reads of many arrays go out as one batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from stepsafe.format.manifest import ArrayEntry, Shard

Box = tuple[tuple[int, int], ...]


@dataclass
class ArrayRead:
    """Boxes of array ``key`` (``outs``), filled by reading each of ``reads`` (a saved shard
    into a C-contiguous buffer of its shape) and then making ``copies`` (source, its slices,
    output, the output's slices)."""

    key: str
    outs: dict[Box, np.ndarray]
    reads: list[tuple[Shard, np.ndarray]] = field(default_factory=list)
    copies: list[tuple[np.ndarray, tuple[slice, ...], np.ndarray, tuple[slice, ...]]] = field(
        default_factory=list
    )

    def finish(self) -> None:
        """Make the copies, then drop the staging buffers."""
        for src, src_sl, out, dst_sl in self.copies:
            out[dst_sl] = src[src_sl]
        self.copies.clear()
        self.reads.clear()


def plan_array_read(key: str, entry: ArrayEntry, boxes: list[Box]) -> ArrayRead:
    outs = {box: np.empty(tuple(b - a for a, b in box), entry.dtype) for box in boxes}
    plan = ArrayRead(key, outs)
    if len(boxes) == 1 and len(entry.shards) == 1 and entry.shards[0].index == boxes[0]:
        plan.reads.append((entry.shards[0], outs[boxes[0]]))  # the common case, quickly
        return plan
    staged: dict[int, np.ndarray] = {}
    for box, out in outs.items():
        for n, shard in enumerate(entry.shards):
            inter = [(max(a, c), min(b, d)) for (a, b), (c, d) in zip(shard.index, box)]
            if any(lo >= hi for lo, hi in inter):
                continue
            dst_sl = tuple(slice(lo - c, hi - c) for (lo, hi), (c, _) in zip(inter, box))
            if tuple(inter) == shard.index:
                dest = out[(*dst_sl, ...)]  # a view, also of a 0-d array
                if dest.flags.c_contiguous:
                    plan.reads.append((shard, dest))
                    continue
            if n not in staged:
                staged[n] = np.empty(shard.shape, entry.dtype)
                plan.reads.append((shard, staged[n]))
            src_sl = tuple(slice(lo - a, hi - a) for (lo, hi), (a, _) in zip(inter, shard.index))
            plan.copies.append((staged[n], src_sl, out, dst_sl))
    return plan
