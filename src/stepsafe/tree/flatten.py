"""Pytree -> (structure, flat list of (key path, leaf)) and back.

The structure is plain JSON so that the manifest can describe the tree and rebuild it without
importing any user class (loading a checkpoint never runs code). When a live target tree is
given, its own containers (NamedTuples, dataclasses, optax states) are rebuilt instead, so the
structure round-trips exactly.

Structure nodes (JSON lists):
    ["dict", [keys], [children]]         keys are str or int, insertion order kept
    ["list", [children]] / ["tuple", [children]]
    ["namedtuple", "module.Name", [fields], [children]]
    ["node", "module.Name", [key strings], [children]]   any registered JAX pytree node
    ["leaf"]                                             the key path is its position
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from stepsafe.errors import TargetMismatchError, UnsupportedLeafError
from stepsafe.tree import keypath

Structure = list
LEAF: Structure = ["leaf"]


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

    def walk(x: Any, path: str) -> tuple[Structure, Callable[[Iterator[Any]], Any]]:
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
            built = [walk(x[k], keypath.join(path, str(k))) for k in keys]
            cls = type(x)
            return ["dict", keys, [s for s, _ in built]], lambda it: _make_dict(
                cls, keys, [b(it) for _, b in built]
            )
        if _is_namedtuple(x):
            fields = list(type(x)._fields)
            built = [walk(c, keypath.join(path, f)) for f, c in zip(fields, x)]
            cls = type(x)
            return ["namedtuple", _type_name(cls), fields, [s for s, _ in built]], lambda it: cls(
                *[b(it) for _, b in built]
            )
        if type(x) in (list, tuple):
            built = [walk(c, keypath.join(path, str(i))) for i, c in enumerate(x)]
            cls = type(x)
            return [cls.__name__, [s for s, _ in built]], lambda it: cls(b(it) for _, b in built)
        node = _jax_children(x)
        if node is not None:
            children, unflatten = node
            built = [walk(c, keypath.join(path, k)) for k, c in children]
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


MAX_DEPTH = 256
_ARITY = {"leaf": 1, "list": 2, "tuple": 2, "dict": 3, "namedtuple": 4, "node": 4}


def check_structure(structure: Any) -> None:
    """Raise ValueError unless ``structure`` is a well-formed JSON structure (it comes from a
    file: checked iteratively, with a depth limit, before anything recurses over it)."""
    stack = [(structure, 0)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ValueError(f"structure nested deeper than {MAX_DEPTH}")
        if not isinstance(node, list) or not node or _ARITY.get(node[0]) != len(node):
            raise ValueError(f"malformed structure node {str(node)[:80]!r}")
        kind = node[0]
        if kind == "leaf":
            continue
        children = node[-1]
        keys = node[1] if kind == "dict" else node[2] if kind != "list" and kind != "tuple" else []
        if not isinstance(children, list) or not isinstance(keys, list):
            raise ValueError(f"malformed {kind} node")
        if kind in ("namedtuple", "node") and not isinstance(node[1], str):
            raise ValueError(f"{kind} node without a type name")
        if kind != "list" and kind != "tuple":
            ok = (str, int) if kind == "dict" else (str,)
            if len(keys) != len(children) or any(type(k) not in ok for k in keys):
                raise ValueError(f"{kind} node with bad keys")
        stack.extend((c, depth + 1) for c in children)


def structure_paths(structure: Structure, prefix: str = "") -> list[str]:
    """The key paths of a JSON structure's leaves, in order."""
    out: list[str] = []
    _walk_structure(structure, prefix, lambda p: out.append(p))
    return out


def _children(node: Structure) -> list[tuple[str, Structure]]:
    kind = node[0]
    if kind == "dict":
        return [(str(k), c) for k, c in zip(node[1], node[2])]
    if kind in ("list", "tuple"):
        return [(str(i), c) for i, c in enumerate(node[1])]
    if kind in ("namedtuple", "node"):
        return list(zip(node[2], node[3]))
    if kind == "leaf":
        return []
    raise ValueError(f"unknown structure node {kind!r}")


def _walk_structure(node: Structure, path: str, on_leaf: Callable[[str], None]) -> None:
    if node[0] == "leaf":
        on_leaf(path)
        return
    for k, c in _children(node):
        _walk_structure(c, keypath.join(path, k), on_leaf)


def subtree(structure: Structure, path: str) -> Structure:
    """The structure node at ``path``; KeyError naming the first missing segment."""
    node = structure
    walked = ""
    for seg in keypath.split(path):
        match = [c for k, c in _children(node) if k == seg]
        if not match:
            raise KeyError(f"no key {seg!r} under {walked or '<root>'!r}")
        node = match[0]
        walked = keypath.join(walked, seg)
    return node


def build_plain(structure: Structure, leaf_value: Callable[[str], Any], prefix: str = "") -> Any:
    """Rebuild from JSON alone: dicts, lists and tuples as saved; NamedTuples and other
    registered nodes come back as dicts of their fields, since no user class is imported."""

    def build(node: Structure, path: str) -> Any:
        kind = node[0]
        if kind == "leaf":
            return leaf_value(path)
        kids = [build(c, keypath.join(path, k)) for k, c in _children(node)]
        if kind == "dict":
            return dict(zip(node[1], kids))
        if kind == "list":
            return kids
        if kind == "tuple":
            return tuple(kids)
        return dict(zip(node[2], kids))

    return build(structure, prefix)


def describe_mismatch(saved: list[str], wanted: list[str]) -> str:
    missing = [p for p in wanted if p not in set(saved)]
    extra = [p for p in saved if p not in set(wanted)]
    parts = []
    if missing:
        parts.append(f"target keys not in checkpoint: {_few(missing)}")
    if extra:
        parts.append(f"checkpoint keys not in target: {_few(extra)}")
    if not parts:
        parts.append("same keys in a different order")
    return "; ".join(parts)


def _few(items: list[str], n: int = 5) -> str:
    shown = ", ".join(repr(i) for i in items[:n])
    return shown + (f" and {len(items) - n} more" if len(items) > n else "")


def check_target_paths(saved: list[str], wanted: list[str]) -> None:
    if set(saved) != set(wanted):
        raise TargetMismatchError(
            "the target's tree does not match the checkpoint: " + describe_mismatch(saved, wanted)
        )
