"""Write a tree of ``OutLeaf`` s and plain values as one committed checkpoint, streaming.

The tree's structure and values go in the manifest as any save's; each ``OutLeaf`` becomes a
one-shard array made on demand (``lazy_leaf.py``), so the bytes flow from the source through
the conversion into the data files one array at a time (made a little ahead of the writer, on
a thread of their own: ``pipeline.py``), with the same commit as any save: an interrupted
conversion leaves no checkpoint, never half of one.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np

from stepsafe.arrays import is_array, is_leaf
from stepsafe.convert.lazy_leaf import LazyLeaf, OutLeaf, grouped
from stepsafe.convert.pipeline import Ahead
from stepsafe.format import CommitRecord, write_checkpoint
from stepsafe.format.plan import HostArray
from stepsafe.storage import Storage, is_bucket
from stepsafe.tree import flatten


def write_tree(
    storage: Storage,
    path: str,
    tree: Any,
    *,
    step: int | None,
    custom_metadata: dict[str, Any] | None = None,
    extra_files: dict[str, bytes] | None = None,
    file_size: int | None = None,
    on_bytes: Callable[[int], None] | None = None,
) -> int:
    """Commit ``tree`` at ``path``; the bytes of array data written.

    Raises:
        CheckpointExistsError: ``path`` holds a committed checkpoint already.
        UnsupportedLeafError: a leaf that cannot be saved.
        StorageError: as the storage raised it; nothing is committed then.
    """
    flat = flatten(tree, is_leaf=lambda x: isinstance(x, OutLeaf) or is_leaf(x))
    leaves: list[tuple[str, OutLeaf]] = []
    values: dict[str, Any] = {}
    for key, x in zip(flat.paths, flat.leaves):
        if is_array(x):
            x = OutLeaf(tuple(x.shape), np.dtype(x.dtype), lambda a=x: np.asarray(a))
        if isinstance(x, OutLeaf):
            leaves.append((key, x))
        else:
            values[key] = x
    ordered = grouped(leaves)  # a group's leaves one after another
    ahead = Ahead(  # the writer asks for them in this order
        [x for _, x in ordered], bucket=is_bucket(path)
    )
    arrays = [
        HostArray(key, x.dtype, x.shape, [(_whole(x), LazyLeaf(key, x, on_bytes, feed))])
        for (key, x), feed in zip(ordered, [partial(ahead.blocks, i) for i in range(len(ordered))])
    ]
    record = CommitRecord(step=step, custom_metadata=dict(custom_metadata or {}))
    try:
        write_checkpoint(
            storage, path, flat.structure, arrays, values, record=record,
            extra_files=extra_files, file_size=file_size,
        )  # fmt: skip
    finally:
        ahead.close()
    return sum(x.nbytes for _, x in leaves)


def _whole(x: OutLeaf) -> tuple[tuple[int, int], ...]:
    return tuple((0, n) for n in x.shape)
