"""The operator commands on S3 and GCS test servers: ls, inspect, verify, gc on bucket URLs."""

from __future__ import annotations

import json

import pytest
from cli_runs import state_at
from conftest import BUCKET_KINDS

from stepsafe.cli.main import main
from stepsafe.format import COMMIT_FILE
from stepsafe.manager import CheckpointManager, ManagerOptions
from stepsafe.storage import storage_for

buckets = pytest.mark.parametrize(
    "bucket_url", [k for k in BUCKET_KINDS if k != "memory"], indirect=True
)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@buckets
def test_operator_commands_on_a_bucket_run(bucket_url, capsys):
    ckpts = f"{bucket_url}/run1/checkpoints"
    with CheckpointManager(ckpts, ManagerOptions(save_interval_steps=10)) as m:
        for step in (10, 20, 30):
            m.save(step, state_at(step))
    storage, _ = storage_for(ckpts)
    stepsafe_save_then_drop_marker(storage, ckpts)

    code, out, _ = run(capsys, "ls", bucket_url, "--json")
    assert code == 0
    (r,) = json.loads(out)["runs"]
    status = {c["name"]: c["status"] for c in r["checkpoints"]}
    assert status == {"10": "Complete", "20": "Complete", "25": "Incomplete", "30": "Complete"}
    assert r["latest_step"] == 30
    code, out, _ = run(capsys, "ls", bucket_url)
    assert code == 0 and "Latest checkpoint: Step 30" in out

    code, out, _ = run(capsys, "inspect", f"{bucket_url}/run1")
    assert code == 0 and "Step: 30" in out and "Training Checkpoint" in out

    code, out, _ = run(capsys, "verify", f"{bucket_url}/run1", "--no-progress")
    assert code == 0 and out.count("OK ") == 3
    data = next(
        storage.join(ckpts, "20", "items", n)
        for n in storage.list_dir(storage.join(ckpts, "20", "items"))
        if n.endswith(".data")
    )
    raw = bytearray(storage.read_bytes(data))
    raw[7] ^= 0xFF
    storage.fs.pipe_file(data, bytes(raw))
    code, out, err = run(capsys, "verify", f"{bucket_url}/run1", "--no-progress")
    assert code == 1 and "FAILED" in out and "1 of 3 checkpoint(s) failed" in err
    code, out, _ = run(capsys, "verify", f"{ckpts}/20", "--json")
    (problem,) = json.loads(out)["checkpoints"][0]["problems"]
    assert code == 1 and (problem["kind"], problem["file"]) == ("checksum", data)

    code, out, _ = run(capsys, "gc", f"{bucket_url}/run1", "--keep", "1", "--json")
    assert code == 0 and json.loads(out)["deleted"] is True
    assert m.all_steps() == [30]
    assert not storage.exists(storage.join(ckpts, "10", COMMIT_FILE))


def stepsafe_save_then_drop_marker(storage, ckpts: str) -> None:
    """A step whose save never committed: its files exist, its marker does not."""
    import stepsafe

    stepsafe.save(storage.join(ckpts, "25"), state_at(25))
    storage.delete_file(storage.join(ckpts, "25", COMMIT_FILE))
