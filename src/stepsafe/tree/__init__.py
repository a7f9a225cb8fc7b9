"""Pytrees as flat lists of (key path, leaf) plus a JSON structure; knows nothing of bytes."""

from stepsafe.tree.flatten import Flat, Structure, flatten
from stepsafe.tree.keypath import concat, join, split
from stepsafe.tree.structure import (
    build_plain,
    check_structure,
    check_target_paths,
    structure_paths,
    subtree,
)

__all__ = [
    "Flat",
    "Structure",
    "build_plain",
    "check_structure",
    "check_target_paths",
    "concat",
    "flatten",
    "join",
    "split",
    "structure_paths",
    "subtree",
]
