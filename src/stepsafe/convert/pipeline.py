"""A conversion's output arrays made ahead of their writer, on one thread, within a budget.

A conversion reads its source, makes each output array (a slice, a cast), and writes it; done
in series the disk waits while an array is sliced and the slicing waits while it is written.
``Ahead`` makes the arrays' blocks (``OutLeaf.blocks``), in the order they are written, on a
thread of its own, while the writer writes the ones before: reading and slicing overlap
writing. At most ``limit`` bytes of made blocks wait for the writer or are being written
(``knobs.CONVERT_AHEAD_BYTES``, or two blocks where ``CONVERT_BLOCK_BYTES`` is set lower; one
block whatever its size, so that an array bigger than the limit is made once the writer let go
of the one before, as without the thread); the unused buffers it keeps count against the same limit.
Besides them the thread holds what a block is made from: a stacked array being unstacked, held
until its last layer is made. So a conversion needs about its largest array plus ``limit``.
The thread copies its blocks into reused buffers (``buffers.pooled``), whose pages are mapped
already. To a bucket (``bucket``) the limit is smaller (``knobs.CONVERT_BUCKET_AHEAD_BYTES``):
its uploads hold whole data files already, and overlap them with the reading.

The writer asks for each array's blocks in order (``blocks(i)``, ``i`` rising; arrays it never
asks for, empty ones, are passed over). Asked out of order, or again, the pipeline stops and
the array is made on the writer's thread, as without it: the output is the same either way.
An error making a block is raised in the writer where it asks for that block. ``close`` stops
the thread and drops what it made: call it when the writing ends, however it ends.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from stepsafe import knobs
from stepsafe.convert.buffers import Pool, pooled
from stepsafe.convert.lazy_leaf import OutLeaf

_END = object()  # an array's last block was made


class Ahead:
    """The blocks of ``leaves`` (in the order they will be written), made on a thread of
    their own at most ``limit`` bytes ahead of the writer."""

    def __init__(
        self, leaves: Sequence[OutLeaf], limit: int | None = None, *, bucket: bool = False
    ) -> None:
        self._leaves = list(leaves)
        if limit is None:
            limit = int(knobs.CONVERT_BUCKET_AHEAD_BYTES if bucket else knobs.CONVERT_AHEAD_BYTES)
        # blocks made small to bound memory (CONVERT_BLOCK_BYTES) bound it here too
        self._limit = min(limit, 2 * int(knobs.CONVERT_BLOCK_BYTES))
        self._cond = threading.Condition()
        self._queue: deque[tuple[int, Any]] = deque()  # (array, block, _END or the error)
        self._held = 0  # bytes made and not yet let go of by the writer
        self._given = 0  # of which the block the writer holds
        self._next = 0  # the first array the writer may ask for
        self._stopped = False  # closed, or an error reached the writer
        self._ended = False  # the thread is done (every array made, or an error)
        self._thread: threading.Thread | None = None

    def blocks(self, i: int) -> Iterator[np.ndarray]:
        """Array ``i``'s blocks: as made ahead, or, asked out of order or after ``close``,
        made now (``OutLeaf.blocks``)."""
        with self._cond:
            ahead = not self._stopped and i >= self._next
            if ahead:
                self._next = i + 1
                if self._thread is None:
                    self._thread = threading.Thread(
                        target=self._make, name="stepsafe-convert-ahead", daemon=True
                    )
                    self._thread.start()
        if not ahead:
            self.close()
            return self._leaves[i].blocks()
        return self._taken(i)

    def close(self) -> None:
        """Stop making blocks and drop those made; returns once the thread has stopped (it
        finishes the block it is making first)."""
        with self._cond:
            self._stopped = True
            self._queue.clear()
            self._held = self._given = 0
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def _taken(self, i: int) -> Iterator[np.ndarray]:
        given = 0  # blocks of array i handed to the writer
        while True:
            with self._cond:
                self._let_go()
                while True:
                    while self._queue and self._queue[0][0] < i:  # arrays never asked for
                        _, item = self._queue.popleft()
                        if isinstance(item, np.ndarray):
                            self._held -= item.nbytes
                            self._cond.notify_all()
                    if self._queue or self._stopped or self._ended:
                        break
                    self._cond.wait()
                if not self._queue:  # stopped meanwhile (or failed on an array passed over)
                    break
                _, item = self._queue.popleft()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    self._stopped = True
                    self._queue.clear()
                    self._cond.notify_all()
                    raise item
                self._given = item.nbytes
            yield item
            given += 1
        # the same blocks as the thread's (the same ``blocks()``), past those handed over
        yield from itertools.islice(self._leaves[i].blocks(), given, None)

    def _let_go(self) -> None:
        """The writer asks for more: the block it held is written."""
        self._held -= self._given
        self._given = 0
        self._cond.notify_all()

    def _make(self) -> None:
        """The thread: every array's blocks in order, each once the budget has room."""
        try:
            with pooled(self._limit) as pool:
                for i, leaf in enumerate(self._leaves):
                    try:
                        if not self._made(i, leaf, pool):
                            return
                    except BaseException as e:  # raised in the writer, where it asks for it
                        with self._cond:
                            self._queue.append((i, e))
                        return
                    with self._cond:
                        self._queue.append((i, _END))
                        self._cond.notify_all()
        finally:
            with self._cond:
                self._ended = True
                self._cond.notify_all()

    def _made(self, i: int, leaf: OutLeaf, pool: Pool) -> bool:
        """Array ``i``'s blocks into the queue; False once stopped. Each block is made once
        the blocks held, the pool's unused buffers and it fit in the budget (the pool gives up
        unused buffers to make room), or alone once the writer holds none."""
        step = min(leaf.nbytes, int(knobs.CONVERT_BLOCK_BYTES)) if leaf.box else leaf.nbytes
        blocks = leaf.blocks()
        while True:
            with self._cond:
                while not self._stopped and self._held and self._held + step > self._limit:
                    self._cond.wait()
                if self._stopped:
                    return False
                pool.trim(max(0, self._limit - self._held - step))
            block = next(blocks, None)
            if block is None:
                return True
            with self._cond:
                if self._stopped:
                    return False
                self._queue.append((i, block))
                self._held += block.nbytes
                self._cond.notify_all()
            del block
