"""Breaks an adversarial review found in the issue-11 fixes, each kept as a strict xfail.

Each test states the promise it checks; when the fix lands, the test starts to pass, the strict
xfail turns red, and the mark is removed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import stepsafe
from stepsafe.manager import CheckpointManager, ManagerOptions
from stepsafe.manager.gc import gc


def state(step: int) -> dict:
    return {"w": np.arange(64, dtype=np.float32) + step}


def save_steps(run: Path, *steps: int) -> Path:
    ckpts = run / "checkpoints"
    for s in steps:
        stepsafe.save(ckpts / str(s), state(s))
    return ckpts


def data_files(step_dir: Path) -> list[Path]:
    return sorted((step_dir / "items").glob("*.data"))


def manager(ckpts: Path, keep: int) -> CheckpointManager:
    opts = ManagerOptions(async_save=False, save_interval_steps=1, max_to_keep=keep)
    return CheckpointManager(str(ckpts), opts)


# -- gc deletes a user's file --------------------------------------------------------------------


@pytest.mark.xfail(
    strict=True,
    reason="deletion.save_id_of takes any top-level <name>.<8-32 hex>.<ext> for a stepsafe extra "
    "file: a user's eval.20241130.json is deleted as a 'stray' of a kept step",
)
def test_gc_never_deletes_a_users_dated_file_in_a_kept_step(tmp_path):
    ckpts = save_steps(tmp_path / "run", 1, 2)
    mine = ckpts / "2" / "eval.20241130.json"  # a date is 8 hex digits
    mine.write_text('{"accuracy": 0.9}')
    gc(str(tmp_path / "run"), keep=1)
    assert mine.read_text() == '{"accuracy": 0.9}'


@pytest.mark.xfail(
    strict=True,
    reason="an older step holding a user's <name>.<hex>.<ext> file counts as all-ours and is "
    "deleted whole, the user's file with it",
)
def test_gc_keeps_an_old_step_holding_a_users_dated_file(tmp_path):
    ckpts = save_steps(tmp_path / "run", 1, 2)
    mine = ckpts / "1" / "notes.deadbeef.txt"
    mine.write_text("hand-written notes")
    gc(str(tmp_path / "run"), keep=1)
    assert mine.exists()


# -- gc counts a step without its data as intact -----------------------------------------------


@pytest.mark.xfail(
    strict=True,
    reason="inventory counts a step whose data files are missing as Complete (only marker and "
    "manifest are opened), so gc --keep 1 deletes every intact older step",
)
def test_gc_keep_1_never_deletes_the_only_restorable_step_when_newest_lost_its_data(tmp_path):
    ckpts = save_steps(tmp_path / "run", 1, 2)
    for f in data_files(ckpts / "2"):
        f.unlink()  # the manifest names them: a listing (which gc makes anyway) shows they're gone
    gc(str(tmp_path / "run"), keep=1)
    assert (ckpts / "1").exists(), "the only step that restores was deleted"
    stepsafe.restore(str(ckpts / "1"))


@pytest.mark.xfail(
    strict=True,
    reason="a data file shorter than the manifest says is not noticed by gc (its size is "
    "listed anyway), so the only intact step is deleted",
)
def test_gc_keep_1_never_deletes_the_only_restorable_step_when_newest_is_truncated(tmp_path):
    ckpts = save_steps(tmp_path / "run", 1, 2)
    for f in data_files(ckpts / "2"):
        with open(f, "r+b") as fh:
            fh.truncate(1)
    gc(str(tmp_path / "run"), keep=1)
    assert (ckpts / "1").exists(), "the only step that restores was deleted"


# -- retention ignores what the manager's own restore found damaged -----------------------------


@pytest.mark.xfail(
    strict=True,
    reason="manager._apply_retention ignores self._damaged: the step restore_newest just skipped "
    "as damaged counts among the kept, so an intact step is deleted",
)
def test_retention_does_not_count_a_step_restore_found_damaged(tmp_path):
    ckpts = tmp_path / "run" / "checkpoints"
    with manager(ckpts, keep=2) as m:
        for s in (1, 2, 3):
            m.save(s, state(s))
    for f in data_files(ckpts / "3"):
        with open(f, "r+b") as fh:
            fh.seek(8)
            fh.write(b"\xff\xff\xff\xff")  # a flipped chunk: restore's checksum catches it
    with manager(ckpts, keep=2) as m:
        step, _ = m.restore_newest(state(0))
        assert step == 2
        m.save(4, state(4))
    # two intact steps kept (2 and 4); the damaged 3 left in place and not counted
    assert (ckpts / "2").exists()
    assert (ckpts / "3").exists()
