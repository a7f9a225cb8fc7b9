"""Orbax checkpoints in a GCS bucket (fake-gcs-server on loopback), written and read back by
orbax-checkpoint itself: stepsafe restores them, lists them complete or not by Orbax's bucket
rule (``commit_success.txt``), and exports into the bucket. (S3 is not tested: Orbax 0.12.8's
paths turn ``s3://b/k`` into ``s3:/b/k`` and refuse it, "Checkpoint path should be absolute".)"""

from __future__ import annotations

import uuid

import numpy as np
import pytest
import servers

ocp = pytest.importorskip("orbax.checkpoint")

from test_orbax_read import assert_bit_exact, maxtext_state, write_manager  # noqa: E402

import stepsafe  # noqa: E402
from stepsafe.convert.orbax_out import export_orbax  # noqa: E402
from stepsafe.errors import IncompleteCheckpointError  # noqa: E402
from stepsafe.manager.inventory import list_runs  # noqa: E402
from stepsafe.storage import storage_for  # noqa: E402


@pytest.fixture
def gcs_url(gcs_server, monkeypatch) -> str:
    """A fresh prefix in the loopback GCS bucket, with tensorstore and Orbax's paths pointed
    at it too (their own endpoint settings)."""
    monkeypatch.setenv("TENSORSTORE_GCS_HTTP_URL", gcs_server.url)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_server.url)
    return f"gs://{servers.BUCKET}/orbax-{uuid.uuid4().hex[:8]}"


def test_an_orbax_checkpoint_in_a_bucket_reads_and_lists_by_orbaxs_rules(gcs_url):
    state = maxtext_state()
    run = f"{gcs_url}/run"
    write_manager(f"{run}/checkpoints", 7, state)  # type: ignore[arg-type]  (a URL)
    assert_bit_exact(stepsafe.restore(run), state)
    decoder = stepsafe.restore(f"{run}/checkpoints/7/items", select="params/params/decoder")
    assert_bit_exact(decoder, state["params"]["params"]["decoder"])
    (r,) = list_runs(run).runs
    assert [(s.name, s.status, s.orbax_complete) for s in r.steps] == [("7", "Orbax", True)]

    # without commit_success.txt a step in a GCS bucket is unfinished, by Orbax's rule
    storage, _ = storage_for(run)
    storage.delete_file(f"{run}/checkpoints/7/commit_success.txt")
    with pytest.raises(IncompleteCheckpointError, match=r"commit_success\.txt"):
        stepsafe.restore(f"{run}/checkpoints/7")
    (r,) = list_runs(run).runs
    assert [(s.name, s.status, s.orbax_complete) for s in r.steps] == [("7", "Orbax", False)]


def test_export_into_a_bucket_is_what_orbax_restores(gcs_url, tmp_path):
    state = {"params": {"w": np.arange(12, dtype=np.float32).reshape(3, 4)}, "step": 5}
    stepsafe.save(str(tmp_path / "run" / "checkpoints" / "5"), state)
    done = export_orbax(str(tmp_path / "run"), f"{gcs_url}/maxtext/checkpoints")
    storage, _ = storage_for(gcs_url)
    assert storage.exists(f"{done.path}/commit_success.txt")
    with ocp.CheckpointManager(f"{gcs_url}/maxtext/checkpoints", item_names=("items",)) as m:
        back = m.restore(5, args=ocp.args.Composite(items=ocp.args.PyTreeRestore()))["items"]
    assert back["step"] == 5 and back["params"]["w"].tobytes() == state["params"]["w"].tobytes()
