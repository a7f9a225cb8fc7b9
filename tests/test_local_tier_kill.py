"""Emergency checkpoints in the demo trainer, killed: SIGKILL at a random step, a restart resumes
from the local tier (losing at most a local period or two of steps, not a checkpoint period),
and the run ends bit-exact with an uninterrupted one. Real subprocesses, real files; one
process, then a whole 2-process job killed and restarted.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
from pathlib import Path

import jax_processes
import pytest

pytest.importorskip("jax")

from trees import assert_bit_exact

import stepsafe

STEPS = 40
PERIOD = 5  # local_checkpoint_period
FLAGS = [
    f"steps={STEPS}", "checkpoint_period=100", "log_period=1", "warmup_steps=5",
    "emb_dim=16", "num_heads=2", "mlp_dim=32", "vocab_size=32", "max_target_length=8",
    "per_device_batch_size=2", "num_decoder_layers=1", "max_num_checkpoints_to_keep=0",
    "enable_emergency_checkpoint=true",
    f"local_checkpoint_period={PERIOD}",
]  # fmt: skip
LOGGED = re.compile(r"INFO step (\d+) loss")


def command(tmp_path: Path, name: str, local: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "stepsafe.cli.main", "train", "--no-progress",
        f"base_output_directory={tmp_path}", f"run_name={name}", *FLAGS,
        f"local_checkpoint_directory={local}", *extra,
    ]  # fmt: skip


def environment(tmp_path: Path, devices: int) -> dict[str, str]:
    return {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "PYTHONUNBUFFERED": "1",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        "JAX_COMPILATION_CACHE_DIR": str(tmp_path.parent / "jax-cache"),  # compile once
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    }


def start(tmp_path: Path, name: str, async_save: bool = True) -> subprocess.Popen:
    return subprocess.Popen(
        command(
            tmp_path, name, tmp_path / "local", f"async_checkpointing={str(async_save).lower()}"
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=environment(tmp_path, 1),
    )


def finish(p: subprocess.Popen) -> str:
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out[-4000:]
    return out


def final_state(tmp_path: Path, name: str) -> dict:
    return stepsafe.restore(tmp_path / name / "checkpoints" / str(STEPS))


def kill_after(p: subprocess.Popen, step: int) -> tuple[int, str]:
    """SIGKILL ``p`` once it logged ``step``; (its exit code, everything it printed)."""
    assert p.stdout is not None
    lines = []
    for line in p.stdout:
        lines.append(line)
        m = LOGGED.search(line)
        if m and int(m.group(1)) >= step:
            p.send_signal(signal.SIGKILL)
            break
    out, _ = p.communicate(timeout=300)
    return p.returncode, "".join(lines) + out


def bound(logged: int, async_save: bool = True) -> int:
    """The oldest step a resume may take after a kill once step ``logged`` was logged.

    Step k is logged before ``save(k)``: every local save of a step before ``logged`` was
    started. Without async saves each committed before the next step: at most ``PERIOD``
    steps are lost. With them, a save starts only after the one before it committed, so all
    but the newest started one committed: the one in flight adds up to ``PERIOD`` more."""
    newest_started = (logged - 1) // PERIOD * PERIOD
    return max(newest_started - PERIOD * async_save, 0)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("ref")
    finish(start(tmp, "ref"))
    return final_state(tmp, "ref")


@pytest.mark.parametrize("async_save", [True, False], ids=["async", "sync"])
def test_sigkill_at_a_random_step_resumes_from_the_local_tier_exactly(
    tmp_path, reference, async_save
):
    at = random.Random(14 + async_save).randint(2 * PERIOD, STEPS - PERIOD)
    for attempt in range(3):
        name = f"kill{attempt}"
        code, out = kill_after(start(tmp_path, name, async_save), at)
        if code == -signal.SIGKILL:
            break
        assert code == 0, out[-4000:]  # a loaded machine: it finished before the kill landed
    else:
        pytest.fail(f"3 runs of {STEPS} steps all finished before a SIGKILL sent at step {at}")
    logged = max(int(s) for s in LOGGED.findall(out))
    assert logged >= at, out[-4000:]
    persistent = tmp_path / name / "checkpoints"
    assert not [p for p in persistent.iterdir() if p.name.isdigit()]  # only the local tier
    local = tmp_path / "local" / name
    steps = sorted(int(p.name) for p in local.iterdir() if p.name.isdigit())

    resumed = finish(start(tmp_path, name, async_save))
    m = re.search(r"Restored step (\d+) from the local tier", resumed)
    assert m, resumed[-4000:]
    step = int(m.group(1))
    lost = logged - step
    print(f"async={async_save}: killed after step {at} was logged, last logged {logged}, local "
          f"steps {steps}, resumed at {step}: {lost} steps lost (period {PERIOD})")  # fmt: skip
    assert step == steps[-1] and bound(logged, async_save) <= step <= logged, (step, logged)
    assert f"Starting at step {step} (resume: {local / str(step)})" in resumed, resumed[-4000:]
    assert f"finished at step {STEPS} (started at {step}, resume)" in resumed
    leftovers = [p.name for p in local.iterdir() if "stepsafe-tmp" in p.name]
    assert not leftovers, leftovers  # the killed save's temporary directory was cleaned
    assert_bit_exact(final_state(tmp_path, name), reference)


# -- a 2-process job: one process SIGKILLed, then the other, and the whole job restarted ------


def start_job(tmp_path: Path, name: str) -> list[subprocess.Popen]:
    """The trainer as 2 processes of one jax.distributed job on one host, given one local
    directory: each process keeps its own under it (``<run_name>/process_<p>``)."""
    port = jax_processes.free_port()
    env = {**environment(tmp_path, 2), "JAX_COORDINATOR_BIND_ADDRESS": f"127.0.0.1:{port}"}
    return [
        subprocess.Popen(
            command(
                tmp_path,
                name,
                tmp_path / "local",
                f"jax_coordinator_address=127.0.0.1:{port}",
                "jax_num_processes=2",
                f"jax_process_id={i}",
                "async_checkpointing=true",
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        for i in range(2)
    ]


def finish_job(procs: list[subprocess.Popen]) -> list[str]:
    outs = []
    for p in procs:
        out, _ = p.communicate(timeout=300)
        outs.append(out)
    for p in procs:
        assert p.returncode == 0, "\n".join(o[-3000:] for o in outs)
    return outs


@pytest.fixture(scope="module")
def job_reference(tmp_path_factory) -> dict:
    if not jax_processes.hostname_is_loopback():
        pytest.skip("this host's name does not resolve to loopback: gloo would listen beyond it")
    tmp = tmp_path_factory.mktemp("jobref")
    finish_job(start_job(tmp, "ref"))
    return final_state(tmp, "ref")


def test_a_killed_job_restarts_from_every_process_s_local_tier_exactly(tmp_path, job_reference):
    at = random.Random(41).randint(2 * PERIOD, STEPS - PERIOD)
    procs = start_job(tmp_path, "job")
    survivor, victim = procs
    assert victim.stdout is not None
    lines = []
    for line in victim.stdout:
        lines.append(line)
        m = LOGGED.search(line)
        if m and int(m.group(1)) >= at:
            victim.send_signal(signal.SIGKILL)
            survivor.send_signal(signal.SIGKILL)  # a whole-job restart, as a scheduler does
            break
    for p in procs:
        p.communicate(timeout=300)
    if victim.returncode == 0:
        pytest.skip("the job finished before the kill landed (a loaded machine)")
    assert victim.returncode == -signal.SIGKILL, "".join(lines)[-4000:]
    logged = max(int(s) for s in LOGGED.findall("".join(lines)))
    outs = finish_job(start_job(tmp_path, "job"))
    found = [re.search(r"Restored step (\d+) from the local tier", out) for out in outs]
    assert all(found), "\n".join(o[-3000:] for o in outs)
    step0, step1 = (int(m.group(1)) for m in found if m)
    print(f"job killed after step {at}, last logged {logged}, resumed at {step1}: "
          f"{logged - step1} steps lost (local period {PERIOD})")  # fmt: skip
    assert step0 == step1 and bound(logged) <= step1 <= logged, (step0, step1, logged)
    for i, out in enumerate(outs):
        where = tmp_path / "local" / "job" / f"process_{i}" / str(step1)
        assert f"Starting at step {step1} (resume: {where})" in out, out[-3000:]
    assert_bit_exact(final_state(tmp_path, "job"), job_reference)
