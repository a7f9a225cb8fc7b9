"""Which saved shards fill a wanted box of an array, and where their bytes go.

A restore wants boxes (a whole array, or one device's shard of it) that need not match the
boxes it was saved in. Each saved shard that overlaps is read once, straight into the output
when it lands there as one contiguous block (always for a whole array saved whole, and for
shards split along the first axis), else into a buffer of its own that is copied in after.
Planning first and reading later lets the reads of many arrays go out as one batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from stepsafe.format.manifest import ArrayEntry, Shard

Box = tuple[tuple[int, int], ...]


@dataclass
class Region:
    """Box ``box`` of array ``key``, filled by reading each of ``reads`` (a saved shard into a
    C-contiguous buffer of its shape) and then making ``copies`` (source, its slices, the
    output's slices)."""

    key: str
    box: Box
    out: np.ndarray
    reads: list[tuple[Shard, np.ndarray]] = field(default_factory=list)
    copies: list[tuple[np.ndarray, tuple[slice, ...], tuple[slice, ...]]] = field(
        default_factory=list
    )

    def finish(self) -> np.ndarray:
        for src, src_sl, dst_sl in self.copies:
            self.out[dst_sl] = src[src_sl]
        self.copies.clear()
        return self.out


def plan_region(key: str, entry: ArrayEntry, box: Box) -> Region:
    region = Region(key, box, np.empty(tuple(b - a for a, b in box), entry.dtype))
    if len(entry.shards) == 1 and entry.shards[0].index == box:  # the common case, quickly
        region.reads.append((entry.shards[0], region.out))
        return region
    for shard in entry.shards:
        inter = [(max(a, c), min(b, d)) for (a, b), (c, d) in zip(shard.index, box)]
        if any(lo >= hi for lo, hi in inter):
            continue
        dst_sl = tuple(slice(lo - c, hi - c) for (lo, hi), (c, _) in zip(inter, box))
        if tuple(inter) == shard.index:
            dest = region.out[(*dst_sl, ...)]  # a view, also of a 0-d array
            if dest.flags.c_contiguous:
                region.reads.append((shard, dest))
                continue
        src = np.empty(shard.shape, entry.dtype)
        src_sl = tuple(slice(lo - a, hi - a) for (lo, hi), (a, _) in zip(inter, shard.index))
        region.reads.append((shard, src))
        region.copies.append((src, src_sl, dst_sl))
    return region
