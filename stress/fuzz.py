"""Campaign ``fuzz``: forged manifests and metadata, and hostile files inside a step.

Hypothesis draws mutations of the JSON documents (a value replaced by any JSON value, huge
numbers included; a key deleted or added; a list element duplicated); the harness recomputes
the checksums a forger would (the manifest's, kept in the metadata, and the metadata's own), so
only validation stands between the mutation and a reader. Then every reader runs: restore (with
and without verification), verify, metadata, info, a manager's start-up, ``ls``, ``inspect``,
``gc --dry-run``. Fixed cases add FIFOs, symlinks to /dev/zero and out of the step, and claims
of huge chunks (sparse files). The promise: only StepsafeError subclasses, in bounded time (a
case silent for CASE_TIMEOUT_S is a hang) and bounded memory (the child runs under RLIMIT_AS).
"""

from __future__ import annotations

import json
import resource
import shutil
from pathlib import Path
from typing import Any

from stress import backends
from stress.child import Child, say
from stress.forged import META, STEP, make_template, manifest_of, read_all, write_sealed
from stress.hostile import hostile_cases
from stress.report import Result

NAME = "fuzz"
PROMISE = "forged JSON, FIFOs, symlinks, huge claims: only StepsafeError, bounded time and memory"
TRIALS = {"short": 60, "full": 1000}
BATCH = 50  # hypothesis examples per child process
CASE_TIMEOUT_S = 20.0
MEMORY_LIMIT = 3 << 30  # RLIMIT_AS of the child: a reader allocating what a file claims dies


# -- the child's side ------------------------------------------------------------------------
def child_fuzz(template: str, work: str, first: int, count: int) -> None:
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hseed
    from hypothesis import strategies as st

    step = Path(work) / "run" / "checkpoints" / str(STEP)
    n = [0]

    @settings(max_examples=count, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @hseed(first)
    @given(st.data())
    def case(data: st.DataObject) -> None:
        shutil.rmtree(step.parent.parent.parent, ignore_errors=True)
        shutil.copytree(Path(template).parent.parent.parent, step.parent.parent.parent)
        which = data.draw(st.sampled_from(["manifest", "metadata"]))
        path = manifest_of(step) if which == "manifest" else step / META
        doc = json.loads(path.read_bytes())
        desc = mutate(data, doc)
        if which == "manifest":
            write_sealed(step, manifest=doc)
        else:
            write_sealed(step, meta=doc)
        say("case", n[0])
        for problem in read_all(step, f"example {n[0]}: {which} {desc}"):
            say("fail", problem)
        n[0] += 1

    case()
    say("end")


def json_values():
    from hypothesis import strategies as st

    huge = st.sampled_from([-1, 0, 2**31, 2**40, 4 * 10**15, 2**63, 2**64 + 1, 10**400])
    leaf = st.one_of(st.none(), st.booleans(), st.integers(), huge, st.floats(),
                     st.text(max_size=20))  # fmt: skip
    return st.recursive(
        leaf, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8),
                                                                         kids, max_size=4),
        max_leaves=12,
    )  # fmt: skip


def mutate(data: Any, doc: Any) -> str:
    """Change one place in ``doc`` in place; a description of the change."""
    from hypothesis import strategies as st

    places: list[tuple[Any, Any, str]] = []  # (container, key, path)

    def walk(node: Any, path: str) -> None:
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for k, v in items:
            places.append((node, k, f"{path}/{k}"))
            if isinstance(v, dict | list):
                walk(v, f"{path}/{k}")

    walk(doc, "")
    parent, key, path = data.draw(st.sampled_from(places))
    action = data.draw(st.sampled_from(["replace", "replace", "delete", "add", "duplicate"]))
    if action == "delete" or (action == "duplicate" and not isinstance(parent, list)):
        del parent[key]
        return f"deleted {path}"
    if action == "duplicate":
        parent.insert(key, json.loads(json.dumps(parent[key])))
        return f"duplicated {path}"
    value = data.draw(json_values())
    if action == "add" and isinstance(parent, dict):
        new_key = data.draw(st.text(max_size=8))
        parent[new_key] = value
        return f"added {path.rsplit('/', 1)[0]}/{new_key!r} = {str(value)[:60]}"
    parent[key] = value
    return f"set {path} = {str(value)[:60]}"


# -- the harness's side ----------------------------------------------------------------------
def limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def watch(child: Child, result: Result, first: int, trials: int, label: str) -> int:
    """Follow a child's cases; record failures and a hang; the number of cases it started."""
    hung = False
    while True:
        before = len(child.lines)
        ended = child.wait_for("end", CASE_TIMEOUT_S)
        if ended is not None or child.proc.poll() is not None:
            break
        if len(child.lines) == before:  # nothing for CASE_TIMEOUT_S: a hang
            cases = child.said("case")
            where = f"case {cases[-1]}" if cases else "start-up"
            result.fail(first, f"{label}: {where} hung for {CASE_TIMEOUT_S:.0f} s", trials)
            child.kill()
            hung = True
            break
    rc = child.finish(5)
    for problem in child.said("fail"):
        result.fail(first, problem, trials)
    seen = len(child.said("case"))
    if rc not in (0, None) and not child.said("end") and not hung:
        cases = child.said("case")
        where = f"after case {cases[-1]}" if cases else "at start-up"
        result.fail(first, f"{label}: the child died {where} (exit {rc}): {child.last_error()}",
                    trials)  # fmt: skip
    return seen


def run(result: Result, trials: list[int]) -> None:
    base = backends.scratch() / "fuzz"
    template = make_template(base / "template")
    for i in range(0, len(trials), BATCH):
        first, count = trials[i], min(BATCH, len(trials) - i)
        args = {"template": str(template), "work": str(base / f"w{first}"), "first": first,
                "count": count}  # fmt: skip
        child = Child.start("stress.fuzz.child_fuzz", args, preexec=limit_memory)
        result.trials += watch(child, result, first, count, f"mutations from {first}")
    cases = hostile_cases()
    while cases:  # one child for all; after a hang or a crash, a new one for the rest
        args = {"template": str(template), "work": str(base / "hostile"), "cases": cases}
        child = Child.start("stress.hostile.child_hostile", args, preexec=limit_memory)
        started = watch(child, result, trials[0] if trials else 0, 1, "hostile files")
        result.count("hostile files", max(started, 1))
        result.trials += max(started, 1)
        cases = cases[max(started, 1) :]
