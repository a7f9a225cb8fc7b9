"""The run manager: periods, retention under async saves, failures surfaced, loading priority."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from iterators import Counter

import stepsafe
from stepsafe.errors import ConfigError
from stepsafe.manager import (
    BackgroundSaveError,
    CheckpointManager,
    ManagerOptions,
    load_initial_state,
    run_checkpoint_dir,
)


def state_at(step: int) -> dict:
    rng = np.random.default_rng(step)
    return {
        "step": step,
        "params": {"w": rng.standard_normal((64, 64)).astype(np.float32)},
        "opt_state": {"mu": rng.standard_normal((64, 64)).astype(np.float32)},
    }


def test_layout_periods_and_metadata(tmp_path):
    d = run_checkpoint_dir(str(tmp_path), "run1")
    assert d == str(tmp_path / "run1" / "checkpoints")
    with CheckpointManager(d, ManagerOptions(save_interval_steps=3, async_save=False)) as m:
        started = [s for s in range(1, 10) if m.save(s, state_at(s), data_iterator=Counter())]
    assert started == [3, 6, 9] and m.all_steps() == [3, 6, 9]
    meta = json.loads((tmp_path / "run1/checkpoints/6/_CHECKPOINT_METADATA").read_text())
    assert meta["step"] == 6
    assert meta["commit_timestamp_nsecs"] >= meta["init_timestamp_nsecs"] > 0
    assert sorted(os.listdir(tmp_path / "run1/checkpoints/6")) == [
        "_CHECKPOINT_METADATA", "items", "iter"
    ]  # fmt: skip


def test_async_save_captures_state_before_returning(tmp_path):
    m = CheckpointManager(str(tmp_path), ManagerOptions(save_interval_steps=1, async_save=True))
    state = state_at(1)
    expected = state["params"]["w"].copy()
    m.save(1, state)
    state["params"]["w"][:] = -1  # the caller reuses its buffers at once
    m.wait_until_finished()
    np.testing.assert_array_equal(stepsafe.restore(tmp_path / "1")["params"]["w"], expected)


def test_retention_under_async_saves_never_drops_newest(tmp_path, caplog):
    """Whenever the caller looks, the step saved just before the one in flight is committed
    and restores, and only the newest steps are there (12 steps: "9" < "10" as strings)."""
    caplog.set_level(logging.INFO, logger="stepsafe")
    opts = ManagerOptions(save_interval_steps=1, async_save=True, max_to_keep=2)
    with CheckpointManager(str(tmp_path), opts) as m:
        for s in range(1, 13):
            assert m.save(s, state_at(s))
            seen = m.all_steps()  # step s may still be in flight, s - 1 is committed
            assert seen == sorted(seen) and set(seen) <= {s - 2, s - 1, s}, (s, seen)
            if s > 1:
                assert s - 1 in seen, (s, seen)
                latest = m.latest_step()
                assert latest in (s - 1, s)
                np.testing.assert_array_equal(
                    stepsafe.restore(tmp_path / str(latest))["params"]["w"],
                    state_at(latest)["params"]["w"],
                )
    assert m.all_steps() == [11, 12]
    # no other step, temporary or half-deleted step left behind (a lease file may be there)
    assert [n for n in sorted(os.listdir(tmp_path)) if n[:1].isdigit()] == ["11", "12"]
    assert "Saved checkpoint at step 12" in caplog.text and "blocked" in caplog.text
    for step in (11, 12):
        np.testing.assert_array_equal(
            stepsafe.restore(tmp_path / str(step))["params"]["w"], state_at(step)["params"]["w"]
        )


def test_failing_background_save_is_raised_not_swallowed(tmp_path):
    run = tmp_path / "run"
    m = CheckpointManager(str(run / "checkpoints"), ManagerOptions(save_interval_steps=1))
    shutil.rmtree(run, ignore_errors=True)
    run.write_bytes(b"not a directory")  # the background write cannot create its directory
    m.save(1, state_at(1))
    with pytest.raises(BackgroundSaveError, match="step 1"):
        m.wait_until_finished()
    m.wait_until_finished()  # raised once, then the manager is usable again


def test_failure_surfaces_at_next_save_too(tmp_path):
    run = tmp_path / "run"
    m = CheckpointManager(str(run / "checkpoints"), ManagerOptions(save_interval_steps=1))
    shutil.rmtree(run)  # the manager made it, for its lease
    run.write_bytes(b"x")
    m.save(1, state_at(1))
    with pytest.raises(BackgroundSaveError):
        m.save(2, state_at(2))


def test_disabled_checkpointing_saves_nothing(tmp_path):
    m = CheckpointManager(str(tmp_path / "c"), ManagerOptions(enable_checkpointing=False))
    assert not m.save(10000, state_at(1), force=True)
    assert not (tmp_path / "c").exists()


def test_restore_latest_with_iterator_and_incomplete_step_skipped(tmp_path):
    m = CheckpointManager(str(tmp_path), ManagerOptions(save_interval_steps=1, async_save=False))
    it = Counter()
    for s in (1, 2):
        it.position = s * 10
        m.save(s, state_at(s), data_iterator=it)
    (tmp_path / "3").mkdir()  # a step dir without commit marker
    (tmp_path / "4.stepsafe-tmp-otherhost-1-ab").mkdir()
    assert m.latest_step() == 2
    fresh = Counter()
    out = m.restore(target=state_at(0), data_iterator=fresh)
    assert out["step"] == 2 and fresh.position == 20


def test_iterator_state_is_covered_by_checksums(tmp_path):
    """The iterator's file is part of the checkpoint like any array: an edited byte is refused
    on restore and reported by verify, never fed silently to the data pipeline."""
    m = CheckpointManager(str(tmp_path), ManagerOptions(save_interval_steps=1, async_save=False))
    it = Counter()
    it.position = 1234
    m.save(1, state_at(1), data_iterator=it)
    (iter_file,) = (tmp_path / "1" / "iter").iterdir()
    assert iter_file.name == f"process_0.{stepsafe.info(str(tmp_path / '1')).save_id}.json"
    iter_file.write_bytes(iter_file.read_bytes().replace(b"1234", b"1235"))
    with pytest.raises(stepsafe.ChecksumMismatchError, match="process_0"):
        m.restore(1, target=state_at(0), data_iterator=Counter())
    problems = stepsafe.verify(str(tmp_path / "1")).problems
    assert [(p.kind, Path(p.file).name) for p in problems] == [("checksum", iter_file.name)]
    iter_file.unlink()
    with pytest.raises(stepsafe.TruncatedDataError, match="missing"):
        m.restore(1, target=state_at(0), data_iterator=Counter())


# -- loading priority (seed 000) ----------------------------------------------------------------


@pytest.fixture
def other_run(tmp_path):
    """A finished run elsewhere: a full state at step 7 and a params-only checkpoint."""
    stepsafe.save(tmp_path / "other/checkpoints/7", state_at(7))
    stepsafe.save(tmp_path / "params_only/0", {"params": state_at(7)["params"]})
    return tmp_path


def manager_for(tmp_path):
    return CheckpointManager(
        str(tmp_path / "this/checkpoints"), ManagerOptions(save_interval_steps=1, async_save=False)
    )


def test_priority_1_resume_beats_load_paths(other_run):
    m = manager_for(other_run)
    m.save(3, state_at(3))
    loaded = load_initial_state(
        m, state_at(0), load_full_state_path=str(other_run / "other/checkpoints/7")
    )
    assert loaded.source == "resume" and loaded.state["step"] == 3


@pytest.mark.parametrize(
    "path", ["other/checkpoints/7", "other/checkpoints/7/items", "other", "params_only/0"]
)
def test_priority_2_load_parameters_path(other_run, path):
    loaded = load_initial_state(
        manager_for(other_run), state_at(0), load_parameters_path=str(other_run / path)
    )
    assert loaded.source == "parameters" and set(loaded.state) == {"w"}
    np.testing.assert_array_equal(loaded.state["w"], state_at(7)["params"]["w"])


def test_priority_2_load_full_state_path(other_run):
    loaded = load_initial_state(
        manager_for(other_run), state_at(0), load_full_state_path=str(other_run / "other")
    )
    assert loaded.source == "full_state" and loaded.state["step"] == 7


def test_priority_2_both_paths_is_an_error_and_nothing_runs(other_run):
    m = manager_for(other_run)
    m.save(3, state_at(3))
    with pytest.raises(ConfigError, match="mutually exclusive"):
        load_initial_state(m, state_at(0), load_parameters_path="a", load_full_state_path="b")


def test_priority_3_scratch_and_incomplete_latest_is_skipped(other_run):
    m = manager_for(other_run)
    (other_run / "this/checkpoints/5").mkdir(parents=True)  # incomplete: never chosen
    assert load_initial_state(m, state_at(0)).source == "scratch"
    m.save(2, state_at(2))
    loaded = load_initial_state(m, state_at(0))
    assert loaded.source == "resume" and loaded.state["step"] == 2


def test_missing_load_path_is_a_clear_error(other_run):
    with pytest.raises(stepsafe.CheckpointNotFoundError, match="does not exist"):
        load_initial_state(
            manager_for(other_run), state_at(0), load_full_state_path=str(other_run / "nope")
        )
