"""The bytes on disk never change meaning: a golden checksum and a checked-in format-v1 checkpoint.

``tests/data/format_v1/checkpoints/7`` was written once by stepsafe 0.1.0 (``python
tests/test_format_golden.py`` wrote it; it refuses to overwrite) from ``golden_tree()`` below,
which builds every value from literals and ``arange``. Whatever changes in the code, that
checkpoint must keep restoring to exactly these values and keep verifying: a changed checksum
algorithm, dtype name, byte order, structure encoding or metadata field breaks this test, not a
user's years-old checkpoint.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from iterators import Opaque
from trees import assert_bit_exact

import stepsafe
from stepsafe.format.checksum import ALGORITHM, checksum

FIXTURE = Path(__file__).parent / "data" / "format_v1"
STEP = 7
ITERATOR_STATE = {"position": 41, "epoch": 2, "shard": "train-00003-of-00008"}


def golden_tree() -> dict:
    """The saved state, from literals only: the same on every machine and numpy version."""
    return {
        "params": {
            "dense": {
                "kernel": np.arange(24, dtype=np.float32).reshape(4, 6) / 8,
                "bias": np.array([-1.5, 0.0, 2.25], np.float64),
            },
            "embed": (np.arange(12, dtype=np.float32).reshape(3, 4) - 5.5).astype(
                ml_dtypes.bfloat16
            ),
            "layers": [{"w": np.full((2, 3), i - 1, np.int8)} for i in range(3)],
        },
        "opt_state": (
            {"count": np.int32(7), "mu": np.linspace(-1, 1, 5, dtype=np.float16)},
            {"nu": np.array([[1, 2], [3, 4]], np.uint16)},
        ),
        "dtypes": {
            "bool": np.array([True, False, True]),
            "int64": np.array([-(2**63), -1, 2**40, 2**63 - 1], np.int64),
            "uint64": np.array([0, 2**64 - 1, 12345678901234567890], np.uint64),
            "complex64": np.array([1 + 2j, -3.5j], np.complex64),
            "float8_e4m3fn": np.array([0.5, -2.0, 448.0], ml_dtypes.float8_e4m3fn),
            "int4": np.array([-8, 7, 0, 3], ml_dtypes.int4),
            "special": np.array([np.inf, -np.inf, -0.0, np.nan], np.float32),
            "empty": np.zeros((0, 3), np.float32),
            "scalar": np.float64(1) / 3,
        },
        "step": 1234,
        "lr": 0.001,
        "name": "golden ✓ run",
        "nothing": None,
        "done": True,
    }


def test_checksum_is_xxh3_64_of_the_bytes():
    """Known digests: any other algorithm (or seed, or byte order) gives other strings."""
    assert ALGORITHM == "xxh3_64"
    assert checksum(b"") == "2d06800538d394c2"  # the reference XXH3_64bits("")
    assert checksum(b"stepsafe") == "267684b299f24804"
    data = np.arange(1 << 16, dtype=np.uint32)
    assert checksum(memoryview(data).cast("B")) == checksum(data.tobytes()) == "5cf7932f34744a8b"


@pytest.fixture
def golden(tmp_path) -> Path:
    """A copy of the checked-in checkpoint: nothing a test does may touch the original."""
    assert (FIXTURE / "checkpoints" / str(STEP) / "_CHECKPOINT_METADATA").is_file()
    shutil.copytree(FIXTURE, tmp_path / "format_v1")
    return tmp_path / "format_v1" / "checkpoints"


def test_checked_in_format_v1_checkpoint_restores_bit_exact(golden):
    path = golden / str(STEP)
    assert_bit_exact(stepsafe.restore(path), golden_tree())
    assert stepsafe.verify(str(path)).ok
    assert stepsafe.info(str(path)).step == STEP
    assert len(list((path / "items").glob("*.data"))) >= 3  # split over several data files


def test_checked_in_format_v1_checkpoint_resumes_a_run(golden):
    """The manager's view of it: latest step, the state onto a target, the iterator's place."""
    from stepsafe.manager import CheckpointManager, ManagerOptions

    with CheckpointManager(str(golden), ManagerOptions(async_save=False)) as m:
        assert m.all_steps() == [STEP]
        it = Opaque()
        out = m.restore(target=golden_tree(), data_iterator=it)
    assert_bit_exact(out, golden_tree())
    assert it.state == ITERATOR_STATE


def _write_fixture() -> None:
    from stepsafe.manager import CheckpointManager, ManagerOptions

    if FIXTURE.exists():
        sys.exit(f"{FIXTURE} exists: the fixture is written once; delete it only on purpose")
    opts = ManagerOptions(async_save=False, data_file_size_bytes=128)
    with CheckpointManager(str(FIXTURE / "checkpoints"), opts) as m:
        m.save(STEP, golden_tree(), data_iterator=Opaque(ITERATOR_STATE), force=True)
    print(f"wrote {FIXTURE}")


if __name__ == "__main__":
    _write_fixture()
