"""Campaign ``diskfull``: a save that runs out of space, sync and async, at many fill levels.

A child saves step 2 next to a committed step 1 with its file-size limit (RLIMIT_FSIZE, SIGXFSZ
ignored: a write past the limit fails with EFBIG, as a full disk fails with ENOSPC) set at a
random number of bytes, from a few (the metadata, the manifest) to the whole state. Then the
limit goes back up and the same manager saves step 3 ("space came back"). The promise: the
failed save raises a StepsafeError naming the checkpoint's path, it leaves nothing committed
or half-committed, step 1 is intact, the next save works, and nothing is left after the next
start. (A loop-mounted or tmpfs filesystem would give true ENOSPC; it needs privileges CI does
not have, so the harness does not rely on it.)
"""

from __future__ import annotations

import random
import resource
import signal

from stepsafe import StepsafeError
from stress import backends, checks
from stress.child import Child, say
from stress.kill import manager
from stress.report import Result, problems_of
from stress.states import Counter, make_state

NAME = "diskfull"
PROMISE = "save at any fill level: clean StepsafeError naming the path, earlier steps intact, "
PROMISE += "nothing half-committed, next save works"
TRIALS = {"short": 10, "full": 200}
NBYTES, FILE_BYTES = 256 << 10, 1 << 20


def child_save(run: str, limit: int, async_save: bool, keep: int) -> None:
    mgr = manager(run, keep, async_save, FILE_BYTES)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    for step in (2, 3):
        try:
            mgr.save(step, make_state(step, NBYTES), data_iterator=Counter(step), force=True)
            mgr.wait_until_finished()
            say("saved", step)
        except Exception as e:
            kind = "stepsafe" if isinstance(e, StepsafeError) else "other"
            say("error", step, kind, f"{type(e).__name__}: {e}".replace("\n", " "))
        resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))  # space comes back


def run(result: Result, trials: list[int]) -> None:
    for trial in trials:
        rng = random.Random(trial)
        limit = rng.randrange(4096) if rng.random() < 0.4 else rng.randrange(NBYTES + NBYTES // 4)
        async_save, keep = trial % 2 == 1, rng.choice([0, 1])
        case = f"{'async' if async_save else 'sync'} save, keep {keep}, file limit {limit} B"
        args = (result, trial, limit, async_save, keep)
        for problem in problems_of(lambda a=args: one_trial(*a)):
            result.fail(trial, f"{case}: {problem}")
        result.trials += 1


def one_trial(result: Result, trial: int, limit: int, async_save: bool, keep: int) -> list[str]:
    run_url = backends.fresh_url("local", f"diskfull-{trial}")
    sizes = {s: NBYTES for s in (1, 2, 3)} | {4: 1 << 12}
    with manager(run_url, file_bytes=FILE_BYTES) as setup:
        setup.save(1, make_state(1, NBYTES), force=True)
    args = {"run": run_url, "limit": limit, "async_save": async_save, "keep": keep}
    child = Child.start("stress.diskfull.child_save", args)
    rc = child.finish(120)
    if rc != 0:
        return [f"the child crashed or hung (exit {rc}): {child.last_error()}"]
    problems = []
    errors = {int(e.split(" ", 2)[0]): e.split(" ", 2)[1:] for e in child.said("error")}
    saved = {int(s) for s in child.said("saved")}
    result.count("save failed" if 2 in errors else "save fitted")
    if 2 in errors:
        kind, msg = errors[2]
        if kind != "stepsafe":
            problems.append(f"raised {msg} (not a StepsafeError)")
        elif checks.ckpt_dir(run_url) not in msg:
            problems.append(f"the error does not name the checkpoint's path: {msg}")
        if 2 in checks.committed(run_url):
            problems.append("step 2 is committed although its save was reported failed")
    if 3 in errors:
        problems.append(f"the next save after space came back failed: {errors[3][1]}")
    problems += checks.wrong_steps(run_url, sizes)
    problems += checks.lost_steps(run_url, {1} | saved, keep)
    manager(run_url, file_bytes=FILE_BYTES).close()  # the next start
    problems += [f"left after the next start: {x}" for x in checks.leftovers(run_url)]
    return problems
