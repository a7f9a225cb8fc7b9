"""Runs on disk for the CLI and operator-tool tests: complete, incomplete and corrupted steps."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

import stepsafe
from stepsafe.format import CheckpointReader
from stepsafe.manager import CheckpointManager, ManagerOptions
from stepsafe.storage.local import LocalStorage


def state_at(step: int) -> dict:
    rng = np.random.default_rng(step)
    return {
        "step": step,
        "params": {
            "layers": {
                "mlp": {"kernel": rng.standard_normal((2, 8, 16)).astype(np.float32)},
                "norm": {"scale": np.ones((2, 8), np.float32)},
            },
            "embed": rng.standard_normal((32, 8)).astype(np.float32),
        },
        "opt_state": {"mu": rng.standard_normal((32, 8)).astype(np.float32)},
    }


def build_base(base: Path) -> Path:
    """``base/run1``: committed 10, 20, 30; an uncommitted 15 (marker gone), a stale temporary
    of step 5 and a possibly running one of step 40. ``base/run2``: committed 7."""
    d = base / "run1" / "checkpoints"
    with CheckpointManager(str(d), ManagerOptions(save_interval_steps=10, async_save=False)) as m:
        for step in (10, 20, 30):
            m.save(step, state_at(step), custom_metadata={"loss": step / 10})
    shutil.copytree(d / "10", d / "15")
    (d / "15" / "_CHECKPOINT_METADATA").unlink()
    (d / "5.stepsafe-tmp-elsewhere-1-abcd").mkdir()
    (d / "5.stepsafe-tmp-elsewhere-1-abcd" / "junk").write_bytes(b"x" * 100)
    (d / "40.stepsafe-tmp-elsewhere-2-ef01").mkdir()
    stepsafe.save(base / "run2" / "checkpoints" / "7", state_at(7))
    return base


def chunk_of(step_dir: Path, key: str) -> tuple[str, int, int]:
    """(data file name, offset, length) of the first chunk of array ``key``."""
    with CheckpointReader(LocalStorage(), str(step_dir)) as reader:
        c = reader.manifest.arrays[key].shards[0].chunks[0]
    return c.file, c.offset, c.length


def flip_byte(step_dir: Path, key: str, within: int = 3) -> tuple[Path, int]:
    """Flip one byte inside array ``key``'s first chunk; returns (file, chunk offset)."""
    name, offset, _ = chunk_of(step_dir, key)
    path = step_dir / "items" / name
    data = bytearray(path.read_bytes())
    data[offset + within] ^= 0xFF
    path.write_bytes(bytes(data))
    return path, offset
