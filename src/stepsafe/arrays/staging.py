"""Host buffers that async snapshots copy into, kept from one save to the next.

Copying a state into freshly allocated memory costs a page fault per 4 KiB page (the kernel
zeroes every page first), which was most of the time the training step is blocked: fresh
buffers are mapped in bulk (``storage.host_memory``), and a run saves the same shapes every
time, so the second and later snapshots copy into the buffers the previous one used, already
mapped. Only numpy leaves are copied (JAX arrays are immutable: ``arrays.jax_arrays``); the
price is one host copy of those leaves allocated between saves. Not thread-safe: one snapshot
at a time, and only once the previous snapshot's write has finished.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from stepsafe.storage.host_memory import empty


class StagingBuffers:
    def __init__(self) -> None:
        self._buffers: dict[Any, np.ndarray] = {}

    def copy(self, key: Any, src: np.ndarray) -> np.ndarray:
        """A C-contiguous copy of ``src``, in last round's buffer for ``key`` if it fits."""
        buf = self._buffers.get(key)
        if buf is None or buf.shape != src.shape or buf.dtype != src.dtype:
            buf = empty(src.shape, src.dtype)
            self._buffers[key] = buf
        np.copyto(buf, src, casting="no")
        return buf
