"""``save``: tree -> committed checkpoint, in two steps that async callers run apart.

``snapshot`` flattens the tree and captures every array on the host (the only part that must
happen while the caller waits); ``write`` turns a snapshot into a committed checkpoint.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from stepsafe import knobs
from stepsafe.arrays import (
    StagingBuffers,
    copy_accelerator_leaves,
    described,
    is_array,
    is_host_local,
    is_jax_array,
    is_leaf,
    start_host_transfers,
    to_host,
)
from stepsafe.checkpoint.collective_save import write_collective
from stepsafe.distributed import process_count, process_index
from stepsafe.errors import StepsafeError, UnsupportedLeafError
from stepsafe.format import CommitRecord, HostArray, write_checkpoint
from stepsafe.format.layout import metrics_problem
from stepsafe.format.writer import check_file_size
from stepsafe.storage import Storage, run_all, storage_for
from stepsafe.tree import Structure, flatten

T = TypeVar("T")


@dataclass
class Snapshot:
    """A tree captured on the host, independent of the caller's live buffers when copied."""

    structure: Structure
    arrays: list[HostArray]
    values: dict[str, Any]

    @property
    def nbytes(self) -> int:
        return sum(d.nbytes for a in self.arrays for _, d in a.shards)


def snapshot(
    tree: Any,
    *,
    copy: bool = False,
    staging: StagingBuffers | None = None,
    own: bool = False,
) -> Snapshot:
    """Flatten ``tree`` and capture its arrays. ``copy``: make the snapshot independent of the
    caller's buffers (async saves): arrays on accelerators are copied where they lie, in one
    batched dispatch; JAX arrays on the CPU are immutable and taken as views, not copied
    (``arrays.jax_arrays.host_shards``); numpy arrays are copied into ``staging`` when given,
    big copies on the I/O threads, since memcpy releases the GIL and two cores copy about twice
    as fast.

    Under several JAX processes a host-local leaf (a numpy array, or a JAX array on this
    process's devices only) is taken from process 0: the others capture only its description.

    Raises:
        UnsupportedLeafError: a leaf, key or nesting depth that restore could not read back.
    """
    flat = flatten(tree, is_leaf=is_leaf)
    leaves = [(p, x) for p, x in zip(flat.paths, flat.leaves) if is_array(x)]
    values = {p: x for p, x in zip(flat.paths, flat.leaves) if not is_array(x)}
    copied: set[str] = set()
    if copy:
        leaves, copied = copy_accelerator_leaves(leaves)
    others_write = process_index() != 0 and not own  # host-local leaves: process 0's

    def capture(px: tuple[str, Any]) -> HostArray:
        if others_write and is_host_local(px[1]):
            return described(px[0], px[1])
        return to_host(px[0], px[1], copy=copy and px[0] not in copied, staging=staging)

    host_bytes = sum(getattr(x, "nbytes", 0) for _, x in leaves if not is_jax_array(x))
    if copy and host_bytes >= knobs.PARALLEL_COPY_BYTES:
        arrays = run_all(capture, leaves)
    else:
        arrays = [capture(px) for px in leaves]
    return Snapshot(flat.structure, arrays, values)


def check_custom_metadata(custom: dict[str, Any] | None) -> dict[str, Any] | None:
    """``custom`` (a user's ``custom_metadata``) as it will be stored (a JSON round trip), or
    a clear error now, in the caller's thread: found only by the background write, it would
    fail a later call instead."""
    if custom is None:
        return None
    if not isinstance(custom, dict):
        raise UnsupportedLeafError(f"custom_metadata must be a dict, got {type(custom).__name__}")
    try:
        return json.loads(json.dumps(custom))
    except (TypeError, ValueError, RecursionError) as e:
        raise UnsupportedLeafError(f"custom_metadata must be JSON-serialisable: {e}") from e


def check_metrics(metrics: dict[str, Any] | None) -> dict[str, int | float] | None:
    """``metrics`` (a step's numbers, e.g. ``{"loss": 1.23}``, for retention by metric) copied,
    or a clear error now, in the caller's thread: str keys, finite int or float values (numpy
    and JAX scalars are taken as Python numbers)."""
    if metrics is None:
        return None
    if isinstance(metrics, dict):
        metrics = {
            k: v.item() if hasattr(v, "item") and getattr(v, "shape", None) == () else v
            for k, v in metrics.items()
        }
    problem = metrics_problem(metrics)
    if problem is not None:
        raise UnsupportedLeafError(f"{problem}: pass e.g. metrics={{'loss': 1.23}}")
    return dict(metrics)


def write(
    path: str,
    snap: Snapshot | None,
    *,
    custom_metadata: dict[str, Any] | None = None,
    step: int | None = None,
    extra_files: dict[str, bytes] | None = None,
    data_file_size_bytes: int | None = None,
    storage: Storage | None = None,
    local_error: BaseException | None = None,
    metrics: dict[str, int | float] | None = None,
) -> None:
    """Commit ``snap`` at ``path`` (see ``save``); under several JAX processes every process
    calls it and they commit one checkpoint together (``collective_save``). ``storage``: the
    one that holds ``path`` (a manager's, with its transfer budget), ``path`` in its syntax; by
    default ``storage_for(path)``'s. ``extra_files``: this process's own. ``local_error``:
    under several processes, why this process has no snapshot (it still takes part, and the
    save fails on every process)."""
    storage, local = storage_for(path) if storage is None else (storage, path)
    single = process_count() == 1
    try:
        custom_metadata = check_custom_metadata(custom_metadata)
        file_size = check_file_size(storage, data_file_size_bytes)
    except StepsafeError as e:
        if single:
            raise
        local_error, file_size = local_error or e, 0
    record = CommitRecord(
        step=step, custom_metadata=dict(custom_metadata or {}), metrics=dict(metrics or {})
    )
    if local_error is None:
        assert snap is not None
        start_host_transfers(snap.arrays)
    if single:
        assert snap is not None and local_error is None
        write_checkpoint(
            storage, local, snap.structure, snap.arrays, snap.values,
            record=record, extra_files=extra_files, file_size=file_size,
        )  # fmt: skip
        return
    write_collective(
        storage, local, None if local_error else snap, record=record, extra_files=extra_files,
        file_size=file_size, local_error=local_error,
    )  # fmt: skip


def take_part(path: str, capture: Callable[[], T], storage: Storage | None = None) -> T:
    """``capture()`` (a snapshot, and whatever else the save needs of this process); under
    several processes a refusal does not leave at once: this process first takes part in the
    save it refuses (``write`` with ``local_error``), so that every process raises and the
    next save pairs up; then it raises.

    Raises:
        UnsupportedLeafError: as ``snapshot`` (on every process of the job).
    """
    try:
        return capture()
    except Exception as e:
        if process_count() == 1:
            raise
        write(path, None, storage=storage, local_error=e)
        raise


def save(
    path: str,
    tree: Any,
    *,
    custom_metadata: dict[str, Any] | None = None,
    data_file_size_bytes: int | None = None,
) -> None:
    """Write ``tree`` as a committed checkpoint at ``path``; durable when this returns.

    The data goes into a temporary first and is committed at once (a rename on a local disk, a
    conditional create of the commit marker on buckets): a save that dies half-way leaves no
    checkpoint at ``path``, never a partial one.

    Under ``jax.distributed`` every process calls ``save`` with the same ``path`` and tree:
    each writes the shards it holds (replicated ones split among their holders), process 0
    commits once every process's part is durable, and every process returns, or raises the
    same error. Host-local leaves (numpy arrays, Python values) are taken from process 0. A
    local ``path`` must then be on a filesystem every host shares.

    Args:
        path (`str`): where the step goes, a local directory or an ``s3://`` / ``gs://`` URL.
            It must not hold a committed checkpoint yet: a checkpoint is never overwritten.
        tree (`Any`): a pytree (dicts, lists, tuples, NamedTuples, JAX-registered nodes) of
            numpy / JAX arrays and Python scalars, strings or None.
        custom_metadata (`dict`, *optional*): any JSON-serialisable dict, stored in
            ``_CHECKPOINT_METADATA`` as ``custom_metadata`` (``info(path).custom_metadata``).
        data_file_size_bytes (`int`, *optional*): where data files are split; None: 2 GiB on
            a local disk, 128 MiB on buckets (each file goes up in one request, several at
            once).

    Returns:
        `None`: the checkpoint is committed and durable when ``save`` returns.

    Raises:
        CheckpointExistsError: a committed checkpoint already lives at ``path``.
        UnsupportedLeafError: a leaf, key or nesting depth that ``restore`` could not read
            back, or ``custom_metadata`` that is not a JSON-serialisable dict.
        ConfigError: ``data_file_size_bytes`` is too small to split at.
        CoordinationError: under several JAX processes, another one did not answer in time
            (``knobs.COORDINATION_TIMEOUT_S``); nothing was committed.
        StorageError: the storage refused (disk full, read-only, no permission).
        CredentialsError: a bucket URL and no credentials for it.

    Example:

    ```python
    import numpy as np
    import stepsafe

    state = {"params": {"w": np.ones((4, 4), np.float32)}, "step": 1000}
    stepsafe.save("ckpt/1000", state, custom_metadata={"loss": 1.5})
    ```
    """
    snap = take_part(str(path), lambda: snapshot(tree))
    write(
        str(path),
        snap,
        custom_metadata=custom_metadata,
        data_file_size_bytes=data_file_size_bytes,
    )
