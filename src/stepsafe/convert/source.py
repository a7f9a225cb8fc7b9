"""A stepsafe checkpoint as a conversion's source: its tree, with each array an ``OutLeaf``
that reads it (or a region of it) only when the writer needs it."""

from __future__ import annotations

from typing import Any

from stepsafe.checkpoint.restore import OWN_SHARDS, open_checkpoint
from stepsafe.convert.lazy_leaf import OutLeaf
from stepsafe.errors import TargetMismatchError
from stepsafe.format import CheckpointReader
from stepsafe.tree import build_plain


def open_source(path: str) -> CheckpointReader:
    """The committed checkpoint ``path`` designates (a step, its ``items/``, or a run: its
    latest step), to read leaf by leaf.

    Raises:
        CheckpointNotFoundError, IncompleteCheckpointError, CorruptCheckpointError: as
            ``stepsafe.restore`` raises them.
        TargetMismatchError: a local-tier step of one process (its shards, not a state).
    """
    reader = open_checkpoint(path)
    if OWN_SHARDS in reader.record.extra_files:
        raise TargetMismatchError(
            f"{reader.path} is a local-tier step of one process (its own shards), not a "
            "state: convert a step of the persistent tier"
        )
    return reader


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
