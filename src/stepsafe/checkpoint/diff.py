"""What changed between two checkpoints: keys added or removed, shape/dtype changes, inline
values, arrays whose bytes differ, and optionally how far apart the arrays' values are.

The structural diff reads the two manifests only; so does the content check, which compares
the chunks' checksums of arrays saved with the same shard and chunk layout (a different
layout, e.g. another data file size, leaves the question to ``values=True``). ``values=True``
reads both checkpoints, one array pair at a time and compares them in blocks, so memory stays
near the two biggest arrays (never both trees), whatever the checkpoints' size.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stepsafe import knobs
from stepsafe.checkpoint.orbax_locate import NOT_STEPSAFE, orbax_for
from stepsafe.checkpoint.restore import open_checkpoint
from stepsafe.errors import UnsupportedFormatError
from stepsafe.format import ArrayEntry, CheckpointReader
from stepsafe.tree import structure_paths

Progress = Callable[[int, int], None]  # (arrays compared, arrays to compare)


@dataclass(frozen=True)
class LeafDesc:
    """An array (dtype, shape) or an inline value, as one side of the diff sees it."""

    dtype: str | None = None
    shape: tuple[int, ...] | None = None
    value: Any = None

    def __str__(self) -> str:
        if self.dtype is None:
            return f"value {self.value!r}"
        return f"{self.dtype}{list(self.shape or ())}"


@dataclass(frozen=True)
class Change:
    key: str
    before: LeafDesc
    after: LeafDesc


@dataclass(frozen=True)
class ValueDiff:
    """``max_abs_diff``: max |a - b| over the array (NaN where either side is NaN at the same
    place counts as equal); None for non-numeric dtypes, where ``equal`` alone is meaningful."""

    key: str
    max_abs_diff: float | None
    equal: bool


@dataclass
class CheckpointDiff:
    a: str
    b: str
    added: dict[str, LeafDesc] = field(default_factory=dict)
    removed: dict[str, LeafDesc] = field(default_factory=dict)
    changed: list[Change] = field(default_factory=list)
    same: int = 0  # leaves present on both sides with the same description
    contents_differ: list[str] = field(default_factory=list)  # arrays whose checksums differ
    contents_unknown: list[str] = field(default_factory=list)  # laid out differently: unknown
    values: list[ValueDiff] | None = None  # with values=True: every array pair of equal shape

    @property
    def structure_equal(self) -> bool:
        return not (self.added or self.removed or self.changed)


def _describe(reader: CheckpointReader) -> dict[str, LeafDesc]:
    m = reader.manifest
    out = {}
    for key in structure_paths(m.structure):
        if key in m.arrays:
            a = m.arrays[key]
            out[key] = LeafDesc(str(a.dtype), a.shape)
        else:
            out[key] = LeafDesc(value=m.values[key])
    return out


def diff(
    a: str, b: str, *, values: bool = False, progress: Progress | None = None
) -> CheckpointDiff:
    """Differences from checkpoint ``a`` to ``b``.

    Args:
        a (`str`): the "before" checkpoint, any path ``restore`` accepts.
        b (`str`): the "after" checkpoint.
        values (`bool`, defaults to `False`): also read both checkpoints and compare the values
            of every pair of arrays of one shape (max |a - b|), one pair at a time.
        progress (`Callable[[int, int], None]`, *optional*): called with (arrays compared,
            arrays to compare) after each pair, with ``values=True``.

    Returns:
        `CheckpointDiff`: keys ``added`` / ``removed``, ``changed`` dtypes, shapes or inline
        values, ``contents_differ`` (checksums differ) and ``contents_unknown`` (laid out
        differently), and with ``values=True`` a ``ValueDiff`` per array pair.

    Raises:
        CheckpointNotFoundError: ``a`` or ``b`` holds no checkpoint.
        IncompleteCheckpointError: ``a`` or ``b`` was never committed.
        CorruptCheckpointError: a manifest, or with ``values=True`` an array's bytes, is damaged.
        UnsupportedFormatError: a newer (or foreign) format version.

    Example:

    ```python
    from stepsafe.checkpoint.diff import diff

    d = diff("outputs/run1/checkpoints/100", "outputs/run1/checkpoints/200")
    print(d.structure_equal, d.contents_differ)
    ```
    """
    with _opened(a) as ra, _opened(b) as rb:
        return _diff(ra, rb, values, progress)


def _opened(path: str) -> CheckpointReader:
    """The stepsafe checkpoint at ``path``; one Orbax wrote is refused, saying what to do."""
    try:
        return open_checkpoint(path)
    except NOT_STEPSAFE as e:
        if orbax_for(str(path), e) is None:
            raise
        raise UnsupportedFormatError(
            f"{path} is an Orbax checkpoint: diff compares stepsafe checkpoints (convert it "
            "first: stepsafe convert SRC DST)"
        ) from None


def _diff(
    ra: CheckpointReader, rb: CheckpointReader, values: bool, progress: Progress | None
) -> CheckpointDiff:
    da, db = _describe(ra), _describe(rb)
    out = CheckpointDiff(ra.path, rb.path)
    for key, desc in db.items():
        if key not in da:
            out.added[key] = desc
    for key, desc in da.items():
        if key not in db:
            out.removed[key] = desc
        elif db[key] != desc:
            out.changed.append(Change(key, desc, db[key]))
        else:
            out.same += 1
            if desc.dtype is not None:
                verdict = _same_bytes(ra.manifest.arrays[key], rb.manifest.arrays[key])
                if verdict is False:
                    out.contents_differ.append(key)
                elif verdict is None:
                    out.contents_unknown.append(key)
    if values:
        pairs = [k for k, d in da.items() if _comparable(d, db.get(k))]
        out.values = []
        for i, key in enumerate(pairs):
            out.values.append(_compare(key, ra, rb))
            if progress is not None:
                progress(i + 1, len(pairs))
    return out


def _same_bytes(x: ArrayEntry, y: ArrayEntry) -> bool | None:
    """Whether two arrays hold the same bytes, from their chunks' checksums alone; None when
    their shards or chunks are cut differently, so that checksums cannot tell."""
    if len(x.shards) != len(y.shards):
        return None
    same = True
    for sx, sy in zip(x.shards, y.shards):
        if sx.index != sy.index or [c.length for c in sx.chunks] != [c.length for c in sy.chunks]:
            return None
        same = same and all(a.checksum == b.checksum for a, b in zip(sx.chunks, sy.chunks))
    return same


def _comparable(x: LeafDesc, y: LeafDesc | None) -> bool:
    """Both arrays of one shape: their values can be compared element by element."""
    return y is not None and x.dtype is not None and y.dtype is not None and x.shape == y.shape


def _compare(key: str, ra: CheckpointReader, rb: CheckpointReader) -> ValueDiff:
    x = ra.read_array(key).reshape(-1)
    y = rb.read_array(key).reshape(-1)
    if not (_numeric(ra.manifest.arrays[key]) and _numeric(rb.manifest.arrays[key])):
        return ValueDiff(key, None, bool(np.array_equal(x, y)))
    wide = np.complex128 if "c" in (x.dtype.kind, y.dtype.kind) else np.float64
    worst = 0.0
    block = knobs.DIFF_BLOCK_ELEMENTS  # float64 temporaries of 8 MiB per block by default
    for start in range(0, x.size, block):
        xs = x[start : start + block].astype(wide)
        ys = y[start : start + block].astype(wide)
        both_nan = np.isnan(xs) & np.isnan(ys)
        d = np.abs(xs - ys)
        d[both_nan] = 0.0
        m = float(d.max()) if d.size else 0.0
        if math.isnan(m) or m > worst:
            worst = m
        if math.isnan(worst):
            break
    return ValueDiff(key, worst, worst == 0.0)


def _numeric(entry: ArrayEntry) -> bool:
    try:
        np.zeros(1, entry.dtype).astype(np.complex128)
    except (TypeError, ValueError):
        return False
    return entry.dtype.kind not in "MmSUVO"
