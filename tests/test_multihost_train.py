"""Stopping under jax.distributed: a signal on one process stops every process at one step.

Two layers, with real processes on 127.0.0.1: ``StopRequest.check`` alone (fast), and the demo
trainer started by ``scripts/demo-multihost 2``, where SIGINT sent to ONE process makes both
save the same step and stop, and the resumed run ends bit-exact with an uninterrupted one.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
from pathlib import Path

import jax_processes
import pytest

pytest.importorskip("jax")

from trees import assert_bit_exact

import stepsafe

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "demo-multihost"

# -- StopRequest.check in 2 processes, no trainer ------------------------------------------

LOOP = """
import os, signal, sys, time
from stepsafe import StopRequest

from stepsafe.distributed import coordinator

pace, signal_at, steps = float(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
collective = "collective" in sys.argv[4:]
limit = float(sys.argv[-1][6:]) if sys.argv[-1].startswith("limit=") else 0.0
with StopRequest(wall_clock_limit_s=limit) as stop:
    step = 0
    while step < steps:
        step += 1
        time.sleep(pace)
        if collective:  # like a training step: it needs every process
            coordinator().barrier("step", timeout_s=60)
        if step == signal_at:
            os.kill(os.getpid(), signal.SIGINT)  # this process only
        reason = stop.check(step, final=step == steps)
        if reason:
            break
print(f"stopped at {step} by {reason}; own request {stop._reason}")
"""


def stops(results: list[jax_processes.Result]) -> list[tuple[int, str, str]]:
    found = []
    for r in results:
        assert r.returncode == 0, r.describe()
        m = re.search(r"stopped at (\d+) by (.+?); own request (.+)", r.stdout)
        assert m, r.describe()
        found.append((int(m.group(1)), m.group(2), m.group(3)))
    return found


def test_a_signal_on_one_process_stops_both_at_the_same_step():
    """Process 1 is 4x slower and asks to stop at its step 5: process 0, which got no signal,
    has run ahead by then; both stop at the step the furthest one had reached."""
    results = jax_processes.run(
        LOOP,
        2,
        args=lambda i, port: ["0.005" if i == 0 else "0.02", "-1" if i == 0 else "5", "400"],
        env={"STEPSAFE_STOP_POLL_S": "0.05"},
    )
    (s0, why0, own0), (s1, why1, own1) = stops(results)
    assert (why0, why1, own0, own1) == ("SIGINT", "SIGINT", "None", "SIGINT"), results
    assert s0 == s1 and 5 <= s1 < 400, (s0, s1)


def test_a_process_inside_a_step_that_waits_for_the_asker_is_not_deadlocked():
    """Steps are collectives (a barrier each): when process 1 asks to stop at its step 5,
    process 0 may already be inside step 6, waiting for process 1. Process 1 must not wait for
    process 0 at step 5: both go on to step 6 and stop there, or both stop at 5."""
    results = jax_processes.run(
        LOOP, 2, args=lambda i, port: ["0.01", "-1" if i == 0 else "5", "400", "collective"]
    )
    (s0, why0, _), (s1, why1, _) = stops(results)
    assert (why0, why1) == ("SIGINT", "SIGINT") and s0 == s1 and s1 in (5, 6), (s0, s1)


def test_a_time_limit_on_one_process_stops_both():
    results = jax_processes.run(
        LOOP, 2, args=lambda i, port: ["0.01", "-1", "100000", *(["limit=1"] if i else [])]
    )
    (s0, why0, own0), (s1, why1, own1) = stops(results)
    assert s0 == s1 < 100000 and why0 == why1 == own1 == "wall-clock limit", results
    assert own0 == "None"


def test_a_signal_during_the_last_step_does_not_leave_a_process_waiting():
    """The request arrives at the last step: the final check agrees anyway, so both processes
    report it at that step instead of one leaving the loop and the other waiting for it."""
    results = jax_processes.run(LOOP, 2, args=lambda i, port: ["0.01", str(-1 + i * 11), "10"])
    assert stops(results) == [(10, "SIGINT", "None"), (10, "SIGINT", "SIGINT")]


def test_no_signal_runs_to_the_end_on_both():
    results = jax_processes.run(LOOP, 2, args=lambda i, port: ["0.001", "-1", "20"])
    assert stops(results) == [(20, "None", "None"), (20, "None", "None")]


# -- the demo trainer in 2 processes: SIGINT to one, resume, bit-exact -----------------------

STEPS = 40
FLAGS = [
    f"steps={STEPS}", "checkpoint_period=10", "log_period=1", "warmup_steps=5",
    "emb_dim=16", "num_heads=2", "mlp_dim=32", "vocab_size=32", "max_target_length=8",
    "per_device_batch_size=2", "num_decoder_layers=1", "max_num_checkpoints_to_keep=0",
]  # fmt: skip


def start(tmp_path: Path, run_name: str) -> subprocess.Popen:
    # the script itself refuses, with a clear message, a hostname that is not loopback
    env = {
        **os.environ,
        "JAX_COMPILATION_CACHE_DIR": str(tmp_path.parent / "jax-cache"),  # compile once
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    }
    return subprocess.Popen(
        [str(SCRIPT), "2", f"base_output_directory={tmp_path}", f"run_name={run_name}", *FLAGS],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=ROOT,
    )


def run(tmp_path: Path, run_name: str) -> str:
    p = start(tmp_path, run_name)
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out[-4000:]
    return out


def run_until_step(tmp_path: Path, run_name: str, step: int) -> tuple[int, str]:
    """Start 2 processes; once process 1 logs ``step``, send SIGINT to process 1 only."""
    p = start(tmp_path, run_name)
    lines, victim = [], None
    assert p.stdout is not None
    for line in p.stdout:
        lines.append(line)
        if m := re.match(r"\[demo-multihost\] process 1: pid (\d+)", line):
            victim = int(m.group(1))
        m = re.match(r"\[1\] .*INFO step (\d+) loss", line)
        if m and int(m.group(1)) >= step and victim is not None:
            os.kill(victim, signal.SIGINT)
            break
    out, _ = p.communicate(timeout=300)
    return p.returncode, "".join(lines) + out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref")
    run(tmp, "ref")
    return stepsafe.restore(tmp / "ref" / "checkpoints" / str(STEPS))


def test_sigint_to_one_process_then_resume_is_exact(tmp_path, reference):
    at = random.Random().randint(3, STEPS - 10)
    for attempt in range(3):
        name = f"int{attempt}"
        code, out = run_until_step(tmp_path, name, at)
        if code != 0:
            break  # on a loaded machine the run may finish before the signal lands: again
    assert code == 128 + signal.SIGINT, out[-4000:]
    stopped = [int(s) for s in re.findall(r"\[\d\] stopped by SIGINT at step (\d+)", out)]
    assert len(stopped) == 2 and stopped[0] == stopped[1] >= at, out[-4000:]
    for i in (0, 1):
        assert f"process {i} exited with status {128 + signal.SIGINT}" in out, out[-4000:]
    # process 0 got no signal: it stopped because process 1 asked
    assert re.search(r"\[0\] .*SIGINT on process 1 of 2: all processes stop at step", out)
    assert stepsafe.info(tmp_path / name).step == stopped[0]  # both saved the step they stopped

    resumed = run(tmp_path, name)
    for i in (0, 1):
        assert f"[{i}] finished at step {STEPS} (started at {stopped[0]}, resume)" in resumed
    assert_bit_exact(stepsafe.restore(tmp_path / name / "checkpoints" / str(STEPS)), reference)
