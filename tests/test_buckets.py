"""Checkpoints in buckets: memory://, and S3 / GCS against real servers on loopback.

The same guarantees as on local disk, through a marker commit instead of a rename: round trips
are bit-exact, damage is caught by its own error, the run manager works unchanged on a URL, and
two writers racing for one step end with exactly one commit.
"""

from __future__ import annotations

import threading
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from conftest import BUCKET_KINDS
from fsspec.asyn import sync
from trees import assert_bit_exact

import stepsafe
from stepsafe import (
    CheckpointExistsError,
    ChecksumMismatchError,
    ConfigError,
    IncompleteCheckpointError,
    StepsafeError,
    TruncatedDataError,
    knobs,
)
from stepsafe.checkpoint import committed_steps
from stepsafe.format import COMMIT_FILE, CheckpointReader
from stepsafe.manager import CheckpointManager, ManagerOptions
from stepsafe.manager.gc import gc
from stepsafe.storage import COMMIT_MARKER, IN_FLIGHT, storage_for
from stepsafe.storage.dispatch import remote_storage

buckets = pytest.mark.parametrize("bucket_url", BUCKET_KINDS, indirect=True)


def make_state(seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    return {
        "step": seed,
        "params": {
            "w": rng.standard_normal((128, 96)).astype(np.float32),
            "b": rng.standard_normal(96).astype(ml_dtypes.bfloat16),
            "empty": np.zeros((0, 3), np.int8),
        },
        "opt_state": [rng.integers(0, 100, (50, 7)).astype(np.int64), 3.5, None, "adam"],
    }


def data_files(url: str) -> list[str]:
    storage, _ = storage_for(url)
    items = storage.join(url, "items")
    return [storage.join(items, n) for n in storage.list_dir(items) if n.endswith(".data")]


def test_marker_is_the_formats_metadata_file():
    assert COMMIT_MARKER == COMMIT_FILE


def test_unknown_scheme_is_refused_clearly():
    with pytest.raises(StepsafeError, match="not supported"):
        storage_for("ftp://host/x")


def test_missing_extra_names_it(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_s3fs(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "s3fs":
            raise ImportError("No module named 's3fs'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_s3fs)
    monkeypatch.setattr(knobs, "S3_MAX_ATTEMPTS", 3)  # a fresh cache key
    with pytest.raises(StepsafeError, match=r"pip install 'stepsafe\[s3\]'"):
        remote_storage("s3")


@buckets
def test_round_trip_metadata_and_select(bucket_url):
    state = make_state(7)
    path = f"{bucket_url}/checkpoints/7"
    stepsafe.save(path, state, custom_metadata={"loss": 2.5}, data_file_size_bytes=4096)
    assert len(data_files(path)) > 3  # spread over several objects
    assert_bit_exact(stepsafe.restore(path), state)
    assert_bit_exact(stepsafe.restore(bucket_url), state)  # run dir -> latest step
    assert_bit_exact(stepsafe.restore(path, select="params"), state["params"])
    meta = stepsafe.metadata(path)
    assert meta["params"]["w"].shape == (128, 96)
    storage, _ = storage_for(bucket_url)
    assert committed_steps(storage, f"{bucket_url}/checkpoints") == [7]
    with pytest.raises(CheckpointExistsError):
        stepsafe.save(path, state)


@buckets
def test_big_array_goes_up_in_parts(bucket_url, small_transfers):
    state = {"big": np.random.default_rng(0).standard_normal(12_000_000).astype(np.float32)}
    stepsafe.save(f"{bucket_url}/1", state)  # 48 MB: 12 MiB parts, read in 12 MiB requests
    assert_bit_exact(stepsafe.restore(f"{bucket_url}/1"), state)


@buckets
def test_flipped_byte_is_a_checksum_mismatch(bucket_url):
    path = f"{bucket_url}/3"
    stepsafe.save(path, make_state(3))
    storage, _ = storage_for(path)
    (f,) = data_files(path)
    raw = bytearray(storage.read_bytes(f))
    raw[100] ^= 0x01
    storage.fs.pipe_file(f, bytes(raw))
    with pytest.raises(ChecksumMismatchError, match="checksum mismatch"):
        stepsafe.restore(path)


@buckets
def test_missing_marker_is_incomplete(bucket_url):
    path = f"{bucket_url}/checkpoints/4"
    stepsafe.save(path, make_state(4))
    storage, _ = storage_for(path)
    storage.delete_file(storage.join(path, COMMIT_FILE))
    with pytest.raises(IncompleteCheckpointError):
        stepsafe.restore(path)
    with pytest.raises(IncompleteCheckpointError):
        stepsafe.restore(bucket_url)
    assert committed_steps(storage, f"{bucket_url}/checkpoints") == []
    stepsafe.save(path, make_state(5))  # the leftovers of a dead save do not block a new one
    assert_bit_exact(stepsafe.restore(path), make_state(5))


@buckets
def test_truncated_object_is_truncated_data(bucket_url):
    path = f"{bucket_url}/5"
    stepsafe.save(path, make_state(5))
    storage, _ = storage_for(path)
    (f,) = data_files(path)
    storage.fs.pipe_file(f, storage.read_bytes(f)[:-10])
    with pytest.raises(TruncatedDataError):
        stepsafe.restore(path)
    storage.delete_file(f)
    with pytest.raises(TruncatedDataError, match="missing"):
        stepsafe.restore(path)


@buckets
def test_run_manager_on_a_bucket(bucket_url):
    directory = f"{bucket_url}/run1/checkpoints"
    options = ManagerOptions(save_interval_steps=2, max_to_keep=2, async_save=True)
    with CheckpointManager(directory, options) as manager:
        for step in range(1, 9):
            manager.save(step, make_state(step))
        manager.wait_until_finished()
        assert manager.all_steps() == [6, 8]
        assert manager.latest_step() == 8
    storage, _ = storage_for(directory)
    assert storage.list_dir(directory) == ["6", "8"]  # retention deleted whole steps
    assert_bit_exact(stepsafe.restore(f"{bucket_url}/run1"), make_state(8))
    with CheckpointManager(directory, options) as again:
        assert again.latest_step() == 8
        assert not again.save(8, make_state(8), force=True)  # exists: not saved again


@buckets
def test_racing_writers_one_commit(bucket_url):
    """Two writers start the same step together, each with its own state (two copies of a job
    that diverged): one commits, the other is told so, and the step holds exactly the winner's
    state, none of the loser's files left beside it."""
    storage, _ = storage_for(bucket_url)

    def writer(path: str, seed: int, barrier: threading.Barrier, results: dict) -> None:
        barrier.wait()
        try:
            stepsafe.save(path, make_state(seed), data_file_size_bytes=8192)
            results[seed] = "committed"
        except CheckpointExistsError:
            results[seed] = "exists"

    for trial in range(3):
        path = f"{bucket_url}/{trial}"
        barrier = threading.Barrier(2)
        results: dict[int, str] = {}
        seeds = (100 + trial, 200 + trial)
        threads = [
            threading.Thread(target=writer, args=(path, seed, barrier, results)) for seed in seeds
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(results.values()) == ["committed", "exists"], results
        winner = next(seed for seed, r in results.items() if r == "committed")
        assert_bit_exact(stepsafe.restore(path), make_state(winner))
        assert stepsafe.verify(path).ok
        save_id = stepsafe.info(path).save_id
        items = storage.list_dir(storage.join(path, "items"))
        assert items and all(save_id in name for name in items), items


@buckets
def test_abort_removes_only_this_saves_files(bucket_url):
    storage, _ = storage_for(bucket_url)
    with pytest.raises(RuntimeError), storage.transaction(f"{bucket_url}/1") as txn:
        txn.write_file("items/a.data", [b"x" * 100])
        raise RuntimeError("the save failed")
    assert storage.list_dir(f"{bucket_url}/1/items") == []
    rival = storage.join(bucket_url, "2", "items/rival.data")
    storage.fs.pipe_file(rival, b"the rival's bytes")
    txn = storage.transaction(f"{bucket_url}/2")
    txn.write_file("items/mine.data", [b"mine"])
    txn.write_file(COMMIT_FILE, [b"{}"])
    storage.fs.pipe_file(storage.join(bucket_url, "2", COMMIT_FILE), b"a rival's marker")
    with pytest.raises(CheckpointExistsError, match="another writer"):
        txn.commit()
    txn.abort()
    assert storage.list_dir(f"{bucket_url}/2/items") == ["rival.data"]  # ours gone, theirs kept
    assert storage.read_bytes(rival) == b"the rival's bytes"


@buckets
def test_bytes_in_flight_stay_within_the_budget(bucket_url):
    """checkpoint_storage_concurrent_gb, given to the run manager, bounds the bytes its storage
    holds in parallel part uploads and ranged reads, and only its storage's: the process
    default budget carries none of its transfers and keeps its size. With the default budget
    the same restore holds more at once, so the bound is what kept it down."""
    mib = 1 << 20
    rng = np.random.default_rng(5)
    state = {
        "a": rng.integers(0, 2**31, 12 * mib, dtype=np.int32),  # 48 MiB
        "b": rng.standard_normal(2 * mib),  # 16 MiB
    }
    limit = 36 * mib  # room for two 18 MiB parts or reads (or a sequential upload's buffers)
    options = ManagerOptions(
        async_save=False, save_interval_steps=1, data_file_size_bytes=64 * mib,
        concurrent_bytes=limit,
    )  # fmt: skip
    with CheckpointManager(f"{bucket_url}/run", options) as manager:
        budget = manager.storage.budget
        assert budget is not IN_FLIGHT and budget.limit == limit
        budget.reset_peak()
        IN_FLIGHT.reset_peak()
        manager.save(1, state)
        assert_bit_exact(manager.restore(1), state)
    assert 0 < budget.peak <= limit
    assert IN_FLIGHT.peak == 0  # every transfer of the manager went through its own budget
    shared, _ = storage_for(bucket_url)
    assert shared.budget is IN_FLIGHT and IN_FLIGHT.limit == knobs.CONCURRENT_BYTES
    assert_bit_exact(stepsafe.restore(f"{bucket_url}/run/1"), state)
    assert IN_FLIGHT.peak >= 48 * mib  # "a" and "b" lie side by side: one 64 MiB read


def test_a_budget_below_one_byte_is_a_config_error_naming_the_option():
    with pytest.raises(ConfigError, match="concurrent_bytes must be at least 1"):
        storage_for("memory://b/x", concurrent_bytes=0)
    with pytest.raises(ConfigError, match="concurrent_bytes"):
        CheckpointManager("memory://b/x", ManagerOptions(concurrent_bytes=-5))


@buckets
def test_gc_removes_the_files_of_a_dead_attempt_at_a_committed_step(bucket_url):
    """A save of step 5 killed on a bucket leaves its files; the resumed run saves step 5 again
    beside them (other save id), which commits. gc deletes the dead attempt's files and nothing
    the commit names."""
    storage, _ = storage_for(bucket_url)
    steps = f"{bucket_url}/run/checkpoints"
    dead = storage.transaction(storage.join(steps, "5"))  # killed: never commits nor aborts
    dead.write_file("items/process_0.00000.0123456789ab.data", [b"x" * 1000])
    dead.write_file("iter/process_0.0123456789ab.json", [b"{}"])
    with CheckpointManager(steps, ManagerOptions(async_save=False, save_interval_steps=5)) as m:
        m.save(5, make_state(5))
    strays = [storage.join(steps, "5", n) for n in (
        "items/process_0.00000.0123456789ab.data", "iter/process_0.0123456789ab.json"
    )]  # fmt: skip
    plan = gc(f"{bucket_url}/run", keep=1, dry_run=True)
    assert plan.strays == {5: sorted(strays)} and not plan.delete
    assert all(storage.exists(p) for p in strays)
    gc(f"{bucket_url}/run", keep=1)
    assert not any(storage.exists(p) for p in strays)
    assert_bit_exact(stepsafe.restore(f"{bucket_url}/run"), make_state(5))
    assert stepsafe.verify(f"{bucket_url}/run").ok
    assert gc(f"{bucket_url}/run", keep=1, dry_run=True).strays == {}


@pytest.mark.parametrize("bucket_url", ["memory"], indirect=True)
def test_data_files_split_at_the_storage_default_unless_a_size_is_given(bucket_url, monkeypatch):
    monkeypatch.setattr(knobs, "BUCKET_FILE_SIZE", 1 << 20)  # 128 MiB: too big here
    state = {"a": np.arange(3 << 18, dtype=np.float32), "b": np.ones(10)}  # 3 MiB + 80 B

    def files(path: str) -> int:
        storage, local = storage_for(path)
        with CheckpointReader(storage, local) as reader:
            return len(reader.manifest.files)

    stepsafe.save(f"{bucket_url}/1", state)
    stepsafe.save(f"{bucket_url}/2", state, data_file_size_bytes=8 << 20)
    assert (files(f"{bucket_url}/1"), files(f"{bucket_url}/2")) == (4, 1)
    assert_bit_exact(stepsafe.restore(f"{bucket_url}/1"), state)


@pytest.mark.parametrize("bucket_url", ["s3"], indirect=True)
def test_gc_aborts_the_unfinished_uploads_of_dead_saves(bucket_url):
    """Saves killed during a multipart upload leave it open: no listing shows it, the bucket
    keeps its parts. gc aborts those in committed steps and in steps older than the newest
    committed one (nothing still writes them), and leaves a newer step's alone (a save that
    may be running)."""
    storage, _ = storage_for(bucket_url)
    steps = f"{bucket_url}/run/checkpoints"
    with CheckpointManager(steps, ManagerOptions(async_save=False, save_interval_steps=1)) as m:
        m.save(3, make_state(3))
        m.save(5, make_state(5))

    fs = storage.fs
    client = sync(fs.loop, fs.set_session)  # s3fs' public way to its aiobotocore client

    def start_upload(step: int) -> str:
        bucket, key, _ = fs.split_path(f"{steps}/{step}/items/process_0.00000.x.data")
        upload = sync(fs.loop, client.create_multipart_upload, Bucket=bucket, Key=key)
        sync(
            fs.loop, client.upload_part, Bucket=bucket, Key=key, UploadId=upload["UploadId"],
            PartNumber=1, Body=b"x" * 1000,
        )  # fmt: skip
        return upload["UploadId"]

    ids = {step: start_upload(step) for step in (3, 4, 5, 7)}
    plan = gc(f"{bucket_url}/run", keep=2, dry_run=True)
    assert sorted(u for _, u in plan.uploads) == sorted(ids[s] for s in (3, 4, 5))
    assert len(storage.unfinished_uploads(steps)) == 4  # a dry run aborts nothing
    gc(f"{bucket_url}/run", keep=2)
    assert [u for _, u in storage.unfinished_uploads(steps)] == [ids[7]]
    assert_bit_exact(stepsafe.restore(f"{bucket_url}/run"), make_state(5))


def test_no_client_can_reach_a_metadata_server():
    """Every metadata address points at a closed loopback port: a client that looks for cloud
    credentials fails at once rather than finding 169.254.169.254."""
    import os
    import socket

    import servers

    host, port = servers.CLOSED.split(":")
    assert os.environ["GCE_METADATA_HOST"] == servers.CLOSED
    assert os.environ["AWS_EC2_METADATA_DISABLED"] == "true"
    assert servers.CLOSED in os.environ["AWS_EC2_METADATA_SERVICE_ENDPOINT"]
    with pytest.raises(ConnectionRefusedError), socket.create_connection((host, int(port)), 2):
        pass


OWN_BUDGET_FORK = """
import faulthandler, os, sys
from stepsafe.storage import storage_for
storage, _ = storage_for("memory://b/x", concurrent_bytes=1000)
storage.budget.acquire(1000)  # a transfer of the parent's, never done in the child
pid = os.fork()
if pid == 0:
    faulthandler.dump_traceback_later(5, exit=True)  # a hang ends the child with exit 1
    storage.budget.acquire(1000)
    os._exit(0 if storage.budget.in_flight == 1000 else 2)
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def test_a_forked_child_starts_a_storages_own_budget_empty():
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-c", OWN_BUDGET_FORK], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
