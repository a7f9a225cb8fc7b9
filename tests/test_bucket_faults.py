"""Saves and restores through a proxy in front of the S3 and GCS servers that injects 500s,
503s, connection resets and stalls: each save either succeeds after retries or fails with a
clear error, never is a checkpoint committed but broken, and a restore is bit-exact or fails.

On GCS only the requests that go to the endpoint pass the proxy: the pieces of a resumable
upload go to the upload URL the server hands out, which is the server itself.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_buckets import make_state
from trees import assert_bit_exact

import stepsafe
from stepsafe import knobs
from stepsafe.checkpoint import committed_steps
from stepsafe.format import COMMIT_FILE
from stepsafe.storage import storage_for


def big_state(seed: int) -> dict:
    state = make_state(seed)
    state["big"] = np.random.default_rng(seed).standard_normal(9_000_000).astype(np.float32)
    return state  # 36 MB more: in parts under small_transfers


@pytest.mark.parametrize("bucket_url", ["s3", "gcs"], indirect=True)
def test_saves_under_faults_commit_whole_or_fail_clearly(bucket_url, proxied, small_transfers):
    proxy = proxied(rate=0.2, max_faults=40, seed=5)
    runs = f"{bucket_url}/checkpoints"
    outcomes: dict[int, str] = {}
    for step in range(1, 7):
        state = big_state(step) if step % 3 == 0 else make_state(step)
        size = 32 << 20 if step % 3 == 0 else 16384  # the big ones: 2 files, one in parts
        try:
            stepsafe.save(f"{runs}/{step}", state, data_file_size_bytes=size)
            outcomes[step] = "saved"
        except (stepsafe.StepsafeError, OSError) as e:
            assert str(e), "a failed save must say why"
            outcomes[step] = f"failed: {e}"
    assert sum(proxy.injected.values()) > 0, proxy.injected
    proxied.direct()
    storage, _ = storage_for(runs)
    committed = committed_steps(storage, runs)
    for step, outcome in outcomes.items():
        state = big_state(step) if step % 3 == 0 else make_state(step)
        if step in committed:
            assert_bit_exact(stepsafe.restore(f"{runs}/{step}"), state)  # checksums verified
        else:
            assert outcome != "saved", f"step {step} was reported saved but is not committed"
    assert committed, f"no save got through: {outcomes}, faults {proxy.injected}"


@pytest.mark.parametrize("bucket_url", ["s3"], indirect=True)
def test_lost_reply_to_the_marker_create_is_still_a_commit(bucket_url, proxied):
    """The server creates the marker but the reply is lost; the retry sees 412. The save must
    recognise its own marker and succeed, not report a rival writer."""
    proxy = proxied(
        rate=1.0,
        max_faults=1,
        faults=("reset_after",),
        only=lambda method, path: method == "PUT" and path.split("?")[0].endswith(COMMIT_FILE),
    )
    state = make_state(9)
    stepsafe.save(f"{bucket_url}/9", state)
    assert proxy.injected["reset_after"] == 1
    proxied.direct()
    assert_bit_exact(stepsafe.restore(f"{bucket_url}/9"), state)


@pytest.mark.parametrize("bucket_url", ["s3", "gcs"], indirect=True)
def test_restores_under_faults_are_exact_or_fail_clearly(bucket_url, proxied):
    """Ranged reads broken on the way: retried to a bit-exact state, or a clear error; never
    wrong bytes handed back (the checksums would say so, and the restore must not pass)."""
    state = big_state(4)
    stepsafe.save(f"{bucket_url}/4", state, data_file_size_bytes=32 << 20)
    proxy = proxied(rate=0.3, max_faults=25, seed=11)
    outcomes = []
    for _ in range(3):
        try:
            assert_bit_exact(stepsafe.restore(f"{bucket_url}/4"), state)
            outcomes.append("exact")
        except (stepsafe.StepsafeError, OSError) as e:
            assert str(e), "a failed restore must say why"
            outcomes.append(f"{type(e).__name__}: {e}")
    assert sum(proxy.injected.values()) > 0, proxy.injected
    assert "exact" in outcomes, f"no restore got through: {outcomes}, faults {proxy.log}"


@pytest.mark.parametrize("bucket_url", ["s3"], indirect=True)
def test_requests_stalled_past_the_timeout_are_retried(
    bucket_url, proxied, monkeypatch, small_transfers
):
    """A server that stops answering: the client times out and retries, while the stalled
    request still reaches the server late (a duplicate part, a late conditional create); the
    save commits and restores exactly."""
    monkeypatch.setattr(knobs, "S3_READ_TIMEOUT_S", 1.0)  # a fresh client, with this timeout
    proxy = proxied(
        rate=0.5,
        max_faults=4,
        faults=("stall",),
        stall_s=2.5,
        seed=3,
        only=lambda method, path: method in ("PUT", "POST"),  # the requests that change things
    )
    state = big_state(6)
    stepsafe.save(f"{bucket_url}/6", state, data_file_size_bytes=32 << 20)
    assert_bit_exact(stepsafe.restore(f"{bucket_url}/6"), state)
    assert proxy.injected["stall"] == 4, proxy.log
