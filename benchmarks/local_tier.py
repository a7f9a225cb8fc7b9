"""The local tier (issue #14) beside the persistent one, measured:
``.venv/bin/python benchmarks/local_tier.py`` (or ``python -m benchmarks.local_tier``).

1. Saves, in one process, by one ``CheckpointManager`` (async) holding both tiers: a local step
   (``local_directory`` on this machine's disk) and a persistent step to an S3 bucket on a
   loopback moto server. The caller's clock: blocked = the ``save`` call, total = until
   ``wait_until_finished``; the persistent save also has the manager's own
   ``last_save_seconds``, the local one the tier's own log line. Each manager's first save of
   each tier is shown apart: it allocates the staging buffers later saves reuse.
2. Restores, as a restarted job resumes (a fresh manager, ``restore_newest``): with the local
   tier holding the newest step, then with the local directory wiped, so that the bucket's
   step is restored. The page cache is emptied first (``fsutil``).
3. Steps lost to a SIGKILL: the demo trainer (``stepsafe train``, a small model, async saves)
   with ``local_checkpoint_period=10`` and ``checkpoint_period=100`` is killed at a few steps
   drawn at random (a fixed draw: a rerun kills at the same steps), then restarted; lost =
   the last step it logged - the step it resumed at. The same kill without the local tier
   shows what the persistent tier alone loses.

Results: ``RESULTS-local-tier.md`` (``report/local_tier.py``); raw JSON under ``out/``.
"""

# ruff: noqa: E402
# (imports follow the fix of sys.path below)
from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if __name__ == "__main__" and Path(sys.path[0]).resolve() == HERE:
    # Run as a script: import ``benchmarks`` as a package; its modules must not shadow the
    # standard library's (benchmarks/profile.py would hide ``profile``).
    sys.path[0] = str(HERE.parent)

import argparse
import logging
import os
import random
import re
import subprocess
import time
from typing import Any

import numpy as np

from benchmarks import clocks, fsutil, machine, memory, states, storages
from benchmarks.methods.buckets import bucket_fs, warm_up
from benchmarks.report.local_tier import render

OUT = HERE / "out"
PACKAGES = ("stepsafe", "numpy", "xxhash", "s3fs", "botocore", "moto", "jax", "jaxlib")
LOCAL_EVERY, PERSISTENT_EVERY = 2, 3  # save steps: 2, 4, 8, 10 local only; 3, 9 persistent only
TRAIN = [
    "log_period=1", "warmup_steps=5", "emb_dim=32", "mlp_dim=64", "max_target_length=16",
    "per_device_batch_size=4", "async_checkpointing=true", "max_num_checkpoints_to_keep=0",
]  # fmt: skip
LOCAL_FLAGS = ["enable_emergency_checkpoint=true"]


class TierLog(logging.Handler):
    """The local tier's own figures, from its log line (it has no attribute for them)."""

    PATTERN = re.compile(
        r"Saved local checkpoint at step (\d+) .*blocked ([\d.]+) s, total ([\d.]+)"
    )

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.seen: dict[int, tuple[float, float]] = {}

    def emit(self, record: logging.LogRecord) -> None:
        m = self.PATTERN.search(record.getMessage())
        if m:
            self.seen[int(m.group(1))] = (float(m.group(2)), float(m.group(3)))


def timed_save(m: Any, step: int, tree: Any, tier: str, server: Any, log: TierLog) -> dict:
    """One save of ``tier`` and its commit, nothing else in flight."""
    m.wait_until_finished()
    before, last = memory.rss(), m.last_save_seconds
    memory.reset_peak()
    c0 = clocks.now(server)
    t0 = time.perf_counter()
    started = m.save(step, tree)
    blocked = time.perf_counter() - t0
    m.wait_until_finished()
    total = time.perf_counter() - t0
    rec = {"tier": tier, "step": step, "started": started, "blocked_s": blocked, "total_s": total}
    rec |= {"peak_over_before": memory.peak() - before, **clocks.spent(c0, clocks.now(server))}
    steps = m.local_steps() if tier == "local" else m.all_steps()
    rec["committed"] = step in steps
    own = m.last_save_seconds if tier == "persistent" else log.seen.get(step)
    if own is not None and own is not last:
        rec["own_blocked_s"], rec["own_total_s"] = own
    return rec


def same(a: Any, b: Any, state: str) -> bool:
    """Every leaf restored bit for bit."""
    for spec in states.specs(state):
        x, y = a, b
        for k in spec.key:
            x, y = x[k], y[k]
        if not np.array_equal(np.asarray(x), np.asarray(y)):
            return False
    return True


def timed_restore(directory: str, opts: Any, tree: Any, a: argparse.Namespace, **info: Any) -> dict:
    """A fresh manager (as a restarted job makes it), the page cache emptied, then
    ``restore_newest`` alone on the clock."""
    from benchmarks.methods.stepsafe import target
    from stepsafe.manager import CheckpointManager

    with CheckpointManager(directory, opts) as m:
        fsutil.evict(opts.local_directory, a.cold)
        before = memory.rss()
        memory.reset_peak()
        c0 = clocks.now(a.server)
        t0 = time.perf_counter()
        step, restored = m.restore_newest(target(a.state))
        secs = time.perf_counter() - t0
        rec = {**info, "seconds": secs, "step": step, "path": m.restored_path}
        rec |= {"peak_over_state": memory.peak() - before - states.nbytes(a.state)}
        rec |= {
            **clocks.spent(c0, clocks.now(a.server)),
            "bit_exact": same(tree, restored, a.state),
        }
    return rec


def measure_tiers(a: argparse.Namespace, run: dict[str, Any]) -> None:
    """Saves and restores of both tiers, ``a.repeats`` times, one moto server throughout
    (stepsafe keeps one S3 client per process: a server per repeat would need a process each)."""
    from stepsafe.manager import CheckpointManager, ManagerOptions

    storages.isolate()
    a.cold = run["cold"] = fsutil.cold_method()
    log = TierLog()
    logging.getLogger("stepsafe").addHandler(log)
    logging.getLogger("stepsafe").setLevel(logging.INFO)
    tree = states.build(a.state)
    with storages.session("s3", OUT) as session:
        os.environ.update(session.env or {})
        a.server = session.server
        fs = bucket_fs("s3")
        prefix = f"{storages.BUCKET}/local-tier-{run['stamp']}"
        warm_up(fs, f"s3://{prefix}")
        for r in range(a.repeats):
            persistent = f"s3://{prefix}/r{r}/checkpoints"
            local = a.scratch / f"r{r}" / "local"
            # Nothing deleted by retention: a save's total is its commit alone.
            opts = ManagerOptions(
                async_save=True, save_interval_steps=PERSISTENT_EVERY, max_to_keep=0,
                local_directory=str(local), local_save_interval_steps=LOCAL_EVERY,
                local_max_to_keep=4,
            )  # fmt: skip
            with CheckpointManager(persistent, opts) as m:
                for step, tier, first in ((2, "local", 1), (3, "persistent", 1),
                                          (9, "persistent", 0), (10, "local", 0)):  # fmt: skip
                    rec = timed_save(m, step, tree, tier, a.server, log)
                    run["saves"].append({**rec, "repeat": r, "first": bool(first)})
                    print(_brief(run["saves"][-1]), flush=True)
            kw = {"repeat": r, "expect": 10, "tier": "local"}
            run["restores"].append(timed_restore(persistent, opts, tree, a, **kw))
            print(_brief(run["restores"][-1]), flush=True)
            fsutil.remove(local)
            kw |= {"expect": 9, "tier": "persistent"}
            run["restores"].append(timed_restore(persistent, opts, tree, a, **kw))
            print(_brief(run["restores"][-1]), flush=True)
            fs.rm(f"{prefix}/r{r}", recursive=True)
            fsutil.remove(a.scratch / f"r{r}")
    logging.getLogger("stepsafe").removeHandler(log)


def trainer(base: Path, name: str, flags: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "stepsafe.cli.main", "train", "--no-progress",
           f"base_output_directory={base}", f"run_name={name}", *TRAIN, *flags]  # fmt: skip
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def run_until(p: subprocess.Popen, pattern: str, when: Any, timeout: float) -> tuple[str, float]:
    """SIGKILL ``p`` at the first stderr line matching ``pattern`` for which ``when(match)``;
    its whole output, and the time of the kill (``time.monotonic``)."""
    lines, killed_at = [], float("nan")
    deadline = time.monotonic() + timeout
    assert p.stderr is not None
    for line in p.stderr:
        lines.append(line)
        m = re.search(pattern, line)
        if (m and when(m)) or time.monotonic() > deadline:
            p.kill()
            killed_at = time.monotonic()
            break
    out, err = p.communicate(timeout=60)
    return "".join(lines) + err + out, killed_at


def kill_trial(a: argparse.Namespace, i: int, at: int, with_local: bool) -> dict[str, Any]:
    """Train from scratch, SIGKILL once step ``at`` is logged, restart, read where it resumed."""
    from stepsafe.manager import CheckpointManager, ManagerOptions

    base, name = a.scratch / f"kill{i}-{'local' if with_local else 'persistent'}", "run"
    local = base / "local"
    flags = [f"steps={a.train_steps}", f"checkpoint_period={a.checkpoint_period}"]
    if with_local:
        flags += [*LOCAL_FLAGS, f"local_checkpoint_directory={local}"]
        flags += [f"local_checkpoint_period={a.local_period}"]
    rec: dict[str, Any] = {"trial": i, "at": at, "local_tier": with_local}
    log, _ = run_until(trainer(base, name, flags), r"INFO step (\d+) loss",
                       lambda m: int(m.group(1)) >= at, a.timeout)  # fmt: skip
    logged = [int(s) for s in re.findall(r"INFO step (\d+) loss", log)]
    rec["killed"] = max(logged, default=0)
    if "finished at step" in log or rec["killed"] < at:
        return {**rec, "error": "not killed at the step: " + log[-800:]}
    read_only = ManagerOptions(enable_checkpointing=False)
    held = CheckpointManager(str(base / name / "checkpoints"), read_only).all_steps()
    rec["persistent_held"] = held[-1] if held else None
    if with_local:
        own = CheckpointManager(str(local / name), read_only).all_steps()
        rec["local_held"] = own[-1] if own else None
    t0 = time.monotonic()
    start = r"Starting at step (\d+) \((\w+)(?:: (.*))?\)"
    log, t1 = run_until(trainer(base, name, flags), start, lambda m: True, a.timeout)
    m = re.search(start, log)
    if m is None:
        return {**rec, "error": "the restart did not start: " + log[-800:]}
    rec |= {"resumed": int(m.group(1)), "source": m.group(2), "path": m.group(3) or ""}
    from_local = rec["path"].startswith(str(local))
    rec["tier"] = "local" if from_local else "persistent" if rec["source"] == "resume" else "none"
    rec |= {"lost": rec["killed"] - rec["resumed"], "restart_s": t1 - t0}
    fsutil.remove(base)
    return rec


def measure_kills(a: argparse.Namespace, run: dict[str, Any]) -> None:
    draw = random.Random(14)  # fixed: a rerun kills at the same steps
    span = range(a.local_period + 5, a.train_steps - 2 * a.local_period)
    run["kill_steps"] = draw.sample(span, a.kills)
    for i, at in enumerate(run["kill_steps"]):
        for with_local in (True, False):
            run["kills"].append(kill_trial(a, i, at, with_local))
            print(_brief(run["kills"][-1]), flush=True)


def _brief(rec: dict[str, Any]) -> str:
    if "error" in rec:
        return f"ERROR {rec}"
    if "blocked_s" in rec:
        return (f"r{rec['repeat']} save {rec['tier']} step {rec['step']}: blocked "
                f"{rec['blocked_s']:.3f} s, total {rec['total_s']:.3f} s")  # fmt: skip
    if "seconds" in rec:
        return (f"r{rec['repeat']} restore {rec['tier']}: step {rec['step']} in "
                f"{rec['seconds']:.3f} s, bit-exact {rec['bit_exact']}")  # fmt: skip
    return (
        f"kill {rec['trial']} ({'local+persistent' if rec['local_tier'] else 'persistent'}):"
        f" killed {rec['killed']}, resumed {rec['resumed']} ({rec['tier']}), lost {rec['lost']}"
    )


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="benchmarks/local_tier.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--state", default="m95", help="a state of benchmarks/states.py")
    p.add_argument("--repeats", type=int, default=3, help="of the saves and restores")
    p.add_argument("--kills", type=int, default=5, help="kill trials (each: with, without)")
    p.add_argument("--train-steps", type=int, default=300)
    p.add_argument("--checkpoint-period", type=int, default=100)
    p.add_argument("--local-period", type=int, default=10)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds for one trainer run")
    p.add_argument("--snapshot", action="store_true",
                   help="measure stepsafe as committed at HEAD, not the working tree")  # fmt: skip
    p.add_argument("--results", default=None,
                   help="markdown (default: RESULTS-local-tier.md for a full m95 run)")  # fmt: skip
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    a = parse(argv)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    full = a.state == "m95" and a.repeats >= 1 and a.kills >= 1
    results = a.results or str(
        HERE / "RESULTS-local-tier.md" if full else OUT / f"local-tier-{stamp}.md"
    )
    a.scratch = OUT / "scratch" / f"local-tier-{stamp}"
    a.scratch.mkdir(parents=True)
    run: dict[str, Any] = {
        "stamp": stamp,
        "command": "benchmarks/local_tier.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "state": a.state, "nbytes": states.nbytes(a.state), "leaves": len(states.specs(a.state)),
        "repeats": a.repeats, "train": TRAIN, "train_steps": a.train_steps,
        "checkpoint_period": a.checkpoint_period, "local_period": a.local_period,
        "machine": machine.describe(str(OUT)), "versions": machine.versions(PACKAGES),
        "stepsafe_source": machine.snapshot_head(OUT) if a.snapshot else machine.stepsafe_source(),
        "saves": [], "restores": [], "kills": [],
    }  # fmt: skip
    t0 = time.monotonic()
    try:
        if a.repeats:
            measure_tiers(a, run)
        if a.kills:
            measure_kills(a, run)
    finally:
        fsutil.remove(a.scratch)
    run["wall_s"] = time.monotonic() - t0
    machine.finish_run(run, OUT / f"local-tier-{stamp}.json", results, render,
                       source_may_change=not a.snapshot)  # fmt: skip


if __name__ == "__main__":
    main()
