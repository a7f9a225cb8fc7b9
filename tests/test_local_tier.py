"""The local tier (emergency checkpoints), one process: saves beside the persistent tier,
resumes from the newest step across tiers, falls back when the local disk is wiped or a local
step is damaged, keeps ``local_max_to_keep``, cleans a killed save's leftovers, and promotes
to the persistent tier in multi-tier mode. Real files; persistent tier on a local directory
here (buckets: test_local_tier_buckets.py)."""

from __future__ import annotations

import logging
import shutil
import socket

import numpy as np
import pytest
from iterators import Counter as Iterator

import stepsafe
from stepsafe.errors import ConfigError
from stepsafe.manager import CheckpointManager, ManagerOptions


def state_at(step: int) -> dict:
    return {"step": step, "params": {"w": np.full((4, 3), step, np.float32)}, "b": np.ones(2)}


def target() -> dict:
    return {"step": 0, "params": {"w": np.zeros((4, 3), np.float32)}, "b": np.zeros(2)}


def manager(tmp_path, **options) -> CheckpointManager:
    options = {
        "save_interval_steps": 10,
        "local_directory": str(tmp_path / "local" / "run"),
        "local_save_interval_steps": 2,
        "async_save": False,
        **options,
    }
    return CheckpointManager(str(tmp_path / "persistent"), ManagerOptions(**options))


def train(m: CheckpointManager, start: int, stop: int, it: Iterator | None = None) -> None:
    for step in range(start + 1, stop + 1):
        if it is not None:
            it.position = step * 7
        m.save(step, state_at(step), data_iterator=it)


def test_local_steps_beside_persistent_ones_and_retention_per_tier(tmp_path):
    with manager(tmp_path, async_save=True, max_to_keep=1) as m:
        train(m, 0, 23)
    with manager(tmp_path) as m:
        assert m.all_steps() == [20]
        assert m.local_steps() == [20, 22]  # local_max_to_keep=2 by default
        assert m.latest_step() == 22
    local = tmp_path / "local" / "run"
    assert sorted(p.name for p in local.iterdir()) == ["20", "22", "_LOCAL_TIER.json"]
    assert stepsafe.verify(str(local / "22")).ok


def test_resume_takes_the_newest_step_across_tiers_with_the_iterator(tmp_path, caplog):
    with manager(tmp_path) as m:
        train(m, 0, 15, Iterator())
    it = Iterator()
    with caplog.at_level(logging.INFO, "stepsafe"), manager(tmp_path) as m:
        step, state = m.restore_newest(target(), data_iterator=it)
    assert step == 14 and it.position == 14 * 7
    np.testing.assert_array_equal(state["params"]["w"], state_at(14)["params"]["w"])
    assert "from the local tier" in caplog.text and "newer than the persistent" in caplog.text


def test_a_wiped_local_directory_falls_back_to_the_persistent_tier(tmp_path, caplog):
    with manager(tmp_path) as m:
        train(m, 0, 15)
    shutil.rmtree(tmp_path / "local")
    with caplog.at_level(logging.INFO, "stepsafe"), manager(tmp_path) as m:
        assert m.latest_step() == 10
        step, state = m.restore_newest(target())
    assert step == 10 and state["step"] == 10
    assert "from the persistent tier" in caplog.text and "lost its local disk" in caplog.text


def test_a_corrupted_local_step_is_passed_by_loudly(tmp_path, caplog):
    with manager(tmp_path, local_max_to_keep=3) as m:
        train(m, 0, 15)
    newest = tmp_path / "local" / "run" / "14" / "items"
    data = next(p for p in newest.iterdir() if p.name.endswith(".data"))
    raw = bytearray(data.read_bytes())
    raw[0] ^= 0xFF
    data.write_bytes(bytes(raw))
    with caplog.at_level(logging.INFO, "stepsafe"), manager(tmp_path, local_max_to_keep=3) as m:
        step, state = m.restore_newest(target())
        assert step == 12 and state["step"] == 12
        assert "Local checkpoint at step 14 cannot be restored" in caplog.text
        assert any(r.levelno == logging.ERROR for r in caplog.records)
        train(m, 12, 14)  # step 14 again: the damaged one is moved aside, kept to inspect
        assert m.local_steps() == [10, 12, 14]
    (aside,) = (tmp_path / "local" / "run").glob("14.damaged-*")
    assert not stepsafe.verify(str(aside)).ok and "aside" in caplog.text


def test_steps_past_where_the_run_resumed_are_dropped_before_saving_again(tmp_path, caplog):
    with manager(tmp_path) as m:
        train(m, 0, 15)
    shutil.rmtree(tmp_path / "local" / "run" / "14")
    (tmp_path / "local" / "run" / "12" / "_CHECKPOINT_METADATA").write_text("garbage")
    with caplog.at_level(logging.WARNING, "stepsafe"), manager(tmp_path) as m:
        step, _ = m.restore_newest(target())
        assert step == 10
        train(m, step, 13)
        assert m.local_steps() == [12]  # saved again, from the resumed run


def test_a_killed_local_save_leaves_nothing_that_counts_and_is_cleaned(tmp_path):
    with manager(tmp_path) as m:
        train(m, 0, 4)
    local = tmp_path / "local" / "run"
    dead = local / f"6.stepsafe-tmp-{socket.gethostname()}-999999999-ab12"  # a killed save
    shutil.copytree(local / "4", dead)
    (dead / "_CHECKPOINT_METADATA").unlink()
    with manager(tmp_path) as m:
        assert m.local_steps() == [2, 4]
    assert not dead.exists()


def test_options_are_checked_with_their_flag_names(tmp_path):
    with pytest.raises(ConfigError, match="local_checkpoint_period"):
        ManagerOptions(local_directory=str(tmp_path))
    with pytest.raises(ConfigError, match="local_checkpoint_max_to_keep"):
        ManagerOptions(
            local_directory=str(tmp_path), local_save_interval_steps=1, local_max_to_keep=0
        )
    with pytest.raises(ConfigError, match="exactly one backup interval"):
        ManagerOptions(local_directory=str(tmp_path), local_save_interval_steps=1, multi_tier=True)
    with pytest.raises(ConfigError, match="multi_tier_checkpointing_backup_interval_steps"):
        ManagerOptions(
            local_directory=str(tmp_path), local_save_interval_steps=5, multi_tier=True,
            backup_interval_steps=2,
        )  # fmt: skip
    with pytest.raises(ConfigError, match="must be a local disk"):
        manager(tmp_path, local_directory="s3://bucket/run")


def test_multi_tier_saves_locally_and_promotes_at_the_backup_interval(tmp_path):
    with manager(tmp_path, multi_tier=True, backup_interval_steps=4, local_max_to_keep=1) as m:
        train(m, 0, 9)
        m.save(9, state_at(9), force=True)  # the last step: always promoted
    with manager(tmp_path) as m:
        assert m.all_steps() == [2, 6, 9]  # 2, then 4 steps on, then the forced last step
        assert m.local_steps() == [9]
    for step in (2, 6, 9):
        assert stepsafe.verify(str(tmp_path / "persistent" / str(step))).ok
        restored = stepsafe.restore(str(tmp_path / "persistent" / str(step)), target())
        np.testing.assert_array_equal(restored["params"]["w"], state_at(step)["params"]["w"])
    files = sorted(p.name for p in (tmp_path / "persistent" / "9" / "items").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "local" / "run" / "9" / "items").iterdir())


def test_a_damaged_local_step_is_never_promoted(tmp_path, caplog):
    options = {"local_save_interval_steps": 1, "backup_interval_steps": 5}
    with manager(tmp_path, multi_tier=True, async_save=True, **options) as m:
        train(m, 0, 2)  # step 1 promoted (the first), step 2 not yet due
        m.wait_until_finished()
        assert m.all_steps() == [1]
        data = next(p for p in (tmp_path / "local/run/2/items").iterdir() if p.suffix == ".data")
        data.write_bytes(b"\0" * data.stat().st_size)
        with caplog.at_level(logging.ERROR, "stepsafe"):
            m._promoter.offer(2)
            m.wait_until_finished()
        assert m.all_steps() == [1]
    assert "Promotion of local step 2" in caplog.text and "damaged" in caplog.text


def test_restore_of_a_step_only_the_local_tier_holds(tmp_path):
    with manager(tmp_path) as m:
        train(m, 0, 13, Iterator())
    it = Iterator()
    with manager(tmp_path) as m:
        state = m.restore(12, target(), data_iterator=it)
        assert state["step"] == 12 and it.position == 12 * 7
        w = m.restore(12, select="params")["w"]
        np.testing.assert_array_equal(w, state_at(12)["params"]["w"])
        assert m.restore(10, target())["step"] == 10  # in both tiers: the persistent one


def test_a_copy_checks_every_chunk_as_it_streams_and_commits_nothing_on_damage(tmp_path):
    from stepsafe.checkpoint.copy_step import copy_step
    from stepsafe.errors import ChecksumMismatchError
    from stepsafe.storage import storage_for

    state = {f"a{i}": np.full((64, 64), i, np.float32) for i in range(8)}
    stepsafe.save(str(tmp_path / "src"), state, data_file_size_bytes=40_000)
    storage, _ = storage_for(str(tmp_path))
    copied = copy_step(storage, str(tmp_path / "src"), storage, str(tmp_path / "ok"), step=None)
    assert stepsafe.verify(str(tmp_path / "ok")).ok and copied > 8 * 64 * 64 * 4
    files = sorted((tmp_path / "src" / "items").glob("*.data"))
    assert len(files) > 2
    raw = bytearray(files[-1].read_bytes())  # the last file: earlier ones stream first
    raw[100] ^= 1
    files[-1].write_bytes(bytes(raw))
    with pytest.raises(ChecksumMismatchError, match="does not match its checksum"):
        copy_step(storage, str(tmp_path / "src"), storage, str(tmp_path / "bad"))
    assert not (tmp_path / "bad").exists()
