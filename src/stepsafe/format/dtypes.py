"""dtype <-> manifest string, from a closed list: a manifest can never ask for object arrays.

Plain numpy dtypes are written as ``dtype.str`` (byte order included: ``<f4``, ``|b1``,
``<U7``, ``<M8[ns]``); ml_dtypes extensions (bfloat16, float8_*, int4, ...) by their name, since
their ``.str`` is an anonymous ``V`` type.
"""

from __future__ import annotations

import functools
import re

import ml_dtypes
import numpy as np

from stepsafe.errors import ManifestError, UnsupportedLeafError

_ML_NAMES = [
    n
    for n in dir(ml_dtypes)
    if not n.startswith("_")
    and isinstance(getattr(ml_dtypes, n), type)
    and issubclass(getattr(ml_dtypes, n), np.generic)
]
_ML_BY_NAME = {n: np.dtype(getattr(ml_dtypes, n)) for n in _ML_NAMES}
_PLAIN = re.compile(r"^[<>|=]([biufc]\d{1,2}|[SU]\d{1,9}|[mM]8(\[\d*[a-zA-Z]+\])?)$")


@functools.lru_cache(maxsize=256)
def _name_of(dtype: np.dtype) -> str | None:
    if dtype.name in _ML_BY_NAME and _ML_BY_NAME[dtype.name] == dtype:
        return dtype.name
    s = dtype.str
    return s if dtype.kind in "biufcmMSU" and _PLAIN.match(s) else None


def dtype_to_str(dtype: np.dtype, where: str = "") -> str:
    name = _name_of(np.dtype(dtype))
    if name is None:
        raise UnsupportedLeafError(
            f"array at {where or '<root>'!r} has dtype {dtype} which stepsafe cannot save "
            "(object, structured and void dtypes are refused: they may hold code or pointers)"
        )
    return name


@functools.lru_cache(maxsize=256)
def dtype_from_str(s: str) -> np.dtype:
    if s in _ML_BY_NAME:
        return _ML_BY_NAME[s]
    if isinstance(s, str) and _PLAIN.match(s):
        return np.dtype(s)
    raise ManifestError(f"manifest names an unknown or unsafe dtype {s!r}")
