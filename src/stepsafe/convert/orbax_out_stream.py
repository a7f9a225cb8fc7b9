"""Orbax's writer fed one block at a time: the arrays of an Orbax export are never all in
memory, nor even one whole large array.

orbax-checkpoint 0.12.8's ``PyTreeSave`` takes the tree of arrays, and its ``NumpyHandler``
writes them all at once, after copying each (``deepcopy_host_arrays``): a checkpoint's params
held about three times over. Orbax's public extension point is the type handler: a
``TypeHandler`` registered for a type (here ``OutLeaf``, the conversion's array not yet read)
in a registry given to ``PyTreeCheckpointHandler``. This one subclasses Orbax's
``NumpyHandler``, so that the checkpoint records its arrays as ``np.ndarray`` and Orbax (and
MaxText) restore them with Orbax's own handler; its ``serialize`` writes the arrays one after
another, each through the tensorstore spec Orbax builds for it
(``type_handlers.get_json_tspec_write``), block by block: a large array is stored in chunks of
contiguous rows, as Orbax stores an array sharded along its first axis (its write shape is
the chunk), and each chunk is read from the source, written and dropped before the next. Orbax
still writes everything else: the tree's metadata, the OCDBT merge, the commit.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from stepsafe.convert.lazy_leaf import OutLeaf, grouped
from stepsafe.errors import ManifestError
from stepsafe.format.manifest import Box


def chunk_boxes(shape: tuple[int, ...], itemsize: int, limit: int) -> list[Box]:
    """The chunks an array of ``shape`` is stored in, in C order: itself when it is at most
    ``limit`` bytes (as Orbax stores a host array), else contiguous regions of at most
    ``limit`` bytes (at least one element): ranges of one axis whose trailing axes fit, at
    every index of the axes before it, all of one length but the last (a regular grid, whose
    edge chunk Zarr stores whole: the length is evened out so that it is nearly full)."""
    if math.prod(shape) * itemsize <= limit:
        return [tuple((0, n) for n in shape)]
    k = next(i for i in range(len(shape)) if math.prod(shape[i + 1 :]) * itemsize <= limit)
    most = max(1, limit // (math.prod(shape[k + 1 :]) * itemsize))
    step = -(-shape[k] // -(-shape[k] // most))  # as many chunks, as even as they can be
    tail = tuple((0, n) for n in shape[k + 1 :])
    return [
        (*((i, i + 1) for i in outer), (a, min(a + step, shape[k])), *tail)
        for outer in itertools.product(*(range(n) for n in shape[:k]))
        for a in range(0, shape[k], step)
    ]


def streaming_registry(
    ocp: Any, *, limit: int, depth: int = 3, on_bytes: Callable[[int], None] | None = None
) -> Any:
    """A type handler registry of Orbax's standard handlers, and one for ``OutLeaf`` that
    writes each array block by block (blocks of at most ``limit`` bytes), reporting each
    block's bytes to ``on_bytes`` as it is read.

    Args:
        ocp: the ``orbax.checkpoint`` module (imported by the caller: it is optional).
        limit (`int`): the largest chunk, in bytes: an array bigger than this is stored and
            written in chunks of contiguous rows; one smaller is one chunk, as Orbax's own.
        depth (`int`): how many blocks are being written at once (each held till written).
        on_bytes (`Callable[[int], None]`, *optional*): called with each block's bytes.

    Returns:
        An Orbax ``TypeHandlerRegistry`` for ``PyTreeCheckpointHandler(type_handler_registry=)``.
    """
    import jax
    import tensorstore as ts

    th = ocp.type_handlers

    async def opened(leaf: OutLeaf, info: Any, arg: Any, chunk: tuple[int, ...]) -> Any:
        """The array's tensorstore, created by the spec Orbax's ``NumpyHandler`` uses, with
        ``chunk`` as its write shape (Orbax's chunk)."""
        await info.await_path_creation()
        ocdbt = bool(info.is_ocdbt_checkpoint)
        spec = th.get_json_tspec_write(
            info, use_ocdbt=ocdbt, global_shape=leaf.shape, local_shape=chunk,
            dtype=np.dtype(leaf.dtype), process_index=jax.process_index() if ocdbt else None,
            arg=arg,
        )  # fmt: skip
        return await ts.open(ts.Spec(spec), create=True, open=True, context=info.ts_context)

    async def write_all(values: Sequence[OutLeaf], infos: Sequence[Any], args: Sequence[Any]):
        # a stacked array's slices one after another: read once, held briefly (``group``)
        jobs = [
            (leaf, info, arg, chunk_boxes(leaf.shape, np.dtype(leaf.dtype).itemsize, limit))
            for (info, arg), leaf in grouped(list(zip(zip(infos, args), values)))
        ]
        reads = _blocks(jobs)  # in a thread, one block ahead of the writes
        ahead = asyncio.ensure_future(asyncio.to_thread(next, reads, None))
        writing: collections.deque[Any] = collections.deque()
        store, at = None, -1
        try:
            while (got := await ahead) is not None:
                n, box, a = got
                ahead = asyncio.ensure_future(asyncio.to_thread(next, reads, None))
                if n != at:
                    leaf, info, arg, boxes = jobs[n]
                    chunk = tuple(hi - lo for lo, hi in boxes[0])
                    store, at = await opened(leaf, info, arg, chunk), n
                if on_bytes is not None:
                    on_bytes(a.nbytes)
                region = store[tuple(slice(lo, hi) for lo, hi in box)] if box else store
                writing.append(region.write(a, can_reference_source_data_indefinitely=True))
                del a
                while len(writing) >= depth:
                    await writing.popleft()
            while writing:
                await writing.popleft()
        finally:
            ahead.cancel()

    class BlockHandler(th.NumpyHandler):  # type: ignore[misc, name-defined]
        """Orbax's ``NumpyHandler`` (typestr ``np.ndarray``, its metadata and restore), but
        serializing ``OutLeaf`` s one at a time, block by block."""

        async def serialize(
            self, values: Sequence[OutLeaf], infos: Sequence[Any], args: Any = None
        ) -> list[Any]:
            args = args or [th.SaveArgs()] * len(values)
            return [
                ocp.future.CommitFutureAwaitingContractedSignals(
                    write_all(values, infos, args), name="stepsafe_block_writer"
                )
            ]

    standard = [(ty, th.get_type_handler(ty)) for ty in th.supported_types()]
    return th.create_type_handler_registry((OutLeaf, BlockHandler()), *standard)


def _blocks(jobs: list[tuple[OutLeaf, Any, Any, list[Box]]]) -> Iterator[tuple[int, Box, Any]]:
    """Each job's blocks in order, ``(job, box, array)``, read from the source as asked for:
    by region where the source reads regions, else from the array made whole once.

    Raises:
        ManifestError: the source made an array other than it planned, naming it.
    """
    for n, (leaf, info, _, boxes) in enumerate(jobs):
        try:
            whole = leaf.made() if len(boxes) == 1 or leaf.box is None else None
            for box in boxes:
                if whole is None:
                    yield n, box, leaf.region(box)
                elif len(boxes) == 1:
                    yield n, box, whole
                else:
                    yield n, box, whole[tuple(slice(lo, hi) for lo, hi in box)]
            whole = None
        except ManifestError as e:
            raise ManifestError(f"{info.name!r} {e}: nothing written") from e
