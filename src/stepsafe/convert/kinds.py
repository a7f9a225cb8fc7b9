"""``convert_checkpoint``: one checkpoint into another kind, streaming, atomically committed.

The kinds are MaxText's: a training checkpoint (the whole state: params, optimizer state,
step) or a param-only one (inference: ``{"params": ...}`` only, saved as step 0, like MaxText's
``generate_param_only_checkpoint``), each stacked (scanned layers) or unstacked
(``layers_0`` ..). The output is written one array at a time, each made from the source when
the writer needs it (``lazy_leaf.py``): the peak memory is about the largest array, whatever
the model's size; and it is committed like any save, so an interrupted conversion leaves none.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from stepsafe import knobs
from stepsafe.convert.lazy_leaf import OutLeaf
from stepsafe.convert.ops import astype
from stepsafe.convert.source import (
    Source,
    open_source,
    source_custom_metadata,
    source_extra_files,
    source_step,
    source_tree,
)
from stepsafe.convert.stacking import stack_layers, unstack_layers
from stepsafe.convert.write_tree import write_tree
from stepsafe.errors import ConfigError
from stepsafe.storage import storage_for


@dataclass
class Converted:
    """What ``convert_checkpoint`` wrote: where, which step, how many array bytes, and how
    many layer subtrees it unstacked or stacked."""

    path: str
    step: int | None
    nbytes: int
    layer_sets: int


def convert_checkpoint(
    src: str,
    dst: str,
    *,
    param_only: bool = False,
    params_key: str = "params",
    dtype: str | None = None,
    unstack: bool = False,
    stack: bool = False,
    scan_axis: int = 1,
    layers_key: str = "layers",
    data_file_size_bytes: int | None = None,
    on_bytes: Callable[[int], None] | None = None,
) -> Converted:
    """Write checkpoint ``src`` as another kind at ``dst`` (a new step directory).

    Args:
        src (`str`): a committed stepsafe checkpoint (a step, or a run: its latest step), or
            one Orbax wrote (MaxText's; read through orbax-checkpoint, ``stepsafe[orbax]``).
        dst (`str`): where the new one goes (it must not exist), local or a bucket URL.
        param_only (`bool`): keep only ``params_key``'s subtree, as step 0.
        params_key (`str`): the parameters' key at the top of the state.
        dtype (`str`, *optional*): cast every floating array to it (e.g. ``"bfloat16"``, as
            MaxText's param-only checkpoints); None keeps every dtype.
        unstack (`bool`): every ``layers_key`` subtree becomes ``layers_0`` .. (``force_unroll``).
        stack (`bool`): the reverse.
        scan_axis (`int`): the layer axis of stacked arrays (MaxText's ``param_scan_axis``: 1;
            stepsafe's demo model: 0).
        layers_key (`str`): the key of the stacked layers (MaxText's ``layers``).
        data_file_size_bytes (`int`, *optional*): where data files split; None: the default.
        on_bytes (`Callable[[int], None]`, *optional*): called with each run of bytes written.

    Returns:
        `Converted`: where and what was written.

    Raises:
        ConfigError: both ``unstack`` and ``stack``; nothing to (un)stack; no ``params_key``;
            an unknown ``dtype``.
        CheckpointNotFoundError, CorruptCheckpointError: as reading ``src`` raises them.
        CheckpointExistsError: ``dst`` holds a committed checkpoint already.
    """
    reader, tree, step, sets = converted_source(
        src, param_only=param_only, params_key=params_key, dtype=dtype, unstack=unstack,
        stack=stack, scan_axis=scan_axis, layers_key=layers_key,
    )  # fmt: skip
    storage, path = storage_for(str(dst))
    if data_file_size_bytes is None and "://" in str(dst):
        data_file_size_bytes = int(knobs.CONVERT_BUCKET_FILE_BYTES)
    extras = {} if param_only else source_extra_files(reader)  # the data iterators' states
    custom = source_custom_metadata(reader)
    if unstack or stack:
        custom["scan_layers"] = stack  # what MaxText records, and reads to build the model
    nbytes = write_tree(
        storage, path, tree, step=step, custom_metadata=custom, extra_files=extras,
        file_size=data_file_size_bytes, on_bytes=on_bytes,
    )  # fmt: skip
    return Converted(path, step, nbytes, sets)


def converted_source(
    src: str,
    *,
    param_only: bool = False,
    params_key: str = "params",
    dtype: str | None = None,
    unstack: bool = False,
    stack: bool = False,
    scan_axis: int = 1,
    layers_key: str = "layers",
) -> tuple[Source, Any, int | None, int]:
    """The source ``src`` opened, and its tree as the conversion makes it (``OutLeaf`` s:
    nothing read yet), the step to write it as and how many layer subtrees changed: what
    ``convert_checkpoint`` writes as stepsafe's and ``export_orbax`` as Orbax's.

    Raises:
        ConfigError: as ``convert_checkpoint``, before any array is read.
    """
    if unstack and stack:
        raise ConfigError("unstack and stack are opposite: ask for one")
    cast = None if dtype is None else _float_dtype(dtype)  # refused before anything is read
    reader = open_source(src)
    tree = source_tree(reader)
    step = source_step(reader)
    if param_only:
        if not isinstance(tree, dict) or params_key not in tree:
            top = sorted(map(str, tree)) if isinstance(tree, dict) else type(tree).__name__
            raise ConfigError(
                f"{reader.path} has no {params_key!r} at its top ({top}): name the parameters' "
                "key (--params-key)"
            )
        tree, step = {params_key: tree[params_key]}, 0
    sets = 0
    if unstack or stack:
        change = unstack_layers if unstack else stack_layers
        tree, sets = change(tree, axis=scan_axis, key=layers_key)
        if sets == 0:
            what = f"{layers_key!r} subtree" if unstack else f"{layers_key}_0 .. entries"
            raise ConfigError(f"{reader.path} holds no {what} to {'un' * unstack}stack")
    if cast is not None:
        tree = _cast(tree, cast)
    return reader, tree, step, sets


def _float_dtype(name: str) -> np.dtype:
    import ml_dtypes

    try:
        dt = np.dtype(getattr(ml_dtypes, name, name))
    except TypeError as e:
        raise ConfigError(f"unknown dtype {name!r}: e.g. bfloat16, float16, float32") from e
    if not _is_float(dt):
        raise ConfigError(f"dtype {name!r} is not a floating type: floating arrays are cast to it")
    return dt


def _cast(node: Any, dt: np.dtype) -> Any:
    if isinstance(node, OutLeaf):
        if not _is_float(node.dtype) or node.dtype == dt:
            return node
        return astype(node, dt)
    if isinstance(node, dict):
        return {k: _cast(v, dt) for k, v in node.items()}
    if isinstance(node, list | tuple):
        return type(node)(_cast(v, dt) for v in node)
    return node


def _is_float(dt: np.dtype) -> bool:
    """numpy's floats, and ml_dtypes' (bfloat16, float8_*), not its int4 or uint4."""
    import ml_dtypes

    if np.issubdtype(dt, np.floating):
        return True
    if dt.kind in "cbiuOSUM":  # complex (finfo takes it), and everything plainly not a float
        return False
    try:
        ml_dtypes.finfo(dt)
    except (ValueError, TypeError):
        return False
    return True
