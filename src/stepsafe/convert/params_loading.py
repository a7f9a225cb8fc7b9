"""Parameters loaded into a model of the other kind: stacked layers from an unstacked
checkpoint (``layers_0`` ..), or unstacked from a stacked one, converted while loading
(MaxText's ``load_parameters_path`` takes either kind).

When the checkpoint's parameters have the target's keys, it is a plain restore (each process
reads only its shards). Otherwise the layers are stacked or unstacked along ``scan_axis`` on
the host, one array at a time, and each array placed onto the target's leaf (its dtype, by the
restore's lossless-cast rule, and its sharding).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from stepsafe.arrays import is_array
from stepsafe.checkpoint.casting import check_cast
from stepsafe.checkpoint.restore import is_target_leaf, place_array
from stepsafe.convert.lazy_leaf import OutLeaf, grouped
from stepsafe.convert.source import open_source, restore_source, source_tree
from stepsafe.convert.stacking import stack_layers, unstack_layers
from stepsafe.errors import ConfigError, TargetMismatchError
from stepsafe.tree import check_target_paths, flatten

log = logging.getLogger("stepsafe")


def load_parameters(
    path: str,
    target: Any,
    *,
    params_key: str = "params",
    scan_axis: int = 1,
    layers_key: str = "layers",
) -> Any:
    """The parameters of checkpoint ``path`` (its ``params_key`` subtree, or the whole tree
    when it has none) onto ``target``, stacking or unstacking layers when the checkpoint is
    of the other kind.

    Args:
        path (`str`): a committed checkpoint (a step, or a run: its latest step); one Orbax
            wrote (MaxText's) too, read through orbax-checkpoint (``stepsafe[orbax]``).
        target (`Any`): the parameters' tree as the model wants them (arrays,
            ``jax.ShapeDtypeStruct`` with shardings, ...).
        params_key (`str`): where the parameters lie in a full state.
        scan_axis (`int`): the layer axis of stacked arrays (MaxText's ``param_scan_axis``).
        layers_key (`str`): the stacked layers' key.

    Raises:
        TargetMismatchError: the parameters fit the target neither as saved nor with their
            layers stacked or unstacked.
    """
    reader = open_source(path)
    tree = source_tree(reader)
    has_key = isinstance(tree, dict) and params_key in tree
    params = tree[params_key] if has_key else tree
    want = flatten(target, is_leaf=is_target_leaf)
    have = _paths(params)
    if set(have) == set(want.paths):
        return restore_source(reader, target, params_key if has_key else None)
    for change, what in ((stack_layers, "stacked"), (unstack_layers, "unstacked")):
        try:
            converted, sets = change(params, axis=scan_axis, key=layers_key)
        except ConfigError:
            continue
        if sets and set(_paths(converted)) == set(want.paths):
            log.info("Loading %s's parameters with their layers %s", reader.path, what)
            return place_tree(converted, target)
    check_target_paths(have, want.paths)  # raises, saying which keys differ
    raise TargetMismatchError(f"{reader.path}: the parameters do not fit the target")


def place_tree(tree: Any, target: Any) -> Any:
    """``tree`` (``OutLeaf`` s, arrays, values) made and placed onto ``target``: its leaves'
    dtypes (the restore's lossless-cast rule) and shardings, its containers.

    Raises:
        TargetMismatchError: other keys, shapes, or a lossy cast.
    """
    want = flatten(target, is_leaf=is_target_leaf)
    keys, values = _flat(tree)
    check_target_paths(keys, want.paths)
    leaves = dict(zip(keys, values))
    return want.rebuild(_placed(leaves, want.paths, want.leaves))


def _placed(leaves: dict[str, Any], keys: list[str], targets: list[Any]) -> list[Any]:
    """Each target's leaf made and placed, in ``grouped`` order (a stacked array's slices one
    after another, so it is read once and held briefly), returned in the targets' order."""
    out: list[Any] = [None] * len(keys)
    order = [(i, leaves[k]) for i, k in enumerate(keys)]
    lazy = grouped([(i, x) for i, x in order if isinstance(x, OutLeaf)])
    for i, x in [*lazy, *((i, x) for i, x in order if not isinstance(x, OutLeaf))]:
        out[i] = _place(keys[i], x, targets[i])
    return out


def _flat(tree: Any) -> tuple[list[str], list[Any]]:
    flat = flatten(tree, is_leaf=lambda x: isinstance(x, OutLeaf) or is_target_leaf(x))
    return flat.paths, flat.leaves


def _paths(tree: Any) -> list[str]:
    return _flat(tree)[0]


def _place(key: str, leaf: Any, target: Any) -> Any:
    if is_array(leaf):  # made by numpy-style code: checked like any other
        leaf = OutLeaf(tuple(leaf.shape), np.dtype(leaf.dtype), lambda a=leaf: np.asarray(a))
    if not isinstance(leaf, OutLeaf):
        return leaf
    shape = getattr(target, "shape", None)
    if shape is not None and tuple(shape) != leaf.shape:
        raise TargetMismatchError(
            f"{key!r}: the converted array has shape {leaf.shape}, the target wants "
            f"{tuple(shape)} (is scan_axis the model's layer axis?)"
        )
    check_cast(key, leaf.dtype, target, False)
    return place_array(key, leaf.make(), target)
