"""A save to S3 / GCS killed with SIGKILL at a random moment never leaves a step that lists or
restores as complete, leaves the earlier committed step untouched, and does not stop the same
step from being saved again afterwards.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from trees import assert_bit_exact

import stepsafe
from stepsafe.checkpoint import committed_steps
from stepsafe.storage import storage_for

TRIALS = 8
CHILD = """
import sys, numpy as np, stepsafe
url = sys.argv[1]
state = {f"a{i}": np.random.default_rng(i).standard_normal(400_000).astype(np.float32)
         for i in range(6)}
print("ready", flush=True)
stepsafe.save(url, state, data_file_size_bytes=3 << 20)
print("done", flush=True)
"""


def child_state() -> dict[str, np.ndarray]:
    return {
        f"a{i}": np.random.default_rng(i).standard_normal(400_000).astype(np.float32)
        for i in range(6)
    }


def run_child(url: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, url], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.strip() == b"ready", (line, proc.stderr.read() if proc.stderr else b"")
    return proc


@pytest.mark.slow
@pytest.mark.parametrize("bucket_url", ["s3", "gcs"], indirect=True)
def test_sigkill_during_bucket_save(bucket_url):
    runs = f"{bucket_url}/checkpoints"
    first = {"x": np.arange(1000, dtype=np.int32)}
    stepsafe.save(f"{runs}/1", first)
    storage, _ = storage_for(runs)

    t0 = time.perf_counter()  # how long one save takes, child start-up excluded
    proc = run_child(f"{bucket_url}/calibration/2")
    proc.wait(timeout=120)
    assert proc.returncode == 0, proc.stderr.read() if proc.stderr else b""
    duration = time.perf_counter() - t0

    rng = random.Random(1234)
    outcomes = []
    for trial in range(TRIALS):
        step_url = f"{runs}/{trial + 2}"
        proc = run_child(step_url)
        time.sleep(rng.uniform(0, duration))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        steps = committed_steps(storage, runs)
        committed = trial + 2 in steps
        outcomes.append(committed)
        assert_bit_exact(stepsafe.restore(f"{runs}/1"), first)
        if committed:
            assert_bit_exact(stepsafe.restore(step_url), child_state())
        else:
            with pytest.raises(stepsafe.StepsafeError):
                stepsafe.restore(step_url)
            stepsafe.save(step_url, child_state())  # leftovers do not block a new save
            assert_bit_exact(stepsafe.restore(step_url), child_state())
    assert not all(outcomes), "no kill landed during a save: the trial proves nothing"
