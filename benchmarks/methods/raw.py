"""The baseline: every array's bytes into one file (write + fsync), read back with readinto.

No format, no checksums, no metadata: what any checkpointing library must come close to. The
strongest honest single-file writer: writeback of what is written starts every 8 MiB
(``sync_file_range``, as a tuned writer does), so that the kernel's dirty-page limit does not
stall the writes and the final fsync finds most of the file on disk already (measured on l4g,
one process, page cache dropped before each: without it 4.3-7.6 s, the dd-like limit 2.0-2.7 s).
"""

from __future__ import annotations

import ctypes
import os
from typing import Any

import numpy as np

from benchmarks import states
from benchmarks.fsutil import fsync_path
from benchmarks.methods.base import Method

KICK = 8 << 20  # bytes written between two starts of writeback
_WRITE = 2  # SYNC_FILE_RANGE_WRITE: start writeback, do not wait


def _sync_file_range() -> Any:
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
    return fn


_start_writeback = _sync_file_range()


def _bytes(a: np.ndarray) -> memoryview:
    return memoryview(a.reshape(-1).view(np.uint8))


class Raw(Method):
    state = ""  # set by ``make``: the save writes leaves in the specs' order

    def save(self, path: str, tree: Any) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            written = kicked = 0
            for spec in states.specs(self.state):
                view = _bytes(self.leaf(tree, spec.key))
                while view:
                    n = os.write(fd, view[:KICK])
                    view = view[n:]
                    written += n
                    if _start_writeback is not None and written - kicked >= KICK:
                        _start_writeback(fd, kicked, written - kicked, _WRITE)
                        kicked = written
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_path(os.path.dirname(path))

    def make(self, state: str) -> Any:
        self.state = state
        return super().make(state)

    def restore(self, path: str, state: str) -> Any:
        items = []
        with open(path, "rb", buffering=0) as f:
            for spec in states.specs(state):
                out = np.empty(spec.shape, states.DTYPE)
                view = _bytes(out)
                while view:
                    n = f.readinto(view)
                    if not n:
                        raise EOFError(f"{path} is shorter than the state")
                    view = view[n:]
                items.append((spec.key, out))
        return states.nest(items)
