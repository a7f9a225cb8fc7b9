"""The demo trainer in real subprocesses: interrupted + resumed == uninterrupted, bit for bit."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys

import pytest

pytest.importorskip("jax")

from trees import assert_bit_exact

import stepsafe

STEPS = 40
FLAGS = [
    f"steps={STEPS}", "checkpoint_period=10", "log_period=1", "warmup_steps=5",
    "emb_dim=32", "mlp_dim=64", "max_target_length=16", "per_device_batch_size=4",
    "max_num_checkpoints_to_keep=0",
]  # fmt: skip


def start(tmp_path, run_name: str, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "stepsafe.cli.main", "train", "--no-progress",
           f"base_output_directory={tmp_path}", f"run_name={run_name}", *FLAGS, *extra]  # fmt: skip
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def run(tmp_path, run_name: str, *extra: str) -> str:
    p = start(tmp_path, run_name, *extra)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    return out


def run_until_step(tmp_path, run_name: str, step: int, sig: int) -> tuple[int, str]:
    """Start a run, send ``sig`` once it logs ``step``, return its exit code and stdout."""
    p = start(tmp_path, run_name)
    log = []
    for line in p.stderr:
        log.append(line)
        m = re.search(r"INFO step (\d+) loss", line)
        if m and int(m.group(1)) >= step:
            p.send_signal(sig)
            break
    out, err = p.communicate(timeout=300)
    return p.returncode, out + "".join(log) + err


def final_state(tmp_path, run_name: str) -> dict:
    return stepsafe.restore(tmp_path / run_name / "checkpoints" / str(STEPS))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref")
    run(tmp, "ref")
    return final_state(tmp, "ref")


def learning_rate(state) -> float:
    from stepsafe.config import load_config
    from stepsafe.demo.train import learning_rate_schedule

    count = state["opt_state"][0]["count"]
    return float(learning_rate_schedule(load_config(None, FLAGS))(count))


def test_sigint_at_random_step_then_resume_is_exact(tmp_path, reference):
    at = random.Random().randint(3, STEPS - 3)
    code, out = run_until_step(tmp_path, "int", at, signal.SIGINT)
    assert code == 128 + signal.SIGINT, out
    stopped = int(re.search(r"stopped by SIGINT at step (\d+)", out).group(1))
    assert stopped >= at
    assert stepsafe.info(tmp_path / "int").step == stopped  # saved at the current step
    resumed = run(tmp_path, "int")
    assert f"started at {stopped}, resume" in resumed
    final = final_state(tmp_path, "int")
    assert_bit_exact(final, reference)
    assert int(final["step"]) == STEPS and learning_rate(final) == learning_rate(reference)


def test_sigkill_between_checkpoints_then_resume_is_exact(tmp_path, reference):
    """SIGKILL once the run has logged step 25 (a checkpoint every 10 steps, async). On a
    loaded machine the kill lands later than that: what it may have left is judged from the
    last step the run logged, and a run that finished before the kill is run again."""
    for attempt in range(3):
        name = f"kill{attempt}"
        code, out = run_until_step(tmp_path, name, 25, signal.SIGKILL)
        if code == -signal.SIGKILL:
            break
        assert code == 0, out  # not killed: it finished before the signal landed
    else:
        pytest.fail(f"3 runs of {STEPS} steps all finished before a SIGKILL sent at step 25")
    logged = max(int(m) for m in re.findall(r"INFO step (\d+) loss", out))
    assert logged >= 25, out
    # Step k is logged before its save starts, and a save starts only once the one before it
    # committed: every save begun before the last logged step, but the newest, is committed.
    newest = min(logged // 10 * 10, STEPS)
    oldest = (logged - 1) // 10 * 10 - 10
    latest = stepsafe.info(tmp_path / name).step
    assert latest % 10 == 0 and max(oldest, 10) <= latest <= newest, (latest, logged, out)
    resumed = run(tmp_path, name)
    assert f"started at {latest}, resume" in resumed
    assert_bit_exact(final_state(tmp_path, name), reference)


def test_sigterm_commits_a_checkpoint_at_the_current_step(tmp_path):
    code, out = run_until_step(tmp_path, "term", 13, signal.SIGTERM)
    assert code == 128 + signal.SIGTERM, out
    stopped = int(re.search(r"stopped by SIGTERM at step (\d+)", out).group(1))
    info = stepsafe.info(tmp_path / "term")
    assert info.step == stopped
    state = stepsafe.restore(tmp_path / "term")
    assert int(state["step"]) == stopped
    assert "Saved checkpoint at step" in out and "blocked" in out


def test_wall_clock_limit_saves_and_stops(tmp_path):
    p = start(tmp_path, "t", "steps=100000", "wall_clock_limit_seconds=1")
    out, err = p.communicate(timeout=300)
    assert p.returncode == 3, err  # the time limit's own exit status
    stopped = int(re.search(r"stopped by wall-clock limit at step (\d+)", out).group(1))
    assert 0 < stopped < 100000 and stepsafe.info(tmp_path / "t").step == stopped
