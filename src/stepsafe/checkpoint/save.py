"""``save``: tree -> committed checkpoint, in two steps that async callers run apart.

``snapshot`` flattens the tree and captures every array on the host (the only part that must
happen while the caller waits); ``write`` turns a snapshot into a committed checkpoint.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Any

from stepsafe import knobs
from stepsafe.arrays import (
    StagingBuffers,
    copy_accelerator_leaves,
    is_array,
    is_jax_array,
    is_leaf,
    start_host_transfers,
    to_host,
)
from stepsafe.errors import ConfigError, MultiProcessSaveError, UnsupportedLeafError
from stepsafe.format import CommitRecord, HostArray, write_checkpoint
from stepsafe.format.writer import ALIGN
from stepsafe.storage import Storage, run_all, storage_for
from stepsafe.tree import Structure, flatten


@dataclass
class Snapshot:
    """A tree captured on the host, independent of the caller's live buffers when copied."""

    structure: Structure
    arrays: list[HostArray]
    values: dict[str, Any]

    @property
    def nbytes(self) -> int:
        return sum(d.nbytes for a in self.arrays for _, d in a.shards)


def check_single_process(path: str, *, jax_arrays: bool = False) -> None:
    """Refuse to save from one of several processes (``jax.distributed``).

    Each process holds only its own shards: a save from each would commit whichever process
    finished first, with the other processes' shards missing. Saving from many hosts at once
    (every process writing its shards, one commit) is not built yet. JAX is consulted only if
    the program already imported it, and asked for the process count only when that costs
    nothing: ``jax.distributed`` is initialised, or the tree holds JAX arrays (the backend is up).

    Raises:
        MultiProcessSaveError: ``jax.process_count() > 1``.
    """
    jax = sys.modules.get("jax")
    if jax is None:
        return
    is_initialized = getattr(getattr(jax, "distributed", None), "is_initialized", None)
    if not (jax_arrays or (is_initialized is not None and is_initialized())):
        return
    count = jax.process_count()
    if count > 1:
        where = f" {path}" if path else ""
        raise MultiProcessSaveError(
            f"cannot save{where}: this is one of {count} JAX processes and multi-host saves "
            "are not supported yet (nothing was written): save from a single process"
        )


def snapshot(
    tree: Any, *, copy: bool = False, staging: StagingBuffers | None = None, path: str = ""
) -> Snapshot:
    """Flatten ``tree`` and capture its arrays. ``copy``: make the snapshot independent of the
    caller's buffers (async saves): arrays on accelerators are copied where they lie, in one
    batched dispatch; host arrays are copied into ``staging`` when given, big copies on the I/O
    threads, since memcpy releases the GIL and two cores copy about twice as fast.

    Raises:
        UnsupportedLeafError: a leaf, key or nesting depth that restore could not read back.
        MultiProcessSaveError: one of several JAX processes (see ``check_single_process``).
    """
    flat = flatten(tree, is_leaf=is_leaf)
    leaves = [(p, x) for p, x in zip(flat.paths, flat.leaves) if is_array(x)]
    check_single_process(path, jax_arrays=any(is_jax_array(x) for _, x in leaves))
    values = {p: x for p, x in zip(flat.paths, flat.leaves) if not is_array(x)}
    copied: set[str] = set()
    if copy:
        leaves, copied = copy_accelerator_leaves(leaves)

    def capture(px: tuple[str, Any]) -> HostArray:
        return to_host(px[0], px[1], copy=copy and px[0] not in copied, staging=staging)

    host_bytes = sum(getattr(x, "nbytes", 0) for p, x in leaves if p not in copied)
    if copy and host_bytes >= knobs.PARALLEL_COPY_BYTES:
        arrays = run_all(capture, leaves)
    else:
        arrays = [capture(px) for px in leaves]
    return Snapshot(flat.structure, arrays, values)


def _check_data_file_size(size: int | None) -> None:
    """Refuse a data file size the writer cannot split at, before anything is written.

    Raises:
        ConfigError: ``size`` is below the format's alignment (``format.writer.ALIGN``).
    """
    if size is not None and size < ALIGN:
        raise ConfigError(f"data_file_size_bytes must be >= {ALIGN} bytes, got {size}")


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


def write(
    path: str,
    snap: Snapshot,
    *,
    custom_metadata: dict[str, Any] | None = None,
    step: int | None = None,
    extra_files: dict[str, bytes] | None = None,
    data_file_size_bytes: int | None = None,
    storage: Storage | None = None,
) -> None:
    """Commit ``snap`` at ``path`` (see ``save``); refuses as ``check_single_process`` does.
    ``storage``: the one that holds ``path`` (a manager's, with its transfer budget), ``path``
    in its syntax; by default ``storage_for(path)``'s."""
    _check_data_file_size(data_file_size_bytes)
    check_single_process(path)
    custom_metadata = check_custom_metadata(custom_metadata)
    start_host_transfers(snap.arrays)
    storage, local = storage_for(path) if storage is None else (storage, path)
    write_checkpoint(
        storage,
        local,
        snap.structure,
        snap.arrays,
        snap.values,
        record=CommitRecord(step=step, custom_metadata=dict(custom_metadata or {})),
        extra_files=extra_files,
        file_size=data_file_size_bytes,
    )


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
        MultiProcessSaveError: this is one of several JAX processes (nothing is written).
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
    snap = snapshot(tree, path=str(path))
    write(
        str(path),
        snap,
        custom_metadata=custom_metadata,
        data_file_size_bytes=data_file_size_bytes,
    )
