"""A stepsafe checkpoint as a conversion's source: its tree, with each array an ``OutLeaf``
that reads it (or a region of it) only when the writer needs it."""

from __future__ import annotations

from typing import Any

from stepsafe.checkpoint.restore import open_checkpoint
from stepsafe.convert.lazy_leaf import OutLeaf
from stepsafe.format import CheckpointReader
from stepsafe.tree import build_plain


def open_source(path: str) -> CheckpointReader:
    """The committed checkpoint ``path`` designates (a step, its ``items/``, or a run: its
    latest step), to read leaf by leaf.

    Raises:
        CheckpointNotFoundError, IncompleteCheckpointError, CorruptCheckpointError: as
            ``stepsafe.restore`` raises them.
    """
    return open_checkpoint(path)


def source_tree(reader: CheckpointReader) -> Any:
    """The checkpoint's tree as plain containers: arrays as ``OutLeaf`` s that read them when
    made, values as saved."""
    manifest = reader.manifest

    def leaf(key: str) -> Any:
        if key in manifest.values:
            return manifest.values[key]
        entry = manifest.arrays[key]
        return OutLeaf(entry.shape, entry.dtype, lambda: reader.read_array(key))

    return build_plain(manifest.structure, leaf)
