"""Pytree -> (structure, flat list of (key path, leaf)) and back.

The structure is plain JSON so that the manifest can describe the tree and rebuild it without
importing any user class (loading a checkpoint never runs code). When a live target tree is
given, its own containers (NamedTuples, dataclasses, optax states) are rebuilt instead, so the
structure round-trips exactly.

Structure nodes (JSON lists):
    ["dict", [keys], [children]]         keys are str or int, insertion order kept
    ["list", [children]] / ["tuple", [children]]
    ["namedtuple", "module.Name", [fields], [children]]
    ["node", "module.Name", [key strings], [children]]   any registered JAX pytree node, and
                                                         typed PRNG keys (tree/jax_keys.py)
    ["leaf"]                                             the key path is its position
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from stepsafe.errors import UnsupportedLeafError
from stepsafe.tree import keypath
from stepsafe.tree.jax_keys import TYPE_NAME as KEY_TYPE_NAME
from stepsafe.tree.jax_keys import key_node

Structure = list
LEAF: Structure = ["leaf"]

# How deep a tree may nest (the root's children are at depth 1). Restore refuses deeper
# structures, since it reads them from untrusted files; save refuses them too, so that every
# checkpoint that saves can be restored, and checks it on the way down, before Python's own
# recursion limit (about 1000 frames) is near.
MAX_DEPTH = 256


@dataclass
class Flat:
    """A flattened tree: its JSON structure, its leaves in order, and how to rebuild it."""

    structure: Structure
    paths: list[str]
    leaves: list[Any]
    rebuild: Callable[[list[Any]], Any]


def _type_name(t: type) -> str:
    return f"{t.__module__}.{t.__qualname__}"


def _is_namedtuple(x: Any) -> bool:
    return isinstance(x, tuple) and hasattr(type(x), "_fields")


def _jax_children(x: Any) -> tuple[list[tuple[str, Any]], Callable[[list], Any]] | None:
    """One level of a registered JAX pytree node, or None when ``x`` is a JAX leaf."""
    jax = sys.modules.get("jax")
    if jax is None or isinstance(x, jax.Array):
        return None
    tu = jax.tree_util
    keyed, treedef = tu.tree_flatten_with_path(x, is_leaf=lambda y: y is not x)
    if tu.treedef_is_leaf(treedef):
        return None
    children = [(_jax_key_str(path[0]), child) for path, child in keyed]
    return children, lambda values: tu.tree_unflatten(treedef, values)


def _jax_key_str(k: Any) -> str:
    for attr in ("name", "key", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def flatten(tree: Any, *, is_leaf: Callable[[Any], bool]) -> Flat:
    """Flatten ``tree``; ``is_leaf`` decides what stops the descent (arrays, scalars)."""
    paths: list[str] = []
    leaves: list[Any] = []

    def walk(x: Any, path: str, depth: int = 0) -> tuple[Structure, Callable[[Iterator[Any]], Any]]:
        if depth > MAX_DEPTH:
            raise UnsupportedLeafError(
                f"the tree nests deeper than {MAX_DEPTH} levels at {path!r} (depth {depth}): "
                "stepsafe cannot restore trees that deep, so it does not save them; flatten "
                "the nesting (e.g. a dict keyed by 'a/b/c' strings)"
            )
        key = key_node(x)
        if key is not None:
            impl, data, make_key = key
            built_key = walk(data, keypath.join(path, impl), depth + 1)
            return ["node", KEY_TYPE_NAME, [impl], [built_key[0]]], (
                lambda it: make_key(built_key[1](it))
            )
        if is_leaf(x):
            paths.append(path)
            leaves.append(x)
            return LEAF, lambda it: next(it)
        if isinstance(x, dict):
            keys = list(x)
            for k in keys:
                if type(k) not in (str, int):
                    raise UnsupportedLeafError(
                        f"dict key {k!r} of type {type(k).__name__} under {path or '<root>'!r} "
                        "cannot be saved: use str or int keys"
                    )
            built = [walk(x[k], keypath.join(path, str(k)), depth + 1) for k in keys]
            cls = type(x)
            return ["dict", keys, [s for s, _ in built]], lambda it: _make_dict(
                cls, keys, [b(it) for _, b in built]
            )
        if _is_namedtuple(x):
            fields = list(type(x)._fields)
            built = [walk(c, keypath.join(path, f), depth + 1) for f, c in zip(fields, x)]
            cls = type(x)
            return ["namedtuple", _type_name(cls), fields, [s for s, _ in built]], lambda it: cls(
                *[b(it) for _, b in built]
            )
        if type(x) in (list, tuple):
            built = [walk(c, keypath.join(path, str(i)), depth + 1) for i, c in enumerate(x)]
            cls = type(x)
            return [cls.__name__, [s for s, _ in built]], lambda it: cls(b(it) for _, b in built)
        node = _jax_children(x)
        if node is not None:
            children, unflatten = node
            built = [walk(c, keypath.join(path, k), depth + 1) for k, c in children]
            return ["node", _type_name(type(x)), [k for k, _ in children], [s for s, _ in built]], (
                lambda it: unflatten([b(it) for _, b in built])
            )
        raise UnsupportedLeafError(
            f"leaf at {path or '<root>'!r} has type {_type_name(type(x))}, which stepsafe cannot "
            "save: use numpy/JAX arrays, Python int/float/bool/str/None, or containers of them "
            "(register custom classes as JAX pytree nodes)"
        )

    structure, build = walk(tree, "")
    _check_unique(paths)
    return Flat(structure, paths, leaves, lambda values: build(iter(values)))


def _make_dict(cls: type, keys: list, values: list) -> dict:
    d = dict(zip(keys, values))
    if cls is dict:
        return d
    try:
        return cls(d)
    except TypeError:  # e.g. defaultdict needs a factory: keep the plain dict
        return d


def _check_unique(paths: list[str]) -> None:
    if len(set(paths)) != len(paths):
        seen: set[str] = set()
        dup = next(p for p in paths if p in seen or seen.add(p))
        raise UnsupportedLeafError(
            f"two leaves share the key path {dup!r} (e.g. dict keys 1 and '1'): rename one"
        )
