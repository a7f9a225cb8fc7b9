"""One strict comparison of trees for every test: same containers, same keys in the same order,
arrays with the same dtype, shape and bytes (NaN payloads included), equal scalars. A numpy
scalar may come back as a 0-d array (a restore without target does that). And one tree of
awkward dtypes and sizes for tests that push whole saves through buffers (``odd_tree``)."""

from __future__ import annotations

import math
from typing import Any

import ml_dtypes
import numpy as np


def assert_bit_exact(got: Any, want: Any, where: str = "") -> None:
    if isinstance(want, dict):
        assert type(got) is type(want) and list(got) == list(want), where
        for k in want:
            assert_bit_exact(got[k], want[k], f"{where}/{k}")
    elif isinstance(want, list | tuple):
        assert type(got) is type(want) and len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            assert_bit_exact(g, w, f"{where}/{i}")
    elif isinstance(want, np.ndarray | np.generic):
        g, w = np.asarray(got), np.asarray(want)
        assert isinstance(got, np.ndarray) or not isinstance(want, np.ndarray), where
        assert (g.dtype, g.shape) == (w.dtype, w.shape), where
        assert g.tobytes() == w.tobytes(), where
    elif isinstance(want, float) and math.isnan(want):
        assert isinstance(got, float) and math.isnan(got), where
    else:
        assert type(got) is type(want) and got == want, where


def bit_exact(got: Any, want: Any) -> bool:
    """``assert_bit_exact`` as a truth value, for ``all(...)`` over many leaves."""
    try:
        assert_bit_exact(got, want)
    except AssertionError:
        return False
    return True


def odd_tree(seed: int, u8_bytes: int, nested: bool = True) -> dict:
    """Leaves of awkward dtypes (bfloat16, complex, int4, bool), sizes off every alignment, an
    empty array, a 0-d scalar, one uint8 array of ``u8_bytes`` (sized by the caller around its
    buffers) and, with ``nested``, a nested dict (flat trees suit tests that walk the leaves)."""
    rng = np.random.default_rng(seed)
    tree = {
        "f32": rng.standard_normal(200_003).astype(np.float32),
        "bf16": rng.standard_normal((301, 257)).astype(ml_dtypes.bfloat16),
        "c128": (rng.standard_normal(9_999) + 1j).astype(np.complex128),
        "i4": rng.integers(-8, 8, 70_001).astype(ml_dtypes.int4),
        "bool": rng.integers(0, 2, 65_537).astype(bool),
        "empty": np.zeros((0, 5), np.float32),
        "scalar": np.float64(2.5),
        "u8": rng.integers(0, 256, u8_bytes, dtype=np.uint8),
        "nested": {"i64": rng.integers(-(2**62), 2**62, 50_001, dtype=np.int64)},
    }
    if not nested:
        del tree["nested"]
    return tree
