"""Fresh host buffers, mapped in bulk: what snapshots copy into and restores read into.

Memory fresh to a process costs a page fault per 4 KiB page the first time it is written (the
kernel zeroes each page; under a hypervisor every fault also exits to it). On a virtual machine
that fills fresh pages at about 0.5 GB/s, that was most of an async save's blocked time and a
large part of a restore. A big buffer is therefore mapped here with transparent huge pages
(``MADV_HUGEPAGE``: one fault per 2 MiB) and populated in one call (``MADV_POPULATE_WRITE``,
Linux 5.14+), which mapped 1 GiB in 0.07 s where ``np.empty`` plus a first write took 0.5-1.2 s.
Where the kernel refuses either hint the buffer is still correct, only slower to fill, so
refusals are ignored. Small buffers (under ``knobs.BULK_MAP_BYTES``) come from numpy's
allocator, where a mapping of their own would cost more than it saves.

The returned array owns its mapping through its ``base``: the memory goes back to the kernel
when the last view of it is dropped, as with any numpy array.
"""

from __future__ import annotations

import contextlib
import errno
import math
import mmap

import numpy as np

from stepsafe import knobs

_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux's value, on older Pythons


def empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An uninitialised C-contiguous array, its pages already mapped when it is big.

    Args:
        shape: the array's shape.
        dtype: its dtype.
    """
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < knobs.BULK_MAP_BYTES or not hasattr(mmap, "MADV_HUGEPAGE"):
        return np.empty(shape, dtype)
    try:
        region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except OSError as e:  # out of memory: numpy's MemoryError, which callers know to expect
        if e.errno != errno.ENOMEM:
            raise
        return np.empty(shape, dtype)
    for advice in (mmap.MADV_HUGEPAGE, _POPULATE_WRITE):
        # an older kernel, or huge pages off: the pages fault in as they are first written
        with contextlib.suppress(OSError):
            region.madvise(advice)
    return np.frombuffer(region, dtype).reshape(shape)


def copy_of(src: np.ndarray) -> np.ndarray:
    """A C-contiguous private copy of ``src`` in a fresh buffer (see ``empty``)."""
    out = empty(src.shape, src.dtype)
    np.copyto(out, src, casting="no")
    return out
