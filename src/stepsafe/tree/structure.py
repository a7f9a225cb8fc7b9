"""The JSON structure of a saved tree, read back without the tree itself.

Everything here treats the structure as untrusted input (it comes from a file): it is checked
iteratively with a depth limit before anything recurses over it, and rebuilding it never
imports or calls a user class.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from stepsafe.errors import ManifestError, TargetMismatchError
from stepsafe.tree import keypath
from stepsafe.tree.flatten import MAX_DEPTH, Structure

_ARITY = {"leaf": 1, "list": 2, "tuple": 2, "dict": 3, "namedtuple": 4, "node": 4}


def check_structure(structure: Any) -> None:
    """Refuse a JSON structure that is not well-formed (it comes from a file: checked
    iteratively, with a depth limit, before anything recurses over it).

    Raises:
        ManifestError: a node is malformed, or nesting is deeper than ``MAX_DEPTH``.
    """
    stack = [(structure, 0)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ManifestError(f"structure nested deeper than {MAX_DEPTH}")
        if not isinstance(node, list) or not node or _ARITY.get(node[0]) != len(node):
            raise ManifestError(f"malformed structure node {str(node)[:80]!r}")
        kind = node[0]
        if kind == "leaf":
            continue
        children = node[-1]
        keys = node[1] if kind == "dict" else node[2] if kind != "list" and kind != "tuple" else []
        if not isinstance(children, list) or not isinstance(keys, list):
            raise ManifestError(f"malformed {kind} node")
        if kind in ("namedtuple", "node") and not isinstance(node[1], str):
            raise ManifestError(f"{kind} node without a type name")
        if kind != "list" and kind != "tuple":
            ok = (str, int) if kind == "dict" else (str,)
            if len(keys) != len(children) or any(type(k) not in ok for k in keys):
                raise ManifestError(f"{kind} node with bad keys")
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
    raise ManifestError(f"unknown structure node {kind!r}")


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
