"""Fresh host buffers mapped in bulk (``storage.host_memory``): what async snapshots of numpy
leaves copy into. They must behave as plain numpy arrays: writable, private, the right shape
and dtype, freed with their last view."""

from __future__ import annotations

import gc
import mmap
import weakref

import numpy as np
import pytest

from stepsafe import knobs
from stepsafe.arrays import StagingBuffers
from stepsafe.storage.host_memory import copy_of, empty


def _mapping(a: np.ndarray) -> mmap.mmap | None:
    base = a
    while base is not None and not isinstance(base, mmap.mmap):
        base = getattr(base, "base", None) if not isinstance(base, memoryview) else base.obj
    return base


def test_big_buffers_are_mappings_of_their_own_small_ones_numpys():
    big = empty((3, 1 << 20), np.float32)  # 12 MiB
    assert big.shape == (3, 1 << 20) and big.dtype == np.float32 and big.flags.c_contiguous
    assert big.flags.writeable and isinstance(_mapping(big), mmap.mmap)
    small = empty((10,), np.int64)
    assert _mapping(small) is None and small.shape == (10,)


def test_copy_of_is_private_and_bit_exact(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(knobs, "BULK_MAP_BYTES", 64)
    src = np.arange(1 << 16, dtype=np.float64).reshape(256, 256)[:, ::2]  # not contiguous
    out = copy_of(src)
    assert isinstance(_mapping(out), mmap.mmap) and out.flags.c_contiguous
    np.testing.assert_array_equal(out, src)
    src[:] = -1
    assert out[0, 1] == 2.0  # no memory shared with the source


def test_a_mapping_goes_back_with_its_last_view(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(knobs, "BULK_MAP_BYTES", 64)
    a = empty((1024,), np.uint8)
    view = a[10:20]
    ref = weakref.ref(_mapping(a))
    del a
    gc.collect()
    assert ref() is not None  # the view still holds it
    del view
    gc.collect()
    assert ref() is None


def test_staging_reuses_its_mapped_buffers(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(knobs, "BULK_MAP_BYTES", 64)
    staging = StagingBuffers()
    first = staging.copy("w", np.ones((64, 64), np.float32))
    second = staging.copy("w", np.full((64, 64), 2, np.float32))
    assert first is second and isinstance(_mapping(second), mmap.mmap)
    assert float(second.sum()) == 2 * 64 * 64
