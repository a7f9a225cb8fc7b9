"""One strict comparison of trees for every test: same containers, same keys in the same order,
arrays with the same dtype, shape and bytes (NaN payloads included), equal scalars. A numpy
scalar may come back as a 0-d array (a restore without target does that)."""

from __future__ import annotations

import math
from typing import Any

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
