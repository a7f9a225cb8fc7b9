"""Conversion functions for ``convert.py``'s Hugging Face rows: the benchmark's stacked tree
(``params/decoder/layers/..`` with the layer axis at 1) <-> flat Hugging Face-style names.

    params/token_embedder/embedding            model.token_embedder.embedding
    params/decoder/layers/attn/q/kernel        model.decoder.layers.{i}.attn.q.kernel
      [emb, L, emb]                              [emb, emb], layer i of axis 1
    params/decoder/final_ln/scale              model.decoder.final_ln.scale

Names are the tree's keys joined by dots, each ``layers`` array split into its layers (the
unstacking is the work a real export does; a real architecture's renames and kernel
transposes are left out, so the rows measure the exporter and importer, not one model's
mapping). Both directions use ``stepsafe.convert.ops``, so nothing is read until it is
written: one stacked array (and one layer) in memory at a time. ``from_hf_numpy`` is the
same inverse with numpy, for the peer baseline that holds the model whole.

The Orbax rows' peer is orbax-checkpoint as MaxText drives it (``orbax_manager``,
``orbax_restore``, ``orbax_save``): a ``CheckpointManager`` with one PyTree item ``items``,
OCDBT + zarr3, arrays restored as numpy; saves synchronous (MaxText's default is async: a
conversion gains nothing from saving in the background, and on 1.33 GB here async was no
faster, slower on a loaded machine).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import numpy as np

AXIS = 1  # MaxText's param_scan_axis, the benchmark's layer axis
ITEM = "items"  # MaxText's one PyTree item
LAYERS = "layers"
_LAYER_NAME = re.compile(r"^model\.(?:(.+)\.)?layers\.(0|[1-9][0-9]*)\.(.+)$")


def to_hf(params: dict[str, Any]) -> dict[str, Any]:
    """The benchmark's ``params`` tree -> {Hugging Face-style name: weight}, every stacked
    weight unstacked lazily along ``AXIS``."""
    from stepsafe.convert import ops

    out: dict[str, Any] = {}
    for path, x in _leaves(params, ()):
        if LAYERS in path:
            k = path.index(LAYERS)
            head, tail = ".".join(("model", *path[:k])), ".".join(path[k + 1 :])
            for i, w in enumerate(ops.layers(x, axis=AXIS)):
                out[f"{head}.{LAYERS}.{i}.{tail}"] = w
        else:
            out[".".join(("model", *path))] = x
    return out


def from_hf(flat: dict[str, Any]) -> dict[str, Any]:
    """{Hugging Face-style name: weight} -> the benchmark's ``params`` tree, each weight's
    layers stacked back along ``AXIS`` lazily (``ops.stack``).

    Raises:
        ValueError: a weight's layers are not numbered 0 .. L-1.
    """
    from stepsafe.convert import ops

    return _rebuild(flat, lambda parts: ops.stack(parts, axis=AXIS))


def from_hf_numpy(flat: dict[str, np.ndarray]) -> dict[str, Any]:
    """``from_hf`` with ``np.stack``, taking the weights out of ``flat`` as it goes (the peer
    baseline: the whole model in memory, each stacked array made at once).

    Raises:
        ValueError: as ``from_hf``.
    """
    return _rebuild(flat, lambda parts: np.stack(parts, axis=AXIS), pop=True)


def orbax_manager(root: str, *, create: bool = False) -> Any:
    """orbax-checkpoint's ``CheckpointManager`` over ``root`` as MaxText makes it
    (``create_orbax_checkpoint_manager``): one PyTree item ``items``, OCDBT and zarr3 (MaxText's
    ``checkpoint_storage_use_ocdbt`` / ``_use_zarr3`` defaults); synchronous saves (MaxText's
    ``async_checkpointing=False``), no slower than async for a conversion."""
    import orbax.checkpoint as ocp

    handler = ocp.PyTreeCheckpointHandler(use_ocdbt=True, use_zarr3=True)
    options = ocp.CheckpointManagerOptions(create=create, enable_async_checkpointing=False)
    return ocp.CheckpointManager(
        root, item_names=(ITEM,), item_handlers={ITEM: handler}, options=options
    )


def orbax_restore(root: str, step: int = 0, only: str | None = None) -> dict[str, Any]:
    """Orbax's restore of ``root/<step>/items``, every array as numpy, the tree as saved (the
    whole of it in memory); ``only``: that leaf alone (keys joined by ``/``), every other one
    Orbax's ``PLACEHOLDER`` (a partial restore, which reads nothing else)."""
    import jax
    import orbax.checkpoint as ocp

    hole = ocp.PLACEHOLDER
    manager = orbax_manager(root)
    try:
        meta = manager.item_metadata(step)[ITEM]
        meta = getattr(meta, "tree", meta)
        if only is not None:
            meta = jax.tree_util.tree_map_with_path(
                lambda kp, m: m if _path(kp) == only else hole, meta
            )
        args = jax.tree.map(
            lambda m: m if m is hole else ocp.RestoreArgs(restore_type=np.ndarray),
            meta,
            is_leaf=lambda m: m is hole,
        )
        restore = ocp.args.PyTreeRestore(item=meta, restore_args=args)
        return manager.restore(step, args=ocp.args.Composite(**{ITEM: restore}))[ITEM]
    finally:
        manager.close()


def _path(keys: Any) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in keys)


def orbax_save(tree: dict[str, Any], root: str, step: int = 0) -> None:
    """Orbax's save of ``tree`` as ``root/<step>/items``, committed when it returns."""
    import orbax.checkpoint as ocp

    manager = orbax_manager(root, create=True)
    try:
        manager.save(step, args=ocp.args.Composite(**{ITEM: ocp.args.PyTreeSave(tree)}))
        manager.wait_until_finished()
    finally:
        manager.close()


def _rebuild(flat: dict[str, Any], stack: Any, *, pop: bool = False) -> dict[str, Any]:
    layered: dict[tuple[str, ...], dict[int, str]] = {}
    params: dict[str, Any] = {}
    for name in list(flat.keys()):
        m = _LAYER_NAME.match(name)
        if m is None:
            _put(params, tuple(name.split(".")[1:]), flat.pop(name) if pop else flat[name])
            continue
        head = tuple(m.group(1).split(".")) if m.group(1) else ()
        layered.setdefault((*head, LAYERS, *m.group(3).split(".")), {})[int(m.group(2))] = name
    for path, names in layered.items():
        if sorted(names) != list(range(len(names))):
            last = len(names) - 1
            raise ValueError(f"{'/'.join(path)}: layers {sorted(names)} are not 0..{last}")
        parts = [flat.pop(names[i]) if pop else flat[names[i]] for i in range(len(names))]
        _put(params, path, stack(parts))
    return params


def _leaves(node: Any, path: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], Any]]:
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _leaves(v, (*path, str(k)))
    else:
        yield path, node


def _put(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value
