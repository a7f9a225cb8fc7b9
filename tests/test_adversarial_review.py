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


def test_gc_never_deletes_a_users_dated_file_in_a_kept_step(tmp_path):
    ckpts = save_steps(tmp_path / "run", 1, 2)
    mine = ckpts / "2" / "eval.20241130.json"  # a date is 8 hex digits
    mine.write_text('{"accuracy": 0.9}')
    gc(str(tmp_path / "run"), keep=1)
    assert mine.read_text() == '{"accuracy": 0.9}'


def test_gc_keeps_an_old_step_holding_a_users_dated_file(tmp_path):
    ckpts = save_steps(tmp_path / "run", 1, 2)
    mine = ckpts / "1" / "notes.deadbeef.txt"
    mine.write_text("hand-written notes")
    gc(str(tmp_path / "run"), keep=1)
    assert mine.exists()


# -- gc counts a step without its data as intact -----------------------------------------------


def test_gc_keep_1_never_deletes_the_only_restorable_step_when_newest_lost_its_data(tmp_path):
    ckpts = save_steps(tmp_path / "run", 1, 2)
    for f in data_files(ckpts / "2"):
        f.unlink()  # the manifest names them: a listing (which gc makes anyway) shows they're gone
    gc(str(tmp_path / "run"), keep=1)
    assert (ckpts / "1").exists(), "the only step that restores was deleted"
    stepsafe.restore(str(ckpts / "1"))


def test_gc_keep_1_never_deletes_the_only_restorable_step_when_newest_is_truncated(tmp_path):
    ckpts = save_steps(tmp_path / "run", 1, 2)
    for f in data_files(ckpts / "2"):
        with open(f, "r+b") as fh:
            fh.truncate(1)
    gc(str(tmp_path / "run"), keep=1)
    assert (ckpts / "1").exists(), "the only step that restores was deleted"


# -- retention ignores what the manager's own restore found damaged -----------------------------


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


# -- a damaged marker on the newest step --------------------------------------------------------


def flip_metadata(step_dir: Path) -> None:
    p = step_dir / "_CHECKPOINT_METADATA"
    raw = bytearray(p.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    p.write_bytes(bytes(raw))


def test_resume_past_a_damaged_marker_logs_the_damaged_step(tmp_path, caplog):
    ckpts = tmp_path / "run" / "checkpoints"
    with manager(ckpts, keep=0) as m:
        for s in (1, 2):
            m.save(s, state(s))
    flip_metadata(ckpts / "2")
    with caplog.at_level("ERROR", logger="stepsafe"), manager(ckpts, keep=0) as m:
        step, _ = m.restore_newest(state(0))
    assert step == 1
    assert any("2" in r.getMessage() and r.levelname == "ERROR" for r in caplog.records)


def test_training_continues_after_resuming_past_a_damaged_marker(tmp_path):
    ckpts = tmp_path / "run" / "checkpoints"
    with manager(ckpts, keep=0) as m:
        for s in (1, 2):
            m.save(s, state(s))
    flip_metadata(ckpts / "2")
    damaged = sorted(p.read_bytes() for p in (ckpts / "2").rglob("*") if p.is_file())
    with manager(ckpts, keep=0) as m:
        step, _ = m.restore_newest(state(0))
        assert step == 1
        m.save(2, state(2))  # the trainer reaches step 2 again: must not raise
        m.save(3, state(3))
    assert (ckpts / "3").exists()
    assert sorted(p.read_bytes() for p in (ckpts / "2").rglob("*") if p.is_file()) == damaged


# -- the run lease ------------------------------------------------------------------------------


def test_a_closed_manager_does_not_save_into_a_run_another_manager_holds(tmp_path):
    from stepsafe.errors import RunInUseError, StepsafeError

    ckpts = tmp_path / "run" / "checkpoints"
    first = manager(ckpts, keep=1)
    first.save(1, state(1))
    first.close()
    second = manager(ckpts, keep=1)
    try:
        with pytest.raises((RunInUseError, StepsafeError)):
            first.save(2, state(2))
        assert not (ckpts / "2").exists()
    finally:
        second.close()


def test_a_manager_whose_lease_was_taken_over_does_not_save(tmp_path):
    import json
    import time

    from stepsafe.errors import RunInUseError

    ckpts = tmp_path / "run" / "checkpoints"
    m = manager(ckpts, keep=1)
    try:
        m.save(1, state(1))
        lease = json.loads((ckpts / "_LEASE").read_text())
        lease.update(host="another-host", pid=1, token="0123456789abcdef", renewed_unix=time.time())
        (ckpts / "_LEASE").write_text(json.dumps(lease))  # what a takeover of a stale lease writes
        with pytest.raises(RunInUseError):
            m.save(2, state(2))
        assert not (ckpts / "2").exists()
    finally:
        m.close()


_FORK_CHILD = """
import faulthandler, os, sys
import numpy as np
import stepsafe
from stepsafe.manager import CheckpointManager, ManagerOptions
root = sys.argv[1]
stepsafe.save(f"{root}/plain/1", {"w": np.ones(4)})  # starts the I/O pool in the parent
m = CheckpointManager(f"{root}/run/checkpoints", ManagerOptions(async_save=False,
                      save_interval_steps=1))
m.save(1, {"w": np.ones(4)})
pid = os.fork()
if pid == 0:
    faulthandler.dump_traceback_later(5, exit=True)  # a hang ends the child with exit 1
    mode = sys.argv[2]
    if mode == "plain":
        stepsafe.save(f"{root}/plain/2", {"w": np.ones(4)})
        os._exit(0)
    try:
        m.save(2, {"w": np.ones(4)})
    except stepsafe.StepsafeError:
        os._exit(3)  # refused: the lease is the parent's
    os._exit(4)  # saved into the parent's run
_, status = os.waitpid(pid, 0)
m.close()
sys.exit(os.waitstatus_to_exitcode(status))
"""


def _run_fork_child(tmp_path: Path, mode: str) -> int:
    import subprocess
    import sys

    script = tmp_path / "fork_child.py"
    script.write_text(_FORK_CHILD)
    r = subprocess.run(
        [sys.executable, str(script), str(tmp_path), mode], capture_output=True, timeout=60
    )
    return r.returncode


def test_save_in_a_forked_child_does_not_hang(tmp_path):
    assert _run_fork_child(tmp_path, "plain") == 0
    assert (tmp_path / "plain" / "2").exists()


def test_a_manager_in_a_forked_child_refuses_to_save(tmp_path):
    assert _run_fork_child(tmp_path, "manager") == 3
    assert not (tmp_path / "run" / "checkpoints" / "2").exists()


# -- restore's cast rule ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("saved", "target"),
    [
        (np.array([2**53 + 1], np.int64), np.zeros(1, np.float64)),
        (np.array([2**64 - 1], np.uint64), np.zeros(1, np.float64)),
        (2**53 + 1, 0.0),
    ],
    ids=["int64-array", "uint64-array", "python-int"],
)
def test_a_lossy_int_to_float_cast_needs_allow_cast(tmp_path, saved, target):
    from stepsafe.errors import TargetMismatchError

    stepsafe.save(tmp_path / "c", {"x": saved})
    with pytest.raises(TargetMismatchError):
        stepsafe.restore(tmp_path / "c", {"x": target})


# -- the manager's start-up clean-up deletes a user's directory ---------------------------------


def test_manager_start_keeps_a_users_step_named_directory(tmp_path):
    ckpts = save_steps(tmp_path / "run", 2)
    mine = ckpts / "1" / "export.1a2b3c4d.onnx"  # a content-hashed name, as many tools write
    mine.parent.mkdir()
    mine.write_text("an exported model")
    manager(ckpts, keep=0).close()
    assert mine.read_text() == "an exported model"


# -- a file name that is not UTF-8 ----------------------------------------------------------------


def test_a_file_name_that_is_not_utf8_does_not_crash_gc(tmp_path):
    import os
    import subprocess
    import sys

    ckpts = save_steps(tmp_path / "run", 1, 2)
    with open(os.fsencode(ckpts / "1") + b"/notes\xff.txt", "w") as f:
        f.write("a user's file, named in Latin-1")
    args = ["gc", tmp_path / "run", "--keep", "1", "--dry-run"]
    env = {**os.environ, "PYTHONIOENCODING": "utf-8", "COLUMNS": "200"}  # as under en_US.UTF-8
    stepsafe_cli = Path(sys.executable).with_name("stepsafe")
    r = subprocess.run([stepsafe_cli, *map(str, args)], capture_output=True, env=env, timeout=120)
    assert r.returncode == 0 and b"Traceback" not in r.stderr, r.stderr.decode(errors="replace")


# -- a deletion the file system refuses --------------------------------------------------------


def test_gc_refused_deletion_names_the_full_path(tmp_path):
    import shutil
    import subprocess

    from stepsafe.errors import DeletionError

    ckpts = save_steps(tmp_path / "run", 1, 2)
    items = ckpts / "1" / "items"
    chattr = shutil.which("chattr")
    if chattr is None or subprocess.run([chattr, "+i", str(items)]).returncode != 0:
        pytest.skip("needs chattr +i (root on ext4) to make a directory refuse deletion")
    try:
        with pytest.raises(DeletionError) as e:
            gc(str(tmp_path / "run"), keep=1)
        assert str(items) in str(e.value), str(e.value)
    finally:
        subprocess.run([chattr, "-i", str(items)])


# -- gc and a save still running for an older step -----------------------------------------------


def test_gc_keeps_the_temporary_of_a_live_writer_older_than_the_newest_step(tmp_path):
    import os
    import socket

    ckpts = save_steps(tmp_path / "run", 1, 3)
    # the temporary a resumed run (restored from 1, since 3 is damaged) is writing for step 2
    tmp = ckpts / f"2.stepsafe-tmp-{socket.gethostname()}-{os.getpid()}-abcd1234"
    (tmp / "items").mkdir(parents=True)
    (tmp / "items" / "process_0.00000.0123456789ab.data").write_bytes(b"\0" * 64)
    gc(str(tmp_path / "run"), keep=1)
    assert tmp.exists(), "the temporary of a save whose process is alive was deleted"


def test_a_crashed_run_restarted_in_a_new_container_resumes(tmp_path):
    import json
    import os
    import socket
    import time

    from stepsafe.manager.lease import Holder

    ckpts = save_steps(tmp_path / "run", 1)
    me = Holder.this_process()
    dead = {
        "host": socket.gethostname(), "pid": 1, "token": "fedcba9876543210",
        "renewed_unix": time.time(), "timeout_s": 2.0, "boot_id": me.boot_id,
        "pid_namespace": "pid:[4026531999]", "start_ticks": 1, "acquired": "",
    }  # fmt: skip
    (ckpts / "_LEASE").write_text(json.dumps(dead))  # the previous container's, never renewed
    m = manager(ckpts, keep=0)  # waits out the 2 s left, then takes the lease over
    try:
        assert json.loads((ckpts / "_LEASE").read_text())["pid"] == os.getpid()
    finally:
        m.close()


# -- what stepsafe train says when the run is in use ----------------------------------------------


def test_train_on_a_run_in_use_gives_no_hint_about_flags(tmp_path, capsys):
    from stepsafe.cli.main import main

    ckpts = tmp_path / "busy" / "checkpoints"
    holder = manager(ckpts, keep=0)  # another trainer on the run
    try:
        code = main(
            [
                "train", "--no-progress", f"base_output_directory={tmp_path}", "run_name=busy",
                "steps=2", "checkpoint_period=1", "emb_dim=8", "mlp_dim=16",
                "max_target_length=8", "per_device_batch_size=1",
            ]
        )  # fmt: skip
    finally:
        holder.close()
    err = capsys.readouterr().err
    assert code == 6, err
    assert "in use" in err
    assert "flags are" not in err, err
