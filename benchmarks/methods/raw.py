"""The baseline: every array's bytes into one file (write + fsync), read back with readinto.

No format, no checksums, no metadata: what any checkpointing library must come close to. The
strongest honest single-file writer: the leaves' bytes gathered into one reused aligned 8 MiB
buffer and written with ``O_DIRECT`` (``benchmarks.direct``), around the page cache, as
stepsafe writes its data files. Buffered, with writeback started every 8 MiB, it measured the
kernel's copy into fresh page-cache pages on this VM (l4g, fresh processes: 2.2-7 s of system
time, run to run), not the disk; direct, 1.5-1.9 s at under 0.6 CPU s.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from benchmarks import states
from benchmarks.direct import aligned, cached, finish, open_write, read_direct, write_at
from benchmarks.fsutil import fsync_path
from benchmarks.methods.base import Method

BUFFER = 8 << 20  # the gathering buffer: full-buffer direct writes


def _bytes(a: np.ndarray) -> memoryview:
    return memoryview(a.reshape(-1).view(np.uint8))


class Raw(Method):
    state = ""  # set by ``make``: the save writes leaves in the specs' order

    def save(self, path: str, tree: Any) -> None:
        buf = aligned(BUFFER)
        fd, direct = open_write(path)
        try:
            fill = pos = 0
            for spec in states.specs(self.state):
                view = _bytes(self.leaf(tree, spec.key))
                while view:
                    take = min(len(view), BUFFER - fill)
                    buf[fill : fill + take] = view[:take]
                    fill, view = fill + take, view[take:]
                    if fill == BUFFER:
                        write_at(fd, buf, fill, pos, direct)
                        pos, fill = pos + fill, 0
            if fill:
                write_at(fd, buf, fill, pos, direct)
                pos += fill
            finish(fd, pos, direct)
        finally:
            os.close(fd)
        fsync_path(os.path.dirname(path))

    def make(self, state: str) -> Any:
        self.state = state
        return super().make(state)

    def restore(self, path: str, state: str) -> Any:
        """``readinto`` each leaf from a cached file; from one that is not cached, the file
        read with ``O_DIRECT`` a buffer at a time and copied into the leaves."""
        specs = states.specs(state)
        outs = [np.empty(spec.shape, states.DTYPE) for spec in specs]
        if cached(path) or not self._read_direct(path, [_bytes(o) for o in outs]):
            with open(path, "rb", buffering=0) as f:
                for out in outs:
                    view = _bytes(out)
                    while view:
                        n = f.readinto(view)
                        if not n:
                            raise EOFError(f"{path} is shorter than the state")
                        view = view[n:]
        return states.nest([(spec.key, out) for spec, out in zip(specs, outs)])

    @staticmethod
    def _read_direct(path: str, views: list[memoryview]) -> bool:
        todo = iter(views)
        view = next(todo, memoryview(b""))

        def into(data: memoryview) -> None:
            nonlocal view
            while data:
                take = min(len(view), len(data))
                view[:take] = data[:take]
                view, data = view[take:], data[take:]
                if not view:
                    view = next(todo, None)  # type: ignore[arg-type]
                    if view is None:
                        return

        return read_direct(path, aligned(BUFFER), into)
