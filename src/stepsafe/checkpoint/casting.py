"""Which dtype casts a restore makes without being asked: only those that cannot change a
value. A checkpoint restored onto a target of another dtype is usually a mistake (a float32
model loading bfloat16 weights) unless the user asked for it; ``allow_cast=True`` says so.
"""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np

from stepsafe.errors import TargetMismatchError

_PYTHON_DTYPES = {bool: np.dtype(np.bool_), int: np.dtype(np.int64), float: np.dtype(np.float64)}


def target_dtype(target: Any, saved: np.dtype) -> np.dtype:
    """The dtype a target leaf asks for. A Python ``int`` holds any integer exactly."""
    kind = type(target)
    if kind is int and saved.kind in "biu":
        return saved
    return _PYTHON_DTYPES[kind] if kind in _PYTHON_DTYPES else np.dtype(target.dtype)


def value_dtype(value: Any) -> np.dtype:
    """An inline Python value's dtype for the cast rule: the smallest integer dtype that holds
    an int (object for one beyond 64 bits), float64 for a float, bool for a bool."""
    return np.min_scalar_type(value) if type(value) is int else np.asarray(value).dtype


def lossless(saved: np.dtype, wanted: np.dtype) -> bool:
    """Whether every value of ``saved`` survives a cast to ``wanted``: numpy's "safe" casts,
    less the integer-to-float ones it calls safe though the float's mantissa is shorter than
    the integer (int64 -> float64 turns 2**53 + 1 into 2**53)."""
    if not np.can_cast(saved, wanted, casting="safe"):
        return False
    if saved.kind in "iu" and wanted.kind in "fc":
        bits = saved.itemsize * 8 - (saved.kind == "i")
        try:
            mantissa = np.finfo(wanted).nmant + 1
        except ValueError:  # ml_dtypes' floats (bfloat16, float8): numpy has no finfo for them
            mantissa = ml_dtypes.finfo(wanted).nmant + 1
        return bits <= mantissa
    return True


def check_cast(key: str, saved: np.dtype, target: Any, allow_cast: bool) -> None:
    """Refuse a cast that could change values unless ``allow_cast`` (see ``restore``).

    Raises:
        TargetMismatchError: the cast is not ``lossless``.
    """
    wanted = target_dtype(target, saved)
    if allow_cast or saved == wanted or lossless(saved, wanted):
        return
    raise TargetMismatchError(
        f"{key!r}: the checkpoint holds {saved}, the target wants {wanted}, and that cast can "
        "change values: pass allow_cast=True to restore() to cast on purpose"
    )
