"""Pytrees as flat lists of (key path, leaf) plus a JSON structure; knows nothing of bytes."""

from stepsafe.tree.flatten import (
    Flat,
    Structure,
    build_plain,
    check_structure,
    check_target_paths,
    flatten,
    structure_paths,
    subtree,
)
from stepsafe.tree.keypath import concat, is_under, join, split

__all__ = [
    "Flat",
    "Structure",
    "build_plain",
    "check_structure",
    "check_target_paths",
    "concat",
    "flatten",
    "is_under",
    "join",
    "split",
    "structure_paths",
    "subtree",
]
