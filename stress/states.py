"""The state saved at each step, derived from the step number alone.

A checker that knows only a step's number (and the size the trial chose) rebuilds exactly what
was saved there, so "committed but wrong" is a plain comparison, whichever process saved it.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from trees import assert_bit_exact  # tests/ is not a package: on sys.path above

DTYPES = [np.float32, ml_dtypes.bfloat16, np.int8, np.float64, np.uint16, np.int64]


def make_state(step: int, nbytes: int = 64 << 10) -> dict[str, Any]:
    """About ``nbytes`` of arrays of several dtypes plus inline leaves, all a function of
    ``step`` and ``nbytes`` (so two processes build the very same tree)."""
    rng = np.random.default_rng([step, nbytes])
    n_arrays = 12
    arrays = []
    for i, size in enumerate(rng.integers(1, max(2, 2 * nbytes // n_arrays), n_arrays)):
        dtype = np.dtype(DTYPES[i % len(DTYPES)])
        n = max(1, int(size) // dtype.itemsize // 4 * 4)
        a = np.frombuffer(rng.bytes(n * dtype.itemsize), dtype=dtype)
        arrays.append(a.reshape(4, -1) if i % 3 == 0 and n % 4 == 0 else a)
    return {
        "step": int(step),
        "params": {f"layer_{i}": a for i, a in enumerate(arrays[:6])},
        "opt_state": [{"mu": a, "count": np.int32(i)} for i, a in enumerate(arrays[6:])],
        "scalar": np.float64(step) / 3,
        "name": f"state-{step}",
    }


def difference(got: Any, want: Any) -> str | None:
    """None if ``got`` is bit-exact ``want``, else where they first differ."""
    try:
        assert_bit_exact(got, want)
    except AssertionError as e:
        return f"differs at {e or '/'}"
    return None


class Counter:
    """Step-numbered iterator whose position is part of the checkpoint (``iter/``)."""

    def __init__(self, position: int = 0) -> None:
        self.position = position

    def get_state(self) -> dict[str, int]:
        return {"position": self.position}

    def set_state(self, state: dict[str, int]) -> None:
        self.position = int(state["position"])
