"""Campaign ``kill``: SIGKILL at a random moment of save, retention, gc or restore.

A child process works on a run that already holds committed steps (local disk, S3 or GCS
loopback); the harness kills it after a random delay spread over the operation's measured
length (some trials let it finish, which also measures that length). Then: every committed step
restores bit-exact to the state of its step number, no step committed before is lost unless
retention was entitled to remove it, and after the next start (a new ``CheckpointManager``, the
next save, and on buckets ``gc``) nothing is left over.
"""

from __future__ import annotations

import random
import statistics
import time

from stepsafe.manager.gc import gc
from stepsafe.manager.manager import CheckpointManager, ManagerOptions
from stepsafe.storage import storage_for
from stress import backends, checks
from stress.child import Child, say
from stress.report import Result, problems_of
from stress.states import Counter, make_state

NAME = "kill"
PROMISE = (
    "SIGKILL during save/retention/gc/restore: 0 committed-but-wrong, 0 earlier steps lost, "
    "0 leftovers after the next start"
)
OPS = ("save", "retention", "gc", "restore")
# Trial t: operation OPS[t % 4] on disk "local", "s3", "local", "gcs" in blocks of 4 trials, so
# that 8 consecutive trials (--short) cover every operation on local disk and on one bucket,
# and --full gives local disk 400 trials, S3 and GCS 200 each, spread over the operations.
KIND_CYCLE = ("local", "s3", "local", "gcs")
TRIALS = {"short": 8, "full": 800}
LET_FINISH = 0.15  # share of trials not killed: they measure how long the operation takes
GUESS_S = {"local": 0.08, "s3": 0.8, "gcs": 0.8}  # the operation's length until one is measured
_durations: dict[tuple[str, str], list[float]] = {}


# -- the child's side ------------------------------------------------------------------------
def manager(run: str, keep: int = 0, async_save: bool = False, file_bytes: int = 1 << 16):
    opts = ManagerOptions(
        async_save=async_save,
        save_interval_steps=1,
        max_to_keep=keep,
        data_file_size_bytes=file_bytes,
    )
    return CheckpointManager(checks.ckpt_dir(run), opts)


def child_save(run: str, steps: list[int], sizes: dict, keep: int, async_save: bool,
               file_bytes: int) -> None:  # fmt: skip
    """Save ``steps`` in order; say which are known to be committed (for an async save: once
    the next save, or the final wait, returned)."""
    mgr = manager(run, keep, async_save, file_bytes)
    say("begin")
    for i, step in enumerate(steps):
        mgr.save(step, make_state(step, sizes[str(step)]), data_iterator=Counter(step), force=True)
        if not async_save:
            say("committed", step)
        elif i:
            say("committed", steps[i - 1])
    mgr.wait_until_finished()
    say("committed", steps[-1])
    say("end")


def child_gc(run: str, keep: int) -> None:
    from stepsafe.cli.main import main

    say("begin")
    rc = main(["gc", run, "--keep", str(keep)])
    say("end", rc)
    raise SystemExit(rc)


def child_restore(run: str, steps: list[int], rounds: int) -> None:
    from stepsafe import restore

    say("begin")
    for _ in range(rounds):
        for step in steps:
            restore(f"{checks.ckpt_dir(run)}/{step}")
    say("end")


# -- the harness's side ----------------------------------------------------------------------
def run(result: Result, trials: list[int]) -> None:
    for trial in trials:
        op, kind = OPS[trial % 4], KIND_CYCLE[trial // 4 % 4]
        for p in problems_of(lambda t=trial, o=op, k=kind: one_trial(result, t, o, k)):
            result.fail(trial, f"{op} on {kind}: {p}")
        result.trials += 1


def plan(rng: random.Random, op: str, kind: str) -> tuple[list[int], dict[int, int], dict, int]:
    """(steps committed first, sizes of every step, the child's call, the keep it works with)."""
    big = [1 << 18, 1 << 20, 4 << 20] if kind == "local" else [1 << 16, 1 << 18]
    if op == "save":
        first = list(range(1, rng.randint(1, 3) + 1))
        new = list(range(len(first) + 1, len(first) + 1 + rng.randint(1, 3)))
        keep = rng.choice([0, 0, 1, 2])
        sizes = {s: rng.choice(big) for s in first + new}
        args = {"steps": new, "keep": keep, "async_save": rng.random() < 0.5}
        call = ("child_save", args)
    elif op == "retention":
        first = [1, 2, 3]
        sizes = {s: rng.choice(big) for s in first} | {4: 1 << 14}
        keep = rng.choice([1, 2])
        call = ("child_save", {"steps": [4], "keep": keep, "async_save": rng.random() < 0.5})
    elif op == "gc":
        first = list(range(1, 5))
        sizes = {s: rng.choice(big) for s in first}
        keep = rng.choice([1, 2])
        call = ("child_gc", {"keep": keep})
    else:
        first = [1, 2]
        sizes = {s: rng.choice(big) for s in first}
        keep = 0
        call = ("child_restore", {"steps": first, "rounds": 3})
    name, args = call
    if name == "child_save":
        args |= {"sizes": {str(s): n for s, n in sizes.items()}, "file_bytes": 1 << 16}
    return first, sizes, {"func": name, "args": args, "file_bytes": 1 << 16}, keep


def one_trial(result: Result, trial: int, op: str, kind: str) -> list[str]:
    rng = random.Random(trial)
    run_url = backends.fresh_url(kind, f"kill-{op}-{trial}")
    first, sizes, call, keep = plan(rng, op, kind)
    with manager(run_url, file_bytes=call["file_bytes"]) as setup:
        for step in first:
            setup.save(step, make_state(step, sizes[step]), data_iterator=Counter(step), force=True)
    before = set(checks.committed(run_url))

    combo = (op, kind)
    known = _durations.get(combo, [])
    child = Child.start(f"stress.kill.{call['func']}", {"run": run_url, **call["args"]})
    begin = child.wait_for("begin", 120)
    if begin is None:
        child.finish(10)
        return [f"the child did not start: {child.last_error()}"]
    killed = rng.random() >= LET_FINISH
    if killed:
        length = statistics.median(known) if known else GUESS_S[kind]
        delay = rng.uniform(0, 1.2 * length)
        time.sleep(max(0.0, begin + delay - time.monotonic()))
        child.kill()
    rc = child.finish(120)
    end = child.wait_for("end", 0.2)
    problems = []
    if rc is None:
        problems.append("the child hung for 120 s")
    elif end is not None:
        _durations.setdefault(combo, []).append(end - begin)
        if rc != 0 and not (killed and rc == -9):  # killed while exiting: fine
            err = child.last_error()
            problems.append(f"the {op} failed although not killed (exit {rc}): {err}")
    result.count(f"{op} on {kind}: {'killed' if end is None else 'finished'}")
    before |= {int(s) for s in child.said("committed")}

    problems += checks.wrong_steps(run_url, sizes)
    problems += checks.lost_steps(run_url, before, keep)
    problems += next_start(run_url, kind, sizes, call["file_bytes"])
    if not problems:
        storage, path = storage_for(run_url)
        storage.delete_tree(path)
    return problems


def next_start(run_url: str, kind: str, sizes: dict[int, int], file_bytes: int) -> list[str]:
    """Start the run again as a trainer would, save the next step, then look for leftovers."""
    with manager(run_url, file_bytes=file_bytes) as mgr:
        return _next_start(mgr, run_url, kind, sizes)


def _next_start(mgr: CheckpointManager, run_url: str, kind: str, sizes: dict[int, int]) -> list:
    problems = []
    if kind == "local":
        problems += [f"left after the next start: {x}" for x in checks.leftovers(run_url)]
    storage, d = storage_for(checks.ckpt_dir(run_url))
    names = [n.split(".", 1)[0] for n in storage.list_dir(d)] if storage.is_dir(d) else []
    step = max([int(n) for n in names if n.isdigit()] + [0]) + 1
    sizes[step] = 1 << 14
    try:
        mgr.save(step, make_state(step, sizes[step]), force=True)
        mgr.wait_until_finished()
    except Exception as e:
        return [*problems, f"the next save (step {step}) failed: {type(e).__name__}: {e}"]
    problems += checks.wrong_steps(run_url, sizes)
    if kind != "local":
        gc(run_url, 10**9)
        problems += [f"left after the next save and gc: {x}" for x in checks.leftovers(run_url)]
    return problems
