"""Saves to S3 through a proxy that injects 500s, 503s and connection resets: each save either
succeeds after retries or fails with a clear error; never is a checkpoint committed but broken.
"""

from __future__ import annotations

import numpy as np
import pytest
from fault_proxy import FaultProxy
from test_buckets import make_state
from trees import assert_bit_exact

import stepsafe
from stepsafe.checkpoint import committed_steps
from stepsafe.format import METADATA_FILE
from stepsafe.storage import storage_for


@pytest.fixture
def proxied(s3_server, bucket_url, monkeypatch):
    """Yields a function that starts a proxy in front of the S3 server and points stepsafe at
    it; on exit stepsafe talks to the server directly again, to check what was left."""
    proxies: list[FaultProxy] = []

    def start(**kwargs) -> FaultProxy:
        proxy = FaultProxy(s3_server.url, **kwargs)
        proxies.append(proxy)
        monkeypatch.setenv("STEPSAFE_S3_ENDPOINT_URL", proxy.url)
        return proxy

    yield start
    monkeypatch.setenv("STEPSAFE_S3_ENDPOINT_URL", s3_server.url)
    for proxy in proxies:
        proxy.stop()


def big_state(seed: int) -> dict:
    state = make_state(seed)
    state["big"] = np.random.default_rng(seed).standard_normal(9_000_000).astype(np.float32)
    return state  # 36 MB more: a multipart upload of 3 parts


@pytest.mark.parametrize("bucket_url", ["s3"], indirect=True)
def test_saves_under_faults_commit_whole_or_fail_clearly(bucket_url, proxied, monkeypatch):
    proxy = proxied(rate=0.2, max_faults=40, seed=5)
    runs = f"{bucket_url}/checkpoints"
    outcomes: dict[int, str] = {}
    for step in range(1, 7):
        state = big_state(step) if step % 3 == 0 else make_state(step)
        size = 32 << 20 if step % 3 == 0 else 16384  # the big ones: 2 files, one multipart
        try:
            stepsafe.save(f"{runs}/{step}", state, data_file_size_bytes=size)
            outcomes[step] = "saved"
        except (stepsafe.StepsafeError, OSError) as e:
            assert str(e), "a failed save must say why"
            outcomes[step] = f"failed: {e}"
    assert sum(proxy.injected.values()) > 0, proxy.injected
    monkeypatch.setenv("STEPSAFE_S3_ENDPOINT_URL", proxy.upstream_url)
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
def test_lost_reply_to_the_marker_create_is_still_a_commit(bucket_url, proxied, monkeypatch):
    """The server creates the marker but the reply is lost; the retry sees 412. The save must
    recognise its own marker and succeed, not report a rival writer."""
    proxy = proxied(
        rate=1.0,
        max_faults=1,
        faults=("reset_after",),
        only=lambda method, path: method == "PUT" and path.split("?")[0].endswith(METADATA_FILE),
    )
    state = make_state(9)
    stepsafe.save(f"{bucket_url}/9", state)
    assert proxy.injected["reset_after"] == 1
    monkeypatch.setenv("STEPSAFE_S3_ENDPOINT_URL", proxy.upstream_url)
    assert_bit_exact(stepsafe.restore(f"{bucket_url}/9"), state)
