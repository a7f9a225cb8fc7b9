"""The machine's limits for the same byte count: disk write/read and memory copies.

``Disk`` writes one reused buffer like ``dd ... oflag=direct conv=fdatasync`` (around the page
cache: ``benchmarks.direct``) and reads the file back into one reused buffer (``iflag=direct``
when it is not cached): the disk alone, with no page faults. ``Memcpy`` copies the state's
bytes into fresh memory (page faults included, as a restore into new arrays pays) and into
pre-touched memory.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from benchmarks import states
from benchmarks.direct import ALIGN, aligned, cached, finish, open_write, read_direct, write_at
from benchmarks.methods.base import Method

BLOCK = 64 << 20


class Disk(Method):
    fingerprint = False

    def make(self, state: str) -> Any:
        total = states.nbytes(state)
        block = aligned(-(-min(total, BLOCK) // ALIGN) * ALIGN)
        block[:] = np.random.default_rng(0).integers(0, 256, len(block), dtype=np.uint8).data
        return {"total": total, "block": block}

    def save(self, path: str, tree: Any) -> None:
        left, block = tree["total"], tree["block"]
        fd, direct = open_write(path)
        try:
            pos = 0
            while left:
                n = min(left, len(block))
                write_at(fd, block, n, pos, direct)
                pos, left = pos + n, left - n
            finish(fd, pos, direct)
        finally:
            os.close(fd)

    def restore(self, path: str, state: str) -> Any:
        """The file into one reused buffer: with ``O_DIRECT`` when it is not cached (the
        disk alone), through the page cache when it is."""
        size = -(-min(states.nbytes(state), BLOCK) // ALIGN) * ALIGN
        if not cached(path) and read_direct(path, aligned(size), lambda data: None):
            return None
        buf = bytearray(size)
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
        return None


class Memcpy(Method):
    fingerprint = False

    def copy(self, state: str) -> dict[str, float]:
        """Seconds to copy the state's bytes into fresh and into pre-touched memory."""
        src = np.ones(states.nbytes(state), np.uint8)
        out = {}
        # On a VM, memory this guest never touched before costs a host fault on first touch;
        # the second fresh copy gets pages the guest has already backed.
        for name in ("fresh_s", "fresh_again_s"):
            t0 = time.perf_counter()
            fresh = np.empty_like(src)
            np.copyto(fresh, src)
            out[name] = time.perf_counter() - t0
            del fresh
        touched = np.zeros_like(src)
        touched.fill(2)
        t0 = time.perf_counter()
        np.copyto(touched, src)
        out["pretouched_s"] = time.perf_counter() - t0
        return out
