"""A checkpoint as a conversion's source: its tree, with each array an ``OutLeaf`` that reads
it (or a region of it) only when the writer needs it. A stepsafe checkpoint, or one Orbax
wrote (MaxText's), its arrays read through tensorstore as orbax-checkpoint opens them, one
leaf (or region) per ``OutLeaf`` made."""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np

from stepsafe import knobs
from stepsafe.checkpoint.orbax_locate import NOT_STEPSAFE, OrbaxStep, orbax_instead
from stepsafe.checkpoint.orbax_read import OrbaxCheckpoint, open_orbax
from stepsafe.checkpoint.restore import OWN_SHARDS, open_checkpoint, restore_from
from stepsafe.convert.lazy_leaf import OutLeaf, block_boxes
from stepsafe.errors import TargetMismatchError
from stepsafe.format import CheckpointReader
from stepsafe.format.step_files import read_extra
from stepsafe.tree import build_plain

Source = CheckpointReader | OrbaxCheckpoint
log = logging.getLogger("stepsafe")


def open_source(path: str) -> Source:
    """The committed checkpoint ``path`` designates (a step, its ``items/``, or a run: its
    latest step), to read leaf by leaf; a checkpoint Orbax wrote (complete by Orbax's rules)
    is opened through orbax-checkpoint.

    Raises:
        CheckpointNotFoundError, IncompleteCheckpointError, CorruptCheckpointError: as
            ``stepsafe.restore`` raises them.
        UnsupportedFormatError: an Orbax checkpoint, and orbax-checkpoint not installed.
        TargetMismatchError: a local-tier step of one process (its shards, not a state).
    """
    try:
        reader = open_checkpoint(path)
    except NOT_STEPSAFE as e:
        found = orbax_instead(str(path), e)
        _warn_of_other_items(found)
        return open_orbax(found)
    if OWN_SHARDS in reader.record.extra_files:
        raise TargetMismatchError(
            f"{reader.path} is a local-tier step of one process (its own shards), not a "
            "state: convert a step of the persistent tier"
        )
    return reader


def _warn_of_other_items(found: OrbaxStep) -> None:
    """Say which of the step's other Orbax items are not converted: MaxText's ``iter`` (the
    data iterator's position) would otherwise be lost without a word."""
    if found.item == found.path:
        return
    storage, step = found.storage, found.path
    try:
        others = [
            n
            for n in storage.list_dir(step)
            if n not in (found.item_name, "metrics")  # Orbax's copy of the metrics: no state
            and storage.is_dir(storage.join(step, n))
        ]
    except OSError:
        return
    if others:
        log.warning(
            "%s: only its Orbax item %s is converted, not %s (MaxText's iter: the data "
            "iterator's position)", step, found.item_name, ", ".join(others),
        )  # fmt: skip


def source_tree(reader: Source) -> Any:
    """The checkpoint's tree as plain containers: arrays as ``OutLeaf`` s that read them when
    made, values as saved."""
    if isinstance(reader, OrbaxCheckpoint):
        return _orbax_tree(reader)
    manifest = reader.manifest

    def leaf(key: str) -> Any:
        if key in manifest.values:
            return manifest.values[key]
        entry = manifest.arrays[key]
        return OutLeaf(
            entry.shape, entry.dtype, lambda: reader.read_array(key),
            box=lambda box: reader.read_box(key, box),
        )  # fmt: skip

    return build_plain(manifest.structure, leaf)


def _orbax_tree(ckpt: OrbaxCheckpoint) -> Any:
    """An Orbax source's tree: each array read through tensorstore when made, and by region
    (``box``: block by block when it is bigger than ``CONVERT_BLOCK_BYTES``) where its blocks
    decode its stored chunks about once (a sharded save's chunks, cut along the blocks' axis).
    An array stored otherwise (one chunk, a numpy array's save; chunks spanning all its rows)
    is read whole: any region of a chunk decodes all of it, so blocks would decode it again
    and again and hold about as much."""
    limit = int(knobs.CONVERT_BLOCK_BYTES)

    def leaf(key: str) -> Any:
        if key not in ckpt.arrays:
            return ckpt.values[key]
        shape, dtype = ckpt.arrays[key]
        box = (lambda b: ckpt.read_box(key, b)) if _blocks_pay(ckpt, key, limit) else None
        return OutLeaf(shape, dtype, lambda: ckpt.read_array(key), box=box)

    return build_plain(ckpt.structure, leaf)


def _blocks_pay(ckpt: OrbaxCheckpoint, key: str, limit: int) -> bool:
    """Whether array ``key`` read block by block (``limit``) decodes its chunks about once."""
    shape, dtype = ckpt.arrays[key]
    if not shape or not math.prod(shape):  # no region of a 0-d or empty array to read
        return False
    return ckpt.regions_pay(key, block_boxes(shape, np.dtype(dtype).itemsize, limit))


def source_step(reader: Source) -> int | None:
    """The step the source was saved at (an Orbax step's: its directory's name)."""
    return reader.step if isinstance(reader, OrbaxCheckpoint) else reader.record.step


def source_custom_metadata(reader: Source) -> dict[str, Any]:
    """The user's metadata saved with the source."""
    if isinstance(reader, OrbaxCheckpoint):
        return reader.custom_metadata
    return dict(reader.record.custom_metadata)


def source_extra_files(reader: Source) -> dict[str, bytes]:
    """A stepsafe source's extra files (a trainer's data-iterator states), checked, as they
    were; none for an Orbax source (its other items are not converted)."""
    if isinstance(reader, OrbaxCheckpoint):
        return {}
    record = reader.record
    return {
        name: read_extra(reader.storage, reader.path, name, record) or b""
        for name in record.extra_files
    }


def restore_source(reader: Source, target: Any, select: Any = None) -> Any:
    """A plain restore from the open source onto ``target`` (``stepsafe.restore``'s rules)."""
    if isinstance(reader, OrbaxCheckpoint):
        from stepsafe.checkpoint.orbax_restore import restore_from_orbax

        return restore_from_orbax(reader, target, select)
    return restore_from(reader, target, select)
