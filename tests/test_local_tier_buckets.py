"""The local tier with the persistent tier in a bucket (moto S3, fake-gcs-server on loopback),
one process: emergency resumes across tiers, multi-tier promotion (by steps and by minutes),
a promotion killed mid-copy, and a persistent step never overwritten by a second promotion.
The local tier is a tmp directory (test_local_tier.py: both tiers on local disk)."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from iterators import Counter as Iterator
from trees import assert_bit_exact

import stepsafe
from stepsafe import CheckpointExistsError
from stepsafe.checkpoint import committed_steps
from stepsafe.checkpoint.copy_step import copy_step
from stepsafe.cli.common import ExitCode
from stepsafe.cli.main import main
from stepsafe.format import COMMIT_FILE
from stepsafe.manager import CheckpointManager, ManagerOptions
from stepsafe.manager.gc import gc
from stepsafe.storage import storage_for

buckets = pytest.mark.parametrize("bucket_url", ["s3", "gcs"], indirect=True)


def state_at(step: int) -> dict[str, Any]:
    rng = np.random.default_rng(step)
    return {
        "step": step,
        "params": {
            "w": rng.standard_normal((64, 48)).astype(np.float32),
            "b": rng.standard_normal(48).astype(ml_dtypes.bfloat16),
        },
        "count": rng.integers(0, 1000, (7, 5)).astype(np.int64),
    }


def target() -> dict[str, Any]:
    return {
        "step": 0,
        "params": {"w": np.zeros((64, 48), np.float32), "b": np.zeros(48, ml_dtypes.bfloat16)},
        "count": np.zeros((7, 5), np.int64),
    }


def manager(url: str, local: str, **options: Any) -> CheckpointManager:
    return CheckpointManager(
        f"{url}/run/checkpoints",
        ManagerOptions(local_directory=local, **{"local_save_interval_steps": 2, **options}),
    )


def files_of(url: str) -> dict[str, bytes]:
    """Every file under ``url`` (a step, local or in a bucket): relative name -> bytes."""
    storage, root = storage_for(url)
    found: dict[str, bytes] = {}

    def walk(path: str, rel: str) -> None:
        for name in storage.list_dir(path):
            child = storage.join(path, name)
            if storage.is_dir(child):
                walk(child, f"{rel}{name}/")
            else:
                found[f"{rel}{name}"] = storage.read_bytes(child)

    walk(root, "")
    return found


# -- 1. emergency mode: local steps beside the bucket's ------------------------------------


@buckets
def test_emergency_resume_takes_the_newest_local_step_then_falls_back_to_the_bucket(
    bucket_url, tmp_path, caplog
):
    local = str(tmp_path / "local" / "run")
    with manager(bucket_url, local, save_interval_steps=10, local_save_interval_steps=3) as m:
        for step in range(1, 15):
            m.save(step, state_at(step))
    with manager(bucket_url, local, save_interval_steps=10, local_save_interval_steps=3) as m:
        assert m.all_steps() == [10] and m.local_steps() == [9, 12]
        assert m.latest_step() == 12
        with caplog.at_level(logging.INFO, "stepsafe"):
            step, state = m.restore_newest(target())
        assert step == 12 and m.restored_path == os.path.join(local, "12")
        assert_bit_exact(state, state_at(12))
        assert "from the local tier" in caplog.text
    shutil.rmtree(tmp_path / "local")
    caplog.clear()
    with manager(bucket_url, local, save_interval_steps=10, local_save_interval_steps=3) as m:
        assert m.latest_step() == 10 and m.local_steps() == []
        with caplog.at_level(logging.INFO, "stepsafe"):
            step, state = m.restore_newest(target())
        assert step == 10 and m.restored_path == m.step_path(10)
        assert m.restored_path.startswith(bucket_url)
        assert_bit_exact(state, state_at(10))
        assert "from the persistent tier" in caplog.text


# -- 2. multi-tier: saves local only, promotion copies them as they are --------------------


@buckets
def test_multi_tier_promotes_committed_local_steps_file_for_file(bucket_url, tmp_path):
    local = str(tmp_path / "local" / "run")
    opts = {"multi_tier": True, "backup_interval_steps": 4, "local_max_to_keep": 10}
    data = Iterator()
    with manager(bucket_url, local, **opts) as m:
        for step in range(1, 10):
            data.position = step * 7
            m.save(step, state_at(step), data_iterator=data, metrics={"loss": 1 / step})
        m.wait_until_finished()
        assert m.all_steps() == [2, 6]  # the first, then 4 steps on; never 4 or 8
        m.save(9, state_at(9), data_iterator=data, force=True)  # promoted whatever the interval
    steps = sorted(int(n) for n in os.listdir(local) if n.isdigit())
    assert steps == [2, 4, 6, 8, 9]
    run = f"{bucket_url}/run"
    data = Iterator()
    with manager(bucket_url, str(tmp_path / "other"), **opts) as m:
        assert m.all_steps() == [2, 6, 9]
        step, state = m.restore_newest(target(), data_iterator=data)  # no local step: bucket
        assert step == 9 and m.restored_path == m.step_path(9) and data.position == 63
        assert_bit_exact(state, state_at(9))
    for step in (2, 6, 9):
        url = f"{run}/checkpoints/{step}"
        assert stepsafe.verify(url).ok
        assert_bit_exact(stepsafe.restore(url, target()), state_at(step))
        assert files_of(url) == files_of(os.path.join(local, str(step)))  # names and bytes
    assert stepsafe.verify(run).ok and stepsafe.verify(run).step == 9
    assert main(["verify", run, "--no-progress"]) == 0


# -- 4. the backup interval in minutes -------------------------------------------------------


@buckets
def test_a_backup_interval_in_minutes_promotes_when_due(bucket_url, tmp_path):
    local = str(tmp_path / "local" / "run")
    opts = {"multi_tier": True, "local_save_interval_steps": 1, "async_save": False}
    with manager(bucket_url, local, backup_interval_minutes=0.001, **opts) as m:
        for step in (1, 2, 3):
            time.sleep(0.1)  # > 0.06 s since the last promotion (or the start): due
            m.save(step, state_at(step))
            m.wait_until_finished()
            assert m.all_steps() == list(range(1, step + 1))
    with manager(bucket_url, local, backup_interval_minutes=60, **opts) as m:
        m.restore_newest(target())
        m.save(4, state_at(4))
        m.save(5, state_at(5))
        m.wait_until_finished()
        assert m.all_steps() == [1, 2, 3] and m.local_steps() == [4, 5]  # not due for an hour
        m.save(6, state_at(6), force=True)
    with manager(bucket_url, str(tmp_path / "other"), backup_interval_minutes=60, **opts) as m:
        assert m.all_steps() == [1, 2, 3, 6]
        assert_bit_exact(m.restore(6, target()), state_at(6))


# -- 5. a persistent step is never overwritten ---------------------------------------------


@buckets
def test_a_step_already_in_the_bucket_is_never_overwritten_by_a_promotion(
    bucket_url, tmp_path, caplog
):
    local = str(tmp_path / "local" / "run")
    opts = {"multi_tier": True, "backup_interval_steps": 2, "async_save": False}
    with manager(bucket_url, local, **opts) as m:
        m.save(2, state_at(2))
        m.wait_until_finished()
        assert m.all_steps() == [2]
        bucket_step = m.step_path(2)
        before = files_of(bucket_step)
        with caplog.at_level(logging.INFO, "stepsafe"):
            m._promoter.offer(2)  # the same step again
            m.wait_until_finished()
        assert "Checkpoint at step 2 already exists; not saving it again" in caplog.text
        assert not m._promoter.failed
    assert files_of(bucket_step) == before
    # A run started over (not resumed) saves step 2 again with other values: the local step
    # is replaced, the bucket's is kept as it is.
    other = {**state_at(2), "count": np.full((7, 5), -1, np.int64)}
    caplog.clear()
    with caplog.at_level(logging.INFO, "stepsafe"), manager(bucket_url, local, **opts) as m:
        m.save(2, other, force=True)
        m.wait_until_finished()
        assert m.all_steps() == [2] and m.local_steps() == [2]
    assert "Checkpoint at step 2 already exists; not saving it again" in caplog.text
    assert files_of(bucket_step) == before
    assert_bit_exact(stepsafe.restore(bucket_step, target()), state_at(2))
    assert_bit_exact(stepsafe.restore(os.path.join(local, "2"), target()), other)
    storage, dst = storage_for(bucket_step)  # and copy_step itself refuses
    src_storage, src = storage_for(os.path.join(local, "2"))
    with pytest.raises(CheckpointExistsError):
        copy_step(src_storage, src, storage, dst)
    assert files_of(bucket_step) == before


@buckets
def test_promotion_beside_a_dead_copy_of_the_same_step_and_retention(bucket_url, tmp_path):
    """A copy of step 4 from another run's local step died in the bucket (its files, another
    save id, no marker); this run promotes its own step 4 beside them: committed, restorable;
    the dead files are strays that gc deletes. The persistent ``max_to_keep`` applies after
    each promotion."""
    ckpts = f"{bucket_url}/run/checkpoints"
    storage, _ = storage_for(ckpts)
    dead = storage.transaction(storage.join(ckpts, "4"))  # killed: never commits nor aborts
    dead.write_file("items/manifest.0123456789ab.json", [b"{}"])
    dead.write_file("items/process_0.00000.0123456789ab.data", [b"x" * 1000])
    local = str(tmp_path / "local" / "run")
    opts = {"multi_tier": True, "backup_interval_steps": 2, "async_save": False}
    with manager(bucket_url, local, max_to_keep=2, **opts) as m:
        for step in range(1, 5):
            m.save(step, state_at(step))
            m.wait_until_finished()
        assert m.all_steps() == [2, 4] and not m._promoter.failed
        assert_bit_exact(m.restore(4, target()), state_at(4))
        strays = sorted(n for n in files_of(m.step_path(4)) if "0123456789ab" in n)
        assert len(strays) == 2
        plan = gc(f"{bucket_url}/run", keep=2, dry_run=True)
        assert {s: len(p) for s, p in plan.strays.items()} == {4: 2}
        for step in (5, 6):
            m.save(step, state_at(step))
        m.wait_until_finished()
        assert m.all_steps() == [4, 6]  # max_to_keep=2 after the promotion of 6
    gc(f"{bucket_url}/run", keep=2)
    assert not any("0123456789ab" in n for n in files_of(f"{ckpts}/4"))
    assert stepsafe.verify(f"{ckpts}/4").ok and stepsafe.verify(f"{ckpts}/6").ok
    assert_bit_exact(stepsafe.restore(f"{ckpts}/4", target()), state_at(4))


# -- 3. a promotion killed mid-copy ----------------------------------------------------------

PROMOTE = """
import sys
import numpy as np
from stepsafe.manager import CheckpointManager, ManagerOptions
url, local, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
state = {"big": np.random.default_rng(5).standard_normal(size // 4).astype(np.float32),
         "step": 5}
options = ManagerOptions(local_directory=local, local_save_interval_steps=5, multi_tier=True,
                         backup_interval_steps=5, async_save=False)
m = CheckpointManager(url, options)
m.save(5, state)
m.close()
"""


def big_state(size: int) -> dict[str, Any]:
    return {
        "big": np.random.default_rng(5).standard_normal(size // 4).astype(np.float32),
        "step": 5,
    }


def copying(storage: Any, ckpts: str, step_dir: str) -> bool:
    """Whether the data file's upload has begun: on S3 a multipart upload is open (parts of
    8 MiB, see PROMOTE's environment); on GCS the manifest (copied first) is there, and a
    moment later the data file's resumable upload runs."""
    if ckpts.startswith("s3://"):
        return bool(storage.unfinished_uploads(ckpts))
    if storage.is_dir(step_dir) and storage.list_dir(step_dir):
        time.sleep(0.2)
        return True
    return False


def promote_and_kill(url: str, local: str, size: int) -> bool:
    """Run PROMOTE in a child and SIGKILL it once the copy of step 5 has begun (``copying``);
    whether the copy was really cut (no marker in the bucket), False when it had finished."""
    storage, ckpts = storage_for(url)
    step_dir = storage.join(ckpts, "5")
    env = {
        **os.environ,
        "STEPSAFE_SINGLE_UPLOAD_MAX": str(8 << 20),
        "STEPSAFE_PART_SIZE": str(8 << 20),
    }
    child = subprocess.Popen(
        [sys.executable, "-c", PROMOTE, url, local, str(size)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while child.poll() is None and time.monotonic() < deadline:
            if copying(storage, ckpts, step_dir):
                break
            time.sleep(0.005)
        child.send_signal(signal.SIGKILL)
        _, err = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    if child.returncode == 0:  # the copy finished before the kill: it proves nothing
        return False
    assert child.returncode == -signal.SIGKILL, err  # killed, not failed on its own
    assert committed_steps(*storage_for(local)) == [5], err  # the local step came first
    return not storage.exists(storage.join(step_dir, COMMIT_FILE))


@buckets
def test_a_promotion_killed_mid_copy_leaves_no_committed_step_and_is_cleaned(
    bucket_url, tmp_path, capsys, monkeypatch
):
    size = 64 << 20  # one 64 MiB data file: 8 uploads of 8 MiB
    for attempt in range(3):  # a copy that finished before the kill proves nothing: bigger
        local = str(tmp_path / f"local{attempt}" / "run")
        ckpts = f"{bucket_url}/run{attempt}/checkpoints"
        if promote_and_kill(ckpts, local, size):
            break
        size *= 2
    else:
        pytest.fail("every promotion finished before it could be killed")
    run = ckpts.rsplit("/", 1)[0]
    storage, _ = storage_for(ckpts)
    left = files_of(f"{ckpts}/5")
    assert left and COMMIT_FILE not in left  # the copy had begun, and was cut
    reader = CheckpointManager(ckpts, ManagerOptions(enable_checkpointing=False))
    assert reader.all_steps() == [] and reader.latest_step() is None
    capsys.readouterr()
    assert main(["verify", run, "--no-progress"]) == ExitCode.DAMAGED  # incomplete, not damage
    out, err = capsys.readouterr()
    assert "only incomplete ones: 5" in err and "FAILED" not in out + err

    monkeypatch.setenv("STEPSAFE_SINGLE_UPLOAD_MAX", str(8 << 20))  # here too: parts
    monkeypatch.setenv("STEPSAFE_PART_SIZE", str(8 << 20))
    want = big_state(size)
    abstract = {"big": np.zeros_like(want["big"]), "step": 0}
    opts = {"multi_tier": True, "backup_interval_steps": 5, "local_save_interval_steps": 1}
    with CheckpointManager(ckpts, ManagerOptions(local_directory=local, **opts)) as m:
        assert files_of(f"{ckpts}/5") == left  # the newest entry: may be a save in progress
        assert m.all_steps() == [] and m.local_steps() == [5]
        step, state = m.restore_newest(abstract)
        assert step == 5 and m.restored_path == os.path.join(local, "5")
        assert_bit_exact(state, want)
        m.save(6, {**state, "step": 6}, force=True)  # the first promotion since the start
        m.wait_until_finished()
        assert m.all_steps() == [6] and not m._promoter.failed
    assert_bit_exact(stepsafe.restore(f"{ckpts}/6", abstract), {**want, "step": 6})
    assert files_of(f"{ckpts}/6") == files_of(os.path.join(local, "6"))
    assert stepsafe.verify(run).ok
    capsys.readouterr()
    assert main(["verify", run, "--no-progress"]) == ExitCode.OK
    assert capsys.readouterr().out.count("OK ") == 1

    plan = gc(run, keep=1, dry_run=True)
    assert [(a.entry.step, a.reason) for a in plan.delete] == [
        (5, "incomplete, and step 6 is committed")
    ]
    s3 = bucket_url.startswith("s3://")
    if s3:  # the killed copy's multipart upload of the data file: parts the bucket bills
        (upload,) = storage.unfinished_uploads(ckpts)
        assert plan.uploads == [upload] and "/5/items/" in upload[0]
    with CheckpointManager(ckpts, ManagerOptions(local_directory=local, **opts)) as m:
        assert m.all_steps() == [6]
    assert not storage.exists(f"{ckpts}/5")  # the next start removed the killed copy's files
    if s3:  # ... but not its open upload: only gc aborts those
        assert storage.unfinished_uploads(ckpts) == [upload]
        gc(run, keep=1)
        assert storage.unfinished_uploads(ckpts) == []
    assert_bit_exact(stepsafe.restore(run, abstract), {**want, "step": 6})


@buckets
def test_promotions_slower_than_saves_skip_steps_but_never_fail(bucket_url, tmp_path, caplog):
    """Local saves every step, keeping one, each due for promotion, faster than a bucket copy:
    older waiting steps are skipped, the step being copied is kept locally until its copy is
    over (no copy fails for a step retention deleted), and the last step is promoted."""
    local = str(tmp_path / "local" / "run")
    opts = {"multi_tier": True, "backup_interval_steps": 1, "local_save_interval_steps": 1}
    big = {"w": np.arange(1 << 20, dtype=np.float32)}  # 4 MiB: a copy takes a moment
    m = manager(bucket_url, local, local_max_to_keep=1, **opts)
    with caplog.at_level(logging.INFO, "stepsafe"), m:
        for step in range(1, 9):
            m.save(step, {**big, "step": step})
        m.wait_until_finished()
        assert not m._promoter.failed and m._promoter.promoted[-1] == 8
        promoted = m.all_steps()
        assert m.local_steps() == [8]
    assert promoted == m._promoter.promoted and promoted[-1] == 8
    for step in promoted:
        url = m.step_path(step)
        assert stepsafe.verify(url).ok
        like = {"w": np.zeros_like(big["w"]), "step": 0}
        assert_bit_exact(stepsafe.restore(url, like), {**big, "step": step})


# -- what the lead's code gets wrong (see the report) ----------------------------------------


@buckets
def test_a_manager_whose_lease_was_taken_over_does_not_promote(bucket_url, tmp_path):
    """A persistent save checks the lease first (``_save_persistent``); a promotion writes the
    same run and runs its retention, so it must be refused alike."""
    import json

    from stepsafe.errors import RunInUseError

    local = str(tmp_path / "local" / "run")
    opts = {"multi_tier": True, "backup_interval_steps": 2, "async_save": False}
    m = manager(bucket_url, local, **opts)
    try:
        m.save(2, state_at(2))
        m.wait_until_finished()
        assert m.all_steps() == [2]
        storage, lease_path = storage_for(f"{bucket_url}/run/checkpoints/_LEASE")
        lease = json.loads(storage.read_bytes(lease_path))
        lease.update(host="another-host", pid=1, token="0123456789abcdef", renewed_unix=time.time())
        storage.fs.pipe_file(lease_path, json.dumps(lease).encode())  # a takeover's lease
        try:
            m.save(4, state_at(4))
            m.wait_until_finished()
        except RunInUseError:
            pass
        promoted = m.all_steps()
    finally:
        m.close()
    assert promoted == [2]  # today: [2, 4], written into a run another manager holds


@buckets
def test_data_file_size_bytes_applies_to_promoted_steps(bucket_url, tmp_path):
    """``data_file_size_bytes`` (flag checkpoint_storage_target_data_file_size_bytes) says where
    the persistent tier's data files are split; in multi-tier mode those files are the local
    tier's, copied as they are, so the local tier must split at it too."""
    local = str(tmp_path / "local" / "run")
    opts = {"multi_tier": True, "backup_interval_steps": 2, "async_save": False}
    state = {"a": np.arange(3 << 18, dtype=np.float32), "b": np.ones(10)}  # 3 MiB + 80 B
    with manager(bucket_url, local, data_file_size_bytes=1 << 20, **opts) as m:
        m.save(2, state)
        m.wait_until_finished()
        assert m.all_steps() == [2]
        url = m.step_path(2)
    data = [n for n in files_of(url) if n.endswith(".data")]
    assert len(data) >= 3, data


MULTIPROCESS_SAVE = """
import sys, numpy as np, jax, jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import stepsafe
mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "model"))
s = NamedSharding(mesh, P("data", "model"))
w = jax.jit(lambda: jnp.arange(64, dtype=jnp.float32).reshape(8, 8), out_shardings=s)()
stepsafe.save(sys.argv[1], {"w": w, "b": np.ones(3, np.float32)})
print("ok", flush=True)
"""


@pytest.mark.parametrize("bucket_url", ["s3"], indirect=True)
def test_copy_step_copies_a_checkpoint_saved_by_several_processes(bucket_url, tmp_path):
    """A checkpoint saved by several processes keeps its shards' chunk tables in
    ``items/part_*.json`` files (a version-2 manifest); a copy without them is committed but
    cannot be restored."""
    import jax_processes

    src = str(tmp_path / "saved" / "7")
    results = jax_processes.run(MULTIPROCESS_SAVE, 2, args=lambda i, port: [src], timeout_s=120)
    assert all(r.returncode == 0 for r in results), "\n".join(r.describe() for r in results)
    assert stepsafe.verify(src).ok
    src_storage, src_path = storage_for(src)
    dst = f"{bucket_url}/copy/7"
    dst_storage, dst_path = storage_for(dst)
    copy_step(src_storage, src_path, dst_storage, dst_path)
    report = stepsafe.verify(dst)
    assert report.ok, [(p.kind, p.message) for p in report.problems]
    assert files_of(dst) == files_of(src)
    want = {"w": np.arange(64, dtype=np.float32).reshape(8, 8), "b": np.ones(3, np.float32)}
    assert_bit_exact(stepsafe.restore(dst), want)


@buckets
def test_the_final_forced_save_is_promoted_even_when_the_step_was_just_saved(bucket_url, tmp_path):
    """The trainer (``demo/train.py``) saves every step, then ``save(step, force=True)`` at
    the end (``save_checkpoint_on_completion``) or on a stop request: when the last step is on
    the local period it is saved locally already, and the forced save must still promote it."""
    local = str(tmp_path / "local" / "run")
    opts = {"multi_tier": True, "backup_interval_steps": 4, "async_save": False}
    with manager(bucket_url, local, **opts) as m:
        for step in range(1, 9):
            m.save(step, state_at(step))
        m.wait_until_finished()
        assert m.all_steps() == [2, 6] and m.local_steps() == [6, 8]
        m.save(8, state_at(8), force=True)  # the end of training: the final step
        m.wait_until_finished()
        promoted = m.all_steps()
    assert promoted == [2, 6, 8]  # today: [2, 6], the final step stays on the local disk only


@buckets
def test_a_promotion_never_writes_into_a_step_name_holding_other_files(bucket_url, tmp_path):
    """A persistent save refuses a step whose name holds something that is not ours
    (``existing_steps.save_is_blocked``): a promotion must refuse it alike, leaving it as it
    is."""
    ckpts = f"{bucket_url}/run/checkpoints"
    storage, _ = storage_for(ckpts)
    storage.fs.pipe_file(f"{ckpts}/4/notes.txt", b"a user's notes")
    with manager(bucket_url, str(tmp_path / "persistent-only"), save_interval_steps=4) as m:
        m.save(4, state_at(4), force=True)
        m.wait_until_finished()
        assert m.all_steps() == []  # the persistent save is refused
    local = str(tmp_path / "local" / "run")
    opts = {"multi_tier": True, "backup_interval_steps": 2, "async_save": False}
    with manager(bucket_url, local, **opts) as m:
        m.save(2, state_at(2))
        m.save(4, state_at(4), force=True)
        m.wait_until_finished()
        promoted = m.all_steps()
    assert files_of(f"{ckpts}/4") == {"notes.txt": b"a user's notes"}
    assert promoted == [2]
