"""What a checkpoint holds, from its two JSON files alone: no array bytes read, no JAX needed."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from stepsafe.checkpoint.orbax_locate import NOT_STEPSAFE, orbax_instead
from stepsafe.checkpoint.restore import open_checkpoint, select_prefix
from stepsafe.errors import TargetMismatchError
from stepsafe.tree import build_plain, subtree


@dataclass(frozen=True)
class SavedSharding:
    """How a JAX array lay on devices when it was saved: a mesh (axis names and sizes) and a
    partition spec (per leading array axis: None, an axis name, or a tuple of names).
    ``str()`` gives e.g. ``mesh (data=2, model=2) spec P('data', None)``."""

    axis_names: tuple[str, ...]
    mesh_shape: tuple[int, ...]
    spec: tuple[str | tuple[str, ...] | None, ...]

    @classmethod
    def from_record(cls, record: dict | None) -> SavedSharding | None:
        """From the manifest's record (already validated by ``format.manifest``); None for
        None."""
        if record is None:
            return None
        mesh = record["mesh"]
        spec = tuple(e if e is None or isinstance(e, str) else tuple(e) for e in record["spec"])
        return cls(tuple(mesh["axis_names"]), tuple(mesh["shape"]), spec)

    def __str__(self) -> str:
        mesh = ", ".join(f"{n}={k}" for n, k in zip(self.axis_names, self.mesh_shape))
        return f"mesh ({mesh}) spec P({', '.join(repr(e) for e in self.spec)})"


@dataclass(frozen=True)
class ArrayMetadata:
    """One saved array. Usable as a restore target leaf (restores as numpy of this dtype).
    ``sharding``: its layout on devices when saved (JAX arrays with a NamedSharding); None for
    host arrays and other shardings."""

    shape: tuple[int, ...]
    dtype: np.dtype
    nbytes: int
    sharding: SavedSharding | None = None


@dataclass(frozen=True)
class CheckpointInfo:
    """One checkpoint's ``_CHECKPOINT_METADATA`` (step, timestamps, format version, save id,
    ``custom_metadata``) and its manifest's totals (bytes, arrays, data files and sizes)."""

    path: str
    step: int | None
    init_timestamp_nsecs: int
    commit_timestamp_nsecs: int | None
    format_version: int
    save_id: str  # which save wrote it: every file of the step but the marker carries it
    custom_metadata: dict[str, Any]
    nbytes: int
    num_arrays: int
    files: dict[str, int]
    format: str = "stepsafe"  # or "Orbax (item items, zarr3)": a checkpoint Orbax wrote


def metadata(path: str, *, select: str | Sequence[Any] | None = None) -> Any:
    """The saved tree with every array replaced by its ``ArrayMetadata``; small values as saved.

    Reads the manifest only, never array bytes: as cheap on a 1 TB checkpoint in a bucket as
    on a toy. The result is a valid ``restore`` target (restores numpy arrays).

    Args:
        path (`str`): a step directory, its ``items/`` child, or a run directory (its latest
            step), local or an ``s3://`` / ``gs://`` URL; or a checkpoint Orbax wrote (read
            through orbax-checkpoint, ``stepsafe[orbax]``: its Python scalars and strings are
            read, being values, not arrays).
        select (`str` or sequence, *optional*): a key path (``"params"``) or sequence of keys;
            only that subtree is returned.

    Returns:
        `Any`: dicts, lists and tuples as saved (NamedTuples and other custom nodes as dicts)
        with ``ArrayMetadata(shape, dtype, nbytes, sharding)`` leaves (``sharding``: the saved
        mesh and partition spec of a JAX array, else None).

    Raises:
        TargetMismatchError: ``select`` is not in the checkpoint.
        CheckpointNotFoundError: ``path`` holds no checkpoint.
        IncompleteCheckpointError: the checkpoint at ``path`` was never committed.
        CorruptCheckpointError: its metadata or manifest is damaged.
        UnsupportedFormatError: a newer (or foreign) format version.

    Example:

    ```python
    import stepsafe

    tree = stepsafe.metadata("ckpt/1000")
    tree["params"]["w"]  # ArrayMetadata(shape=(4, 4), dtype=dtype('float32'), nbytes=64, ...)
    print(tree["params"]["w"].sharding)  # mesh (data=2, model=2) spec P(None, 'model')
    ```
    """
    try:
        reader = open_checkpoint(path)
    except NOT_STEPSAFE as e:  # perhaps an Orbax checkpoint (MaxText's): its metadata
        from stepsafe.checkpoint.orbax_restore import metadata_orbax

        return metadata_orbax(orbax_instead(str(path), e), select)
    prefix = select_prefix(select)
    manifest = reader.manifest
    try:
        node = subtree(manifest.structure, prefix)
    except KeyError as e:
        raise TargetMismatchError(
            f"select={select!r} is not in checkpoint {reader.path}: {e.args[0]}"
        ) from e

    def leaf(key: str) -> Any:
        if key in manifest.values:
            return manifest.values[key]
        a = manifest.arrays[key]
        return ArrayMetadata(a.shape, a.dtype, a.nbytes, SavedSharding.from_record(a.sharding))

    return build_plain(node, leaf, prefix)


def info(path: str) -> CheckpointInfo:
    """The checkpoint's ``_CHECKPOINT_METADATA`` plus totals from its manifest (no array bytes
    are read).

    Args:
        path (`str`): as ``metadata`` takes it.

    Returns:
        `CheckpointInfo`: ``path`` (the step directory found), ``step``, timestamps,
        ``format_version``, ``save_id``, ``custom_metadata``, ``nbytes``, ``num_arrays`` and
        ``files`` (data file name -> size).

    Raises:
        StepsafeError: as ``metadata`` does, for a path without a committed, readable
            checkpoint (``CheckpointNotFoundError``, ``IncompleteCheckpointError``,
            ``CorruptCheckpointError``, ``UnsupportedFormatError``).

    Example:

    ```python
    import stepsafe

    meta = stepsafe.info("outputs/run1")  # the run's latest committed step
    print(meta.step, meta.nbytes, meta.custom_metadata)
    ```
    """
    try:
        reader = open_checkpoint(path)
    except NOT_STEPSAFE as e:  # perhaps an Orbax checkpoint (MaxText's)
        from stepsafe.checkpoint.orbax_restore import info_orbax

        return info_orbax(orbax_instead(str(path), e))
    m, man = reader.record, reader.manifest
    return CheckpointInfo(
        path=reader.path,
        step=m.step,
        init_timestamp_nsecs=m.init_timestamp_nsecs,
        commit_timestamp_nsecs=m.commit_timestamp_nsecs,
        format_version=m.format_version,
        save_id=m.save_id,
        custom_metadata=m.custom_metadata,
        nbytes=man.nbytes,
        num_arrays=len(man.arrays),
        files=dict(man.files),
    )
