"""The machine's own limits for the same bytes, and whether a device->host transfer on another
thread holds the GIL."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import jax
import numpy as np

from benchmarks.gpu.common import (
    Tree,
    arrays_of,
    now,
)


def limits(tree: Tree, scratch: Path) -> dict[str, Any]:
    """The machine's own limits for the same bytes: disk write + fdatasync of one buffer."""
    nbytes = sum(x.nbytes for x in jax.tree.leaves(arrays_of(tree)))
    block = np.random.default_rng(0).integers(0, 256, 64 << 20, dtype=np.uint8)
    path = scratch / "disk.bin"
    out: dict[str, Any] = {"nbytes": nbytes}
    for name in ("disk_write_fdatasync_s", "disk_write_fdatasync_again_s"):
        t0 = now()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        left = nbytes
        while left:
            left -= os.write(fd, memoryview(block)[: min(left, len(block))])
        os.fdatasync(fd)
        os.close(fd)
        out[name] = now() - t0
        path.unlink()
    return out


def gil_probe(tree: Tree) -> dict[str, Any]:
    """Does a device->host transfer on another thread hold the GIL? The caller's Python stalls
    if it does: measure the longest gap between iterations of a pure-Python loop on this thread
    while another thread runs ``np.asarray`` on a device copy of the biggest array, and how
    long ``Thread.start`` takes to return to this thread meanwhile."""

    big = max(jax.tree.leaves(arrays_of(tree)), key=lambda x: x.nbytes)
    out: dict[str, Any] = {"nbytes": big.nbytes, "rows": []}
    for _ in range(3):
        c = big.copy()
        jax.block_until_ready(c)
        done: list[float] = []

        def transfer(c: jax.Array = c, done: list[float] = done) -> None:
            t0 = now()
            np.asarray(c)
            done.append(now() - t0)

        th = threading.Thread(target=transfer)
        t0 = now()
        th.start()
        start_s = now() - t0
        last, gap = now(), 0.0
        while th.is_alive():
            sum(range(100))
            t = now()
            gap, last = max(gap, t - last), t
        th.join()
        out["rows"].append({"thread_start_s": start_s, "max_gap_s": gap, "transfer_s": done[0]})
    return out
