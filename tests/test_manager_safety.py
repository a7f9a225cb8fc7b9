"""The run manager's safety: one writing manager per run (a lease), a pending save survives a
Ctrl+C while waiting for it, a resume skips a damaged newest step (left in place), and metadata
that cannot be stored fails at the call."""

from __future__ import annotations

import gc
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import BUCKET_KINDS
from iterators import Counter

import stepsafe
from stepsafe.checkpoint.run_layout import LEASE_FILE, step_of
from stepsafe.errors import (
    ChecksumMismatchError,
    CorruptCheckpointError,
    TruncatedDataError,
    UnsupportedLeafError,
)
from stepsafe.manager import CheckpointManager, ManagerOptions, load_initial_state
from stepsafe.manager.inventory import list_runs
from stepsafe.manager.lease import Holder, RunInUseError
from stepsafe.storage import storage_for

buckets = pytest.mark.parametrize("bucket_url", BUCKET_KINDS, indirect=True)
SYNC = ManagerOptions(save_interval_steps=1, async_save=False)


def state_at(step: int) -> dict:
    rng = np.random.default_rng(step)
    return {"step": step, "params": {"w": rng.standard_normal((32, 32)).astype(np.float32)}}


def child(code: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip


def read_line(p: subprocess.Popen) -> str:
    line = p.stdout.readline()
    assert line, p.stderr.read()
    return line.strip()


# -- 1. two managers on one run directory -----------------------------------------------------


def test_second_manager_on_a_run_is_refused_until_the_first_closes(tmp_path):
    d = str(tmp_path / "run" / "checkpoints")
    first = CheckpointManager(d, SYNC)
    first.save(1, state_at(1))
    with pytest.raises(RunInUseError) as e:
        CheckpointManager(d, SYNC)
    msg = str(e.value)
    assert "\n" not in msg and d in msg and f"pid {os.getpid()}" in msg and "this process" in msg
    assert "another run directory" in msg
    # the lease is no step: ls and gc pass it by
    assert step_of(storage_for(d)[0], LEASE_FILE) is None
    assert sorted(os.listdir(d)) == ["1", LEASE_FILE]
    assert [s.name for s in list_runs(str(tmp_path)).runs[0].steps] == ["1"]
    reader = CheckpointManager(d, ManagerOptions(enable_checkpointing=False))  # takes no lease
    assert reader.restore()["step"] == 1
    first.close()
    assert os.listdir(d) == ["1"]
    with CheckpointManager(d, SYNC) as second:
        second.save(2, state_at(2))
    assert second.all_steps() == [1, 2]


def test_garbage_collected_manager_releases_its_lease(tmp_path):
    m = CheckpointManager(str(tmp_path), SYNC)
    m.save(1, state_at(1))
    assert (tmp_path / LEASE_FILE).exists()
    del m
    gc.collect()
    assert not (tmp_path / LEASE_FILE).exists()
    with CheckpointManager(str(tmp_path), SYNC) as again:
        assert again.latest_step() == 1


HOLDER_CODE = """
import sys, time
from stepsafe.manager import CheckpointManager
m = CheckpointManager(sys.argv[1])
print("holding", flush=True)
time.sleep(600)
"""


def test_manager_of_another_process_is_refused_and_its_lease_freed_once_it_dies(tmp_path, caplog):
    p = child(HOLDER_CODE, str(tmp_path))
    try:
        assert read_line(p) == "holding"
        with pytest.raises(RunInUseError, match=rf"host {os.uname().nodename}, pid {p.pid}\b"):
            CheckpointManager(str(tmp_path), SYNC)
    finally:
        p.kill()
        p.communicate()
    caplog.set_level(logging.WARNING, logger="stepsafe")
    with CheckpointManager(str(tmp_path), SYNC) as m:  # a crashed run resumes at once
        m.save(1, state_at(1))
    assert f"process {p.pid} on" in caplog.text and "gone" in caplog.text


def write_lease(path: Path, **fields) -> None:
    doc = {"host": "otherhost", "pid": 4242, "token": "ab" * 8, "renewed_unix": time.time()}
    path.write_text(json.dumps({**doc, **fields}))


RENEWING_HOLDER_CODE = """
import json, os, sys, time
path = sys.argv[1]
while True:  # a manager on another host: it rewrites its lease (atomically) every 0.1 s
    doc = {"host": "otherhost", "pid": 4242, "token": "ab" * 8, "renewed_unix": time.time(),
           "timeout_s": 30.0}
    with open(path + ".tmp", "w") as f:
        json.dump(doc, f)
    os.replace(path + ".tmp", path)
    print("renewed", flush=True)
    time.sleep(0.1)
"""


def test_a_renewed_lease_of_another_host_is_refused(tmp_path):
    p = child(RENEWING_HOLDER_CODE, str(tmp_path / LEASE_FILE))
    try:
        assert read_line(p) == "renewed"
        with pytest.raises(RunInUseError, match=r"in use by host otherhost, pid 4242"):
            CheckpointManager(str(tmp_path), SYNC)  # refused once it sees a renewal
    finally:
        p.kill()
        p.communicate()
    assert Holder.parse((tmp_path / LEASE_FILE).read_bytes()).host == "otherhost"


def test_a_lease_of_another_host_not_renewed_is_taken_over_after_its_timeout(tmp_path, caplog):
    lease = tmp_path / LEASE_FILE
    caplog.set_level(logging.WARNING, logger="stepsafe")
    write_lease(lease, renewed_unix=time.time() - 3600)  # timed out long ago: at once
    with CheckpointManager(str(tmp_path), SYNC) as m:
        m.save(1, state_at(1))
    assert "not renewed for 3600 s" in caplog.text and "watching" not in caplog.text
    assert not lease.exists()
    caplog.clear()
    write_lease(lease, timeout_s=1.0)  # fresh, but never renewed: waited out, then taken
    with CheckpointManager(str(tmp_path), SYNC) as m:
        held = Holder.parse(lease.read_bytes())
        assert held is not None and held.pid == os.getpid()
        m.save(2, state_at(2))
    assert "watching for up to 1 s" in caplog.text
    assert re.search(r"Taking over the lease .* from host otherhost, pid 4242: waited", caplog.text)
    assert not lease.exists()


def test_a_lease_of_a_gone_process_of_this_host_is_taken_over_without_watching(tmp_path, caplog):
    me = Holder.this_process()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], text=True,
                          capture_output=True, check=True)  # fmt: skip
    write_lease(tmp_path / LEASE_FILE, host=me.host, pid=int(dead.stdout), boot_id=me.boot_id,
                pid_namespace=me.pid_namespace, timeout_s=3600.0)  # fmt: skip
    caplog.set_level(logging.WARNING, logger="stepsafe")
    with CheckpointManager(str(tmp_path), SYNC):
        pass
    assert "is gone" in caplog.text and "watching" not in caplog.text


def test_a_closed_manager_refuses_to_save(tmp_path):
    m = CheckpointManager(str(tmp_path), SYNC)
    m.save(1, state_at(1))
    m.close()
    with pytest.raises(RunInUseError, match="was closed"):
        m.save(2, state_at(2))
    assert m.all_steps() == [1] and not (tmp_path / LEASE_FILE).exists()


def test_manager_whose_lease_was_taken_over_stops_saving(tmp_path):
    m = CheckpointManager(str(tmp_path), SYNC)
    m.save(1, state_at(1))
    write_lease(tmp_path / LEASE_FILE)  # another host took it while this one was frozen
    m._lease.renew()
    with pytest.raises(RunInUseError, match="taken over by host otherhost"):
        m.save(2, state_at(2))
    m.close()
    assert m.all_steps() == [1]
    assert Holder.parse((tmp_path / LEASE_FILE).read_bytes()).host == "otherhost"  # not ours


def test_a_lease_deleted_by_hand_is_written_again_at_the_next_renewal(tmp_path):
    with CheckpointManager(str(tmp_path), SYNC) as m:
        (tmp_path / LEASE_FILE).unlink()
        m.save(1, state_at(1))  # not refused: no other manager holds the run
        m._lease.renew()
        assert Holder.parse((tmp_path / LEASE_FILE).read_bytes()).pid == os.getpid()


FORK_CODE = """
import faulthandler, os, sys, threading
from stepsafe.storage import budget, dispatch
budget.IN_FLIGHT.acquire(budget.IN_FLIGHT.limit)  # a transfer of the parent's, never done
held, go = threading.Event(), threading.Event()
def hold():  # a parent's thread inside dispatch's lock at the fork
    with dispatch._lock:
        held.set()
        go.wait()
threading.Thread(target=hold, daemon=True).start()
held.wait()
pid = os.fork()
if pid == 0:
    faulthandler.dump_traceback_later(5, exit=True)  # a hang ends the child with exit 1
    budget.IN_FLIGHT.acquire(1)
    dispatch.remote_storage("memory")
    os._exit(0)
go.set()
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def test_a_forked_child_does_not_wait_on_its_parents_transfers_or_locks(tmp_path):
    r = subprocess.run([sys.executable, "-c", FORK_CODE], capture_output=True, text=True,
                       timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stderr


def test_renewal_keeps_the_lease_fresh(tmp_path):
    with CheckpointManager(str(tmp_path), SYNC) as m:
        before = Holder.parse((tmp_path / LEASE_FILE).read_bytes())
        m._lease.renew()
        after = Holder.parse((tmp_path / LEASE_FILE).read_bytes())
        assert after.token == before.token and after.renewed_unix > before.renewed_unix
        assert sorted(os.listdir(tmp_path)) == [LEASE_FILE]  # no renewal temporaries left


@pytest.mark.parametrize("kind", ["text", "fifo", "symlink"])
def test_a_lease_name_stepsafe_did_not_write_is_refused_and_kept(tmp_path, kind):
    lease = tmp_path / LEASE_FILE
    if kind == "text":
        lease.write_text("my notes")
    elif kind == "fifo":
        os.mkfifo(lease)  # reading it must not hang
    else:
        (tmp_path / "elsewhere").write_text("{}")
        lease.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(RunInUseError, match=re.escape(str(lease))):
        CheckpointManager(str(tmp_path), SYNC)
    assert lease.is_symlink() if kind == "symlink" else lease.exists()


def test_an_empty_lease_left_by_a_crash_is_replaced(tmp_path, caplog):
    (tmp_path / LEASE_FILE).write_bytes(b"")  # killed between creating and writing it
    caplog.set_level(logging.WARNING, logger="stepsafe")
    with CheckpointManager(str(tmp_path), SYNC) as m:
        m.save(1, state_at(1))
    assert "empty lease" in caplog.text


def test_unwritable_run_directory_is_a_clear_error(tmp_path):
    (tmp_path / "run").write_bytes(b"a file where the run directory should be")
    d = str(tmp_path / "run" / "checkpoints")
    with pytest.raises(stepsafe.StepsafeError, match=rf"{re.escape(d)}: cannot write its lease"):
        CheckpointManager(d, SYNC)
    CheckpointManager(d, ManagerOptions(enable_checkpointing=False))  # reading needs none


@buckets
def test_second_manager_on_a_bucket_run_is_refused(bucket_url):
    d = f"{bucket_url}/run/checkpoints"
    storage, _ = storage_for(d)
    first = CheckpointManager(d, SYNC)
    first.save(1, state_at(1))
    with pytest.raises(RunInUseError, match=rf"{re.escape(d)} is in use by .*pid {os.getpid()}\b"):
        CheckpointManager(d, SYNC)
    first._lease.renew()  # overwrites the object in place
    assert first._lease.lost is None
    first.close()
    assert storage.list_dir(d) == ["1"]
    with CheckpointManager(d, SYNC) as second:
        second.save(2, state_at(2))
        assert storage.list_dir(d) == ["1", "2", LEASE_FILE]
    assert second.all_steps() == [1, 2]


# -- 2. Ctrl+C while waiting for a background save ---------------------------------------------

INTERRUPTED_WAIT_CODE = """
import os, sys, time
import numpy as np
import stepsafe.manager.manager as manager_module
from stepsafe.manager import CheckpointManager, ManagerOptions

directory, gate, mode = sys.argv[1:4]
real_write = manager_module.write

def gated_write(*args, **kwargs):  # a slow writer: it starts once the parent opens the gate
    while not os.path.exists(gate):
        time.sleep(0.01)
    real_write(*args, **kwargs)

manager_module.write = gated_write
m = CheckpointManager(directory, ManagerOptions(save_interval_steps=1, async_save=True))
m.save(1, {"w": np.arange(1 << 22, dtype=np.float32)})
try:
    print("waiting", flush=True)
    m.wait_until_finished()
except KeyboardInterrupt:
    print("interrupted", flush=True)
    if mode == "exit":
        raise
m.wait_until_finished()
print("finished", m.all_steps(), flush=True)
"""


def interrupt_while_waiting(tmp_path, mode: str) -> tuple[subprocess.Popen, Path]:
    gate = tmp_path / "gate"
    p = child(INTERRUPTED_WAIT_CODE, str(tmp_path / "ckpt"), str(gate), mode)
    assert read_line(p) == "waiting"
    main_thread = Path(f"/proc/{p.pid}/task/{p.pid}/stat")
    while main_thread.read_text().rsplit(")", 1)[1].split()[0] != "S":
        time.sleep(0.01)  # until it blocks in the wait
    p.send_signal(signal.SIGINT)
    assert read_line(p) == "interrupted"
    return p, gate


def assert_step_1_committed(tmp_path) -> None:
    out = stepsafe.restore(tmp_path / "ckpt" / "1")
    np.testing.assert_array_equal(out["w"], np.arange(1 << 22, dtype=np.float32))


def test_interrupted_wait_keeps_the_pending_save_and_waits_again(tmp_path):
    p, gate = interrupt_while_waiting(tmp_path, "catch")
    gate.touch()
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    assert out.strip() == "finished [1]"
    assert_step_1_committed(tmp_path)


def test_process_exiting_after_an_interrupted_wait_still_commits(tmp_path):
    p, gate = interrupt_while_waiting(tmp_path, "exit")
    with pytest.raises(subprocess.TimeoutExpired):
        p.wait(timeout=1)  # the interpreter waits for the save, which waits for the gate
    gate.touch()
    _, err = p.communicate(timeout=120)
    assert "KeyboardInterrupt" in err
    assert_step_1_committed(tmp_path)
    assert os.listdir(tmp_path / "ckpt") == ["1"]  # the lease released at exit, nothing else


# -- 3. resume past a damaged newest step ------------------------------------------------------


def damage(step_dir: Path, how: str) -> None:
    items = step_dir / "items"
    (data,) = items.glob("process_0.*.data")
    if how == "flip":
        raw = bytearray(data.read_bytes())
        raw[len(raw) // 2] ^= 0x40
        data.write_bytes(bytes(raw))
    elif how == "truncate":
        data.write_bytes(data.read_bytes()[:-100])
    else:
        (manifest,) = items.glob("manifest.*.json")
        if how == "manifest":
            manifest.write_bytes(manifest.read_bytes().replace(b'"', b"'", 1))
        else:
            manifest.unlink()


@pytest.mark.parametrize(
    ("how", "error"),
    [
        ("flip", ChecksumMismatchError),
        ("truncate", TruncatedDataError),
        ("manifest", ChecksumMismatchError),
        ("no manifest", TruncatedDataError),
    ],
)
def test_resume_falls_back_past_a_damaged_newest_step_and_leaves_it(tmp_path, caplog, how, error):
    d = tmp_path / "run" / "checkpoints"
    with CheckpointManager(str(d), SYNC) as m:
        for step in (1, 2, 3):
            it = Counter()
            it.position = step * 10
            m.save(step, state_at(step), data_iterator=it)
    damage(d / "3", how)
    before = {p: p.read_bytes() for p in (d / "3").rglob("*") if p.is_file()}
    assert before  # what is left of step 3 is kept as it is

    caplog.set_level(logging.INFO, logger="stepsafe")
    with CheckpointManager(str(d), SYNC) as m:
        it = Counter()
        loaded = load_initial_state(m, state_at(0), data_iterator=it)
        assert loaded.source == "resume" and loaded.path == str(d / "2")
        assert loaded.state["step"] == 2 and it.position == 20
        np.testing.assert_array_equal(loaded.state["params"]["w"], state_at(2)["params"]["w"])
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert any("step 3" in e and "damaged" in e and "left in place" in e for e in errors)
        assert m.restore()["step"] == 2
        with pytest.raises(error):
            m.restore(3)  # asked for by name: the damage is raised
        caplog.clear()
        assert not m.save(3, state_at(3))  # never overwritten; said loudly
        assert "damaged" in caplog.text and caplog.records[-1].levelno == logging.ERROR
        assert m.save(4, state_at(4))
    assert {p: p.read_bytes() for p in (d / "3").rglob("*") if p.is_file()} == before


def test_resume_when_every_step_is_damaged_is_an_error_not_a_fresh_start(tmp_path):
    with CheckpointManager(str(tmp_path), SYNC) as m:
        m.save(1, state_at(1))
    damage(tmp_path / "1", "flip")
    with (
        CheckpointManager(str(tmp_path), SYNC) as m,
        pytest.raises(CorruptCheckpointError, match=r"every committed .*\(steps 1\)"),
    ):
        load_initial_state(m, state_at(0))
    assert (tmp_path / "1" / "_CHECKPOINT_METADATA").exists()


# -- 4. metadata checked at the call -----------------------------------------------------------


@pytest.mark.parametrize("bad", [{"when": object()}, {"x": float}, ["not", "a", "dict"]])
def test_metadata_that_is_not_json_fails_at_the_call(tmp_path, bad):
    opts = ManagerOptions(save_interval_steps=1, async_save=True)
    with CheckpointManager(str(tmp_path), opts) as m:
        with pytest.raises(UnsupportedLeafError, match="metadata must be"):
            m.save(1, state_at(1), custom_metadata=bad)
        m.wait_until_finished()  # nothing failed in the background
        assert m.all_steps() == [] and os.listdir(tmp_path) == [LEASE_FILE]
        meta = {"lr": 0.1}
        m.save(1, state_at(1), custom_metadata=meta)
        meta["lr"] = "changed after the call"
    stored = json.loads((tmp_path / "1" / "_CHECKPOINT_METADATA").read_text())
    assert stored["custom_metadata"] == {"lr": 0.1}
