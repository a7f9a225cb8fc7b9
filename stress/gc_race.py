"""Campaign ``gc_race``: ``stepsafe gc --keep 2`` in a loop beside a live training run.

A child trainer saves every step (keep=2, sync or async) while another child runs
``stepsafe gc RUN --keep 2`` over and over, and the harness keeps restoring the newest step.
The promise: no save is reported failed although it committed, the trainer is never stopped by
a save failure, gc never crashes (a traceback), the newest committed step always restores
exactly, and every committed step is exact.
"""

from __future__ import annotations

import contextlib
import io
import time
from pathlib import Path

from stepsafe import StepsafeError, restore
from stress import backends, checks
from stress.child import Child, say
from stress.kill import manager
from stress.report import Result, problems_of
from stress.states import difference, make_state

NAME = "gc_race"
PROMISE = "gc --keep 2 looping beside a live run (keep=2): 0 committed saves reported failed, "
PROMISE += "newest step always restores"
TRIALS = {"short": 2, "full": 20}
STEPS, NBYTES = 30, 32 << 10


def child_train(run: str, async_save: bool) -> None:
    """Save every step; report each save as saved or failed (an async save's failure surfaces
    at the next save or the final wait) and keep going, to count them all."""
    mgr = manager(run, keep=2, async_save=async_save, file_bytes=1 << 14)
    say("begin")
    pending = None
    for step in range(1, STEPS + 1):
        try:
            mgr.save(step, make_state(step, NBYTES), force=True)
            if pending is not None:
                say("saved", pending)
        except Exception as e:
            failed = pending if async_save else step
            say("failed", failed, failed in mgr.all_steps(), f"{type(e).__name__}: {e}")
        pending = step if async_save else None
        if not async_save:
            say("saved", step)
    try:
        mgr.wait_until_finished()
        if pending is not None:
            say("saved", pending)
    except Exception as e:
        say("failed", pending, pending in mgr.all_steps(), f"{type(e).__name__}: {e}")
    say("end")


def child_gc_loop(run: str, stop_file: str) -> None:
    from stepsafe.cli.main import main

    while not Path(stop_file).exists():
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                rc = main(["gc", run, "--keep", "2"])
            say("gc", rc)
        except Exception as e:
            say("gccrash", f"{type(e).__name__}: {e}")


def run(result: Result, trials: list[int]) -> None:
    for trial in trials:
        async_save = trial % 2 == 1
        for p in problems_of(lambda t=trial, a=async_save: one_trial(result, t, a)):
            result.fail(trial, f"{'async' if async_save else 'sync'} saves: {p}")
        result.trials += 1


def one_trial(result: Result, trial: int, async_save: bool) -> list[str]:
    run_url = backends.fresh_url("local", f"gcrace-{trial}")
    stop = backends.scratch() / f"gcrace-{trial}.stop"
    trainer = Child.start("stress.gc_race.child_train", {"run": run_url, "async_save": async_save})
    trainer.wait_for("begin", 60)
    gc_loop = Child.start("stress.gc_race.child_gc_loop", {"run": run_url, "stop_file": str(stop)})
    problems, reads = [], 0
    while trainer.proc.poll() is None:
        problems += read_newest(run_url)
        reads += 1
        time.sleep(0.05)
    rc = trainer.finish(120)
    stop.touch()
    gc_loop.finish(60)
    sizes = {s: NBYTES for s in range(1, STEPS + 1)}
    failed = {}
    for line in trainer.said("failed"):
        step, was_committed, err = line.split(" ", 2)
        failed[int(step) if step.isdigit() else -1] = (was_committed == "True", err)
    committed = set(checks.committed(run_url))
    for step, (was_committed, err) in sorted(failed.items()):
        if was_committed or step in committed:
            problems.append(f"step {step} reported failed though it committed: {err[:200]}")
            result.count("failed though committed")
        else:
            problems.append(f"save of step {step} failed: {err[:200]}")
    if rc != 0:
        problems.append(f"the trainer died (exit {rc}): {trainer.last_error()}")
    problems += [f"gc crashed: {c[:200]}" for c in gc_loop.said("gccrash")]
    problems += checks.wrong_steps(run_url, sizes)
    if max(committed, default=0) != STEPS:
        problems.append(f"the last step {STEPS} is not the newest committed: {sorted(committed)}")
    result.count("saves", STEPS)
    result.count("saves reported failed", len(failed))
    result.count("gc runs", len(gc_loop.said("gc")))
    result.count("newest-step reads", reads)
    return problems


def read_newest(run_url: str) -> list[str]:
    """Restore the newest committed step; a failure counts only if that step is still there
    afterwards (retention may delete it legitimately once two newer ones are committed)."""
    steps = checks.committed(run_url)
    if not steps:
        return []
    step = steps[-1]
    try:
        wrong = difference(restore(f"{checks.ckpt_dir(run_url)}/{step}"), make_state(step, NBYTES))
    except StepsafeError as e:
        newer = [s for s in checks.committed(run_url) if s > step]
        if step in checks.committed(run_url) or len(newer) < 2:
            return [f"the newest step {step} did not restore: {type(e).__name__}: {e}"]
        return []
    return [f"the newest step {step} restored WRONG data: {wrong}"] if wrong else []
