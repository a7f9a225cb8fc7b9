"""``export_orbax``: a checkpoint written as Orbax's, in MaxText's layout, so a model can go
back to MaxText (or anything that restores with orbax-checkpoint).

    DST/<step>/_CHECKPOINT_METADATA     Orbax's step metadata
    DST/<step>/items/                   the state, one PyTree item (OCDBT + zarr3 by default)

It is written by orbax-checkpoint itself (the ``Checkpointer`` with a composite of one
PyTree item named ``items`` that MaxText's ``CheckpointManager`` uses), never by hand, and
committed by Orbax's own rules (a temporary directory renamed when complete;
``commit_success.txt`` on GCS). Orbax 0.12's ``PyTreeSave`` takes arrays, not readers of
arrays, and copies them all before writing (the params held about three times over); the
export hands it the conversion's ``OutLeaf`` s instead, with a type handler of its own
(``orbax_out_stream.py``, Orbax's public extension point) that writes them one block at a
time through the tensorstore spec Orbax builds for each, an array bigger than
``knobs.ORBAX_CHUNK_BYTES`` stored in chunks of rows: the peak memory is a few blocks, whatever the
checkpoint's size. Chunks are stored raw unless ``use_compression`` (Orbax's zstd).
"""

from __future__ import annotations

import logging
import os
import posixpath
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from stepsafe import knobs
from stepsafe.arrays import is_leaf
from stepsafe.checkpoint.orbax_read import import_orbax
from stepsafe.checkpoint.run_layout import check_step, step_name, step_number
from stepsafe.convert.kinds import converted_source
from stepsafe.convert.lazy_leaf import OutLeaf
from stepsafe.convert.orbax_out_stream import streaming_registry
from stepsafe.convert.source import source_custom_metadata
from stepsafe.errors import (
    CheckpointExistsError,
    StepsafeError,
    StorageError,
    UnsupportedLeafError,
)
from stepsafe.format.orbax_layout import orbax_tmp_step
from stepsafe.manager.inventory import scan_steps
from stepsafe.storage import Storage, storage_for
from stepsafe.tree import flatten, join, split

log = logging.getLogger("stepsafe")
ITEM_NAME = "items"  # MaxText's
_NOT_TENSORSTORE = "MmUSO"  # datetimes, timedeltas, text, bytes, objects (and np.void)


@dataclass
class ExportedOrbax:
    """What ``export_orbax`` wrote: the step directory, its item directory, the step, the
    bytes of arrays and how many layer subtrees it unstacked or stacked."""

    path: str
    item: str
    step: int
    nbytes: int
    layer_sets: int


def export_orbax(
    src: str,
    dst: str,
    *,
    step: int | None = None,
    param_only: bool = False,
    params_key: str = "params",
    dtype: str | None = None,
    unstack: bool = False,
    stack: bool = False,
    scan_axis: int = 1,
    layers_key: str = "layers",
    item_name: str = ITEM_NAME,
    use_ocdbt: bool = True,
    use_zarr3: bool = True,
    use_compression: bool = False,
    on_bytes: Callable[[int], None] | None = None,
) -> ExportedOrbax:
    """Write checkpoint ``src`` as an Orbax checkpoint ``dst/<step>/<item_name>``.

    Args:
        src (`str`): a committed checkpoint (stepsafe's, or Orbax's), as ``convert_checkpoint``
            takes it.
        dst (`str`): the Orbax ``CheckpointManager`` directory to write into: MaxText's
            ``<base_output_directory>/<run_name>/checkpoints``; its other steps are untouched.
        step (`int`, *optional*): the step to write as; None: the source's (its record's, else
            its directory's name; 0 for ``param_only``, as MaxText's param-only checkpoints).
        param_only, params_key, dtype, unstack, stack, scan_axis, layers_key: as
            ``convert_checkpoint`` (``dtype="bfloat16"``: MaxText's param-only cast).
        item_name (`str`): the PyTree item's name (MaxText's ``items``; Orbax's single-item
            default is ``default``).
        use_ocdbt (`bool`), use_zarr3 (`bool`): Orbax's storage options (MaxText's
            ``checkpoint_storage_use_ocdbt`` / ``_use_zarr3``, both True by default).
        use_compression (`bool`): zstd on every chunk, as Orbax's default; False (the
            export's default) stores them raw, which Orbax (and MaxText) restore alike, as
            their Zarr metadata says (float32 weights shrink about 11% under zstd, for
            three to four times the CPU time of the whole export).
        on_bytes (`Callable[[int], None]`, *optional*): called with each block's bytes as it
            is read from ``src``.

    Returns:
        `ExportedOrbax`: where and what was written.

    Raises:
        UnsupportedFormatError: orbax-checkpoint is not installed (``stepsafe[orbax]``).
        CheckpointExistsError: ``dst/<step>`` exists already.
        UnsupportedLeafError: an array of a dtype Orbax cannot store (datetime, text), or two
            keys Orbax would store under one name (``a.b`` and ``a/b``), before anything is
            written.
        CorruptCheckpointError: an array of ``src`` failed its checks as it was read, or came
            out another shape or dtype than planned (``ManifestError``): nothing committed.
        ConfigError: as ``convert_checkpoint``, before anything is read.
        StorageError: Orbax failed to write (nothing committed then, by Orbax's rules).
    """
    ocp = import_orbax("writing an Orbax checkpoint (stepsafe convert --to orbax)")
    reader, tree, src_step, sets = converted_source(
        src, param_only=param_only, params_key=params_key, dtype=dtype, unstack=unstack,
        stack=stack, scan_axis=scan_axis, layers_key=layers_key,
    )  # fmt: skip
    if step is None:  # the source's, else its directory's name (a save without a step)
        step = src_step if src_step is not None else step_number(posixpath.basename(reader.path))
    number = check_step(step or 0)
    storage, root = storage_for(str(dst))
    shown = storage.join(root, step_name(number))  # as the user wrote it
    if "://" not in root:
        root = os.path.abspath(root)  # Orbax refuses relative paths
    step_dir = storage.join(root, step_name(number))
    if storage.exists(step_dir):
        raise CheckpointExistsError(
            f"{step_dir} exists already: choose another step (--step) or directory"
        )
    pending = _temporaries(storage, root, number)
    if pending:  # Orbax would delete it to start its own: another save's, running or dead
        raise CheckpointExistsError(
            f"{storage.join(root, pending[0])} is an unfinished Orbax save of step {number}: "
            "choose another step (--step) or directory, or delete it if no save is running"
        )
    custom = source_custom_metadata(reader)
    if unstack or stack:
        custom["scan_layers"] = stack  # what MaxText records, and reads to build the model
    _check_names(tree)
    _warn_of_stepsafe_steps(storage, root)
    held = {"bytes": 0}
    state = _planned(tree, held)
    registry = streaming_registry(ocp, limit=int(knobs.ORBAX_CHUNK_BYTES), on_bytes=on_bytes)
    handler = ocp.PyTreeCheckpointHandler(
        use_ocdbt=use_ocdbt, use_zarr3=use_zarr3, use_compression=use_compression,
        type_handler_registry=registry,
    )  # fmt: skip
    # One step written as Orbax's CheckpointManager writes it (the same files), by the
    # Checkpointer it uses, so that the other steps in ``dst`` are never opened: Orbax 0.12's
    # manager refuses a directory holding stepsafe's steps (their metadata has more keys).
    # Its item directories made before the save goes on (not by a thread that a failed save
    # leaves running, to make them after the cleanup below): no other file differs.
    made_now = ocp.options.AsyncOptions(create_directories_asynchronously=False)
    composite = ocp.CompositeCheckpointHandler(
        composite_options=ocp.CompositeOptions(async_options=made_now), **{item_name: handler}
    )
    checkpointer = ocp.Checkpointer(composite)
    failed: Exception | None = None
    try:
        checkpointer.save(
            step_dir, ocp.args.Composite(**{item_name: ocp.args.PyTreeSave(state)}),
            custom_metadata=custom,
        )  # fmt: skip
    except Exception as e:  # Orbax's and tensorstore's own errors, whatever their class
        failed = e
    finally:
        checkpointer.close()  # first: Orbax's threads may still be making its temporaries
    if failed is not None:
        left = _remove_temporaries(storage, root, number)
        also = f" (delete its leftover {left})" if left else ""
        if isinstance(failed, StepsafeError):  # reading the source failed, not Orbax
            if left:
                log.warning("%s: delete its leftover %s", failed, left)
            raise failed
        raise StorageError(
            f"orbax-checkpoint could not write {step_dir}: {failed}{also}"
        ) from failed
    return ExportedOrbax(shown, storage.join(shown, item_name), number, held["bytes"], sets)


def _planned(node: Any, held: dict[str, int], key: str = "") -> Any:
    """The tree Orbax saves: its ``OutLeaf`` s as they are (read block by block as Orbax's
    writer reaches them), checked to be of dtypes Orbax stores; an empty array made now, for
    Orbax's own handler to refuse as it refuses any."""
    if isinstance(node, OutLeaf):
        dt = np.dtype(node.dtype)
        if dt.kind in _NOT_TENSORSTORE or dt.type is np.void:  # (bfloat16 is "V" too)
            raise UnsupportedLeafError(
                f"{key!r} is a {dt} array, which Orbax (tensorstore) cannot "
                "store: drop or convert it first; nothing written"
            )
        held["bytes"] += node.nbytes
        return node.made() if node.nbytes == 0 else node
    if isinstance(node, dict):
        return {k: _planned(v, held, join(key, str(k))) for k, v in node.items()}
    if isinstance(node, list | tuple):
        return type(node)(_planned(v, held, join(key, str(i))) for i, v in enumerate(node))
    return node


def _check_names(tree: Any) -> None:
    """Refuse two leaves that Orbax would store under one name: it names each leaf by its keys
    joined with ``.``, so ``{"a.b": x, "a": {"b": y}}`` would keep one of them, silently.

    Raises:
        UnsupportedLeafError: naming both keys; nothing written.
    """
    flat = flatten(tree, is_leaf=lambda x: isinstance(x, OutLeaf) or x is None or is_leaf(x))
    seen: dict[str, str] = {}
    for key, leaf in zip(flat.paths, flat.leaves):
        if leaf is None:
            continue
        name = ".".join(split(key))
        if name in seen:
            raise UnsupportedLeafError(
                f"{seen[name]!r} and {key!r} would both be Orbax's {name!r} (Orbax joins keys "
                "with '.'), one overwriting the other: rename one; nothing written"
            )
        seen[name] = key


def _warn_of_stepsafe_steps(storage: Storage, root: str) -> None:
    """Warn when ``root`` holds stepsafe's steps: Orbax 0.12's ``CheckpointManager`` (MaxText's)
    refuses to open such a directory (it cannot parse their ``_CHECKPOINT_METADATA``)."""
    if not storage.is_dir(root):
        return
    ours = [e.step for e in scan_steps(storage, root, sizes=False) if e.ours]
    if ours:
        log.warning(
            "%s holds stepsafe's steps (%s): Orbax's CheckpointManager (MaxText's) will not "
            "open it; to resume in MaxText, export into a directory of its own",
            root, ", ".join(map(str, ours[:3])) + (" ..." if len(ours) > 3 else ""),
        )  # fmt: skip


def _remove_temporaries(storage: Storage, root: str, step: int) -> str | None:
    """Delete this failed save's temporaries (none was there before it began), waiting for
    Orbax's writer threads, which a failed save leaves finishing their files in them; the
    one left, if they never finish."""
    deadline = time.monotonic() + float(knobs.ORBAX_CLEANUP_WAIT_S)
    while time.monotonic() < deadline:
        names = _temporaries(storage, root, step)
        if not names:
            return None
        try:
            for name in names:
                storage.delete_tree(storage.join(root, name))
        except OSError:  # a file written into it meanwhile ("Directory not empty")
            pass
        time.sleep(0.1)  # and whether a late write made it again
    names = _temporaries(storage, root, step)
    return storage.join(root, names[0]) if names else None


def _temporaries(storage: Storage, root: str, step: int) -> list[str]:
    """Orbax's temporary directories of ``step`` under ``root`` (a failed save's leftovers)."""
    if not storage.is_dir(root):
        return []
    return [n for n in storage.list_dir(root) if orbax_tmp_step(n) == step]
