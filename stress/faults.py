"""Campaign ``faults``: saves and restores through a proxy that breaks 10% of requests.

tests/fault_proxy.py sits between stepsafe and the loopback S3 / GCS server and answers 500 or
503, resets connections before or after the server acted, or stalls requests past the client's
timeout. The promise: every save either commits exactly what was saved or fails with a
StepsafeError and leaves nothing committed (a committed save is never reported as failed), and
a restore through the proxy returns exact data or raises a StepsafeError.
"""

from __future__ import annotations

import os
import random
import sys
import threading
from pathlib import Path
from typing import Any

from stepsafe import StepsafeError, restore, save
from stress import backends, checks
from stress.report import Result, problems_of
from stress.states import difference, make_state

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from fault_proxy import FaultProxy  # tests/ is not a package: on sys.path above

NAME = "faults"
PROMISE = "10% errors/resets/stalls: saves commit exactly or fail cleanly; restores exact or raise"
TRIALS = {"short": 4, "full": 200}
RATE, TRIAL_TIMEOUT_S = 0.1, 180.0


def run(result: Result, trials: list[int]) -> None:
    os.environ["STEPSAFE_S3_READ_TIMEOUT"] = "1"  # stalls (1.5 s) outlast it: retried requests
    for trial in trials:
        kind = ("s3", "gcs")[trial % 2]
        outcome: list[Any] = []
        worker = threading.Thread(
            target=lambda o=outcome, t=trial, k=kind: o.append(
                problems_of(lambda: one_trial(result, t, k))
            ),
            daemon=True,
        )
        worker.start()
        worker.join(TRIAL_TIMEOUT_S)
        problems = outcome[0] if outcome else [f"hung for {TRIAL_TIMEOUT_S:.0f} s"]
        for p in problems:
            result.fail(trial, f"{kind}: {p}")
        result.trials += 1
        backends.server(kind)  # talk to the server directly again


def one_trial(result: Result, trial: int, kind: str) -> list[str]:
    rng = random.Random(trial)
    run_url = backends.fresh_url(kind, f"faults-{trial}")
    server = backends.server(kind)
    step, nbytes = 1, rng.choice([1 << 14, 1 << 17, 1 << 19])
    path = f"{checks.ckpt_dir(run_url)}/{step}"
    state = make_state(step, nbytes)
    proxy = FaultProxy(server.url, rate=RATE, max_faults=10**6, seed=trial, stall_s=1.5)
    proxy.server.handle_error = lambda *args: None  # resets it injected are not news
    problems = []
    try:
        os.environ[backends.ENDPOINT_VARS[kind]] = proxy.url
        try:
            save(path, state, data_file_size_bytes=1 << 16)
            saved = None
        except StepsafeError as e:
            saved = e
        except Exception as e:
            return [f"save raised {type(e).__name__} (not a StepsafeError): {e}"]
        backends.server(kind)
        committed = step in checks.committed(run_url)
        result.count("save committed" if saved is None else "save failed cleanly")
        if saved is None and not committed:
            problems.append("save returned but the step is not committed")
        if saved is not None and committed:
            problems.append(f"save reported failed but the step is committed: {saved}")
        problems += checks.wrong_steps(run_url, {step: nbytes})
        if committed:
            os.environ[backends.ENDPOINT_VARS[kind]] = proxy.url
            try:
                wrong = difference(restore(path), state)
                result.count("restore exact" if not wrong else "restore WRONG")
                if wrong:
                    problems.append(f"restore through the proxy returned WRONG data: {wrong}")
            except StepsafeError:
                result.count("restore failed cleanly")
            except Exception as e:
                problems.append(f"restore raised {type(e).__name__} (not a StepsafeError): {e}")
        result.count("faults injected", sum(proxy.injected.values()))
    finally:
        backends.server(kind)
        proxy.stop()
    return problems
