"""What ``stepsafe inspect`` shows, as data: one checkpoint's arrays, their tree with subtree
totals (collapsible to a depth), totals per top-level group and its kind. Manifest only: no
array bytes are read, so it is as cheap on a 1 TB checkpoint in a bucket as on a toy."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from stepsafe.checkpoint.inspect import CheckpointInfo, SavedSharding, info
from stepsafe.checkpoint.kind import CheckpointKind, classify
from stepsafe.checkpoint.restore import open_checkpoint
from stepsafe.errors import CheckpointNotFoundError
from stepsafe.tree import split, structure_paths

SEP = "/"


@dataclass(frozen=True)
class ArrayInfo:
    key: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    sharding: SavedSharding | None = None  # as saved: JAX arrays with a NamedSharding


@dataclass(frozen=True)
class GroupTotal:
    """A top-level subtree (``params``, ``opt_state``, ...) or a top-level leaf (``step``)."""

    name: str
    num_arrays: int
    nbytes: int


@dataclass(frozen=True)
class TreeRow:
    """One line of the tree: a subtree (with totals) or a leaf (array or inline value).

    ``collapsed``: a subtree whose children are hidden by the depth limit.
    """

    key: str
    name: str
    level: int
    num_arrays: int
    nbytes: int
    dtype: str | None = None
    shape: tuple[int, ...] | None = None
    value: Any = None
    is_leaf: bool = False
    collapsed: bool = False
    sharding: SavedSharding | None = None


@dataclass(frozen=True)
class CheckpointSummary:
    info: CheckpointInfo
    arrays: list[ArrayInfo]  # in tree order
    values: dict[str, Any]  # inline leaves (ints, floats, strings, None)
    leaf_order: list[str]  # every leaf key, arrays and values, in tree order
    kind: CheckpointKind

    @property
    def groups(self) -> list[GroupTotal]:
        return [
            GroupTotal(r.name, r.num_arrays, r.nbytes) for r in self.tree(depth=1) if r.level == 0
        ]

    def tree(self, depth: int | None = None) -> list[TreeRow]:
        """Rows in tree order; levels ``0 .. depth-1`` only (None: all), deeper subtrees folded
        into their ancestor's totals."""
        arrays = {a.key: a for a in self.arrays}
        totals: dict[str, list[int]] = {}
        for key in self.leaf_order:
            raw = key.split(SEP)
            for i in range(1, len(raw)):
                t = totals.setdefault(SEP.join(raw[:i]), [0, 0])
                if key in arrays:
                    t[0] += 1
                    t[1] += arrays[key].nbytes
        rows: list[TreeRow] = []
        seen: set[str] = set()
        for key in self.leaf_order:
            raw = key.split(SEP)
            for i in range(1, len(raw)):
                prefix = SEP.join(raw[:i])
                if prefix in seen or (depth is not None and i > depth):
                    continue
                seen.add(prefix)
                n, b = totals[prefix]
                folded = depth is not None and i == depth
                rows.append(TreeRow(prefix, split(prefix)[-1], i - 1, n, b, collapsed=folded))
            level = len(raw) - 1
            if depth is not None and level >= depth:
                continue
            name = split(key)[-1]
            if key in arrays:
                a = arrays[key]
                rows.append(
                    TreeRow(
                        key,
                        name,
                        level,
                        1,
                        a.nbytes,
                        a.dtype,
                        a.shape,
                        is_leaf=True,
                        sharding=a.sharding,
                    )
                )
            else:
                rows.append(TreeRow(key, name, level, 0, 0, value=self.values[key], is_leaf=True))
        return rows


def summarize(path: str) -> CheckpointSummary:
    """Summary of the checkpoint ``path`` designates (a step, its items/, or a run: latest);
    of a checkpoint Orbax wrote too (through orbax-checkpoint)."""
    meta = info(path)
    if meta.format != "stepsafe":
        return _summarize_orbax(path)
    manifest = open_checkpoint(meta.path).manifest
    order = structure_paths(manifest.structure)
    arrays = [
        ArrayInfo(k, str(a.dtype), a.shape, a.nbytes, SavedSharding.from_record(a.sharding))
        for k in order
        if (a := manifest.arrays.get(k)) is not None
    ]
    kind = classify({a.key: a.shape for a in arrays}, list(manifest.values))
    return CheckpointSummary(meta, arrays, dict(manifest.values), order, kind)


def _summarize_orbax(path: str) -> CheckpointSummary:
    """The summary of a checkpoint Orbax wrote, from Orbax's metadata (its Python scalars and
    strings read, being values)."""
    from stepsafe.checkpoint.orbax_locate import find_orbax
    from stepsafe.checkpoint.orbax_read import open_orbax
    from stepsafe.checkpoint.orbax_restore import info_of

    found = find_orbax(path)
    if found is None:  # gone since info() found it
        raise CheckpointNotFoundError(f"{path}: the Orbax checkpoint is gone")
    with open_orbax(found) as ckpt:
        arrays = [
            ArrayInfo(k, str(ckpt.arrays[k][1]), ckpt.arrays[k][0], ckpt.nbytes(k))
            for k in ckpt.paths
            if k in ckpt.arrays
        ]
        values = dict(ckpt.values)
        kind = classify({a.key: a.shape for a in arrays}, list(values))
        return CheckpointSummary(info_of(ckpt), arrays, values, list(ckpt.paths), kind)
