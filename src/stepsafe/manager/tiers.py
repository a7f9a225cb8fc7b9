"""Which tier a run resumes from: the newest step that every process can restore whole.

A local step counts only if every process has it committed on its own disk (the processes
agree through the coordinator), and wins when it is at least as new as the persistent tier's
newest step (the same step in both tiers, as multi-tier promotion leaves it, is read from the
local disk: it is faster). Each candidate is restored on every process; if any process fails
(a checksum, a wiped or swapped disk, another mesh) all of them pass it by together, loudly,
and try the next newest; otherwise the persistent tier's newest step that restores. The
choice, and why, is logged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from stepsafe.distributed import process_count, process_index
from stepsafe.distributed.outcomes import as_error, gather_failures
from stepsafe.errors import CorruptCheckpointError
from stepsafe.manager.iterator_state import CheckpointableIterator
from stepsafe.manager.local_tier import LocalTier

log = logging.getLogger("stepsafe")


def restore_across_tiers(
    local: LocalTier,
    persistent_steps: list[int],
    target: Any,
    data_iterator: CheckpointableIterator | None,
    restore_persistent: Callable[[list[int]], tuple[int, Any]],
) -> tuple[int, Any, str]:
    """(step, state, its path: "" for the persistent tier's) from the newest step across
    both tiers that restores on every process: the tiers' steps are walked together, newest
    first, a local step before a persistent step of the same number; a damaged persistent
    step does not hide a newer local one behind it.

    Raises:
        CheckpointNotFoundError: neither tier holds a step.
        CorruptCheckpointError: every step of both tiers failed, the persistent ones damaged.
        StepsafeError: no persistent step, and every local step failed: the first failure
            (e.g. ``TargetMismatchError`` when the model changed).
    """
    common = local.common_steps()
    pending = list(persistent_steps)  # oldest first; tried newest first, in runs
    passed: list[str] = []
    first_failure: dict[str, Any] | None = None
    latest = pending[-1] if pending else None
    for step in reversed(common):
        newer = [s for s in pending if s > step]
        if newer:
            try:
                return _persistent(restore_persistent, newer, local, common, passed)
            except CorruptCheckpointError:
                pending = [s for s in pending if s <= step]  # each logged as damaged
        state, _, first = _try_local(local, step, target, data_iterator)
        if first is None:
            log.info(
                "Restored step %d from the local tier (%s): %s",
                step, local.step_path(step), _newer_than(step, latest),
            )  # fmt: skip
            return step, state, local.step_path(step)
        passed.append(str(step))
        first_failure = first_failure or first
        log.error(
            "Local checkpoint at step %d cannot be restored on process %d (%s: %s); it is "
            "passed by, and the next newest step is tried",
            step, first["process"], first["type"], first["message"],
        )  # fmt: skip
    if not pending and first_failure is not None:
        raise as_error(first_failure, process_count())
    return _persistent(restore_persistent, pending, local, common, passed)


def _persistent(
    restore_persistent: Callable[[list[int]], tuple[int, Any]],
    steps: list[int],
    local: LocalTier,
    common: list[int],
    passed: list[str],
) -> tuple[int, Any, str]:
    step, state = restore_persistent(steps)
    log.info(
        "Restored step %d from the persistent tier: %s",
        step, _why_persistent(local.steps(), common, step, passed),
    )  # fmt: skip
    return step, state, ""


def restore_local_step(
    local: LocalTier,
    step: int,
    target: Any,
    data_iterator: CheckpointableIterator | None,
    select: Any = None,
) -> Any:
    """Local step ``step`` restored on every process, or the first process's error raised on
    all of them (one process resuming while another gives up would split the job).

    Raises:
        StepsafeError: as the first failing process's restore raised it.
    """
    state, error, first = _try_local(local, step, target, data_iterator, select)
    if first is None:
        log.info("Restored step %d from the local tier (%s)", step, local.step_path(step))
        return state
    if error is not None and first["process"] == process_index():
        raise error
    raise as_error(first, process_count())


def _try_local(
    local: LocalTier,
    step: int,
    target: Any,
    data_iterator: CheckpointableIterator | None,
    select: Any = None,
) -> tuple[Any, Exception | None, dict[str, Any] | None]:
    """(state, this process's error, the first process's failure) of restoring ``step``."""
    state, error = None, None
    try:
        state = local.restore(step, target, data_iterator, select)
    except Exception as e:  # the persistent tier is still there: never stop at a local step
        error = e
    failures = gather_failures(f"local-restore-{local.tag}-{step}", error)
    return state, error, next((f for f in failures if f is not None), None)


def _newer_than(step: int, latest: int | None) -> str:
    if latest is None:
        return "every process holds it, and the persistent tier has no step"
    if step == latest:
        return "every process holds it, and it is the persistent tier's newest step too"
    return f"every process holds it, and it is newer than the persistent tier's step {latest}"


def _why_persistent(mine: list[int], common: list[int], step: int, passed: list[str]) -> str:
    if passed:
        return f"the newer local steps ({', '.join(passed)}) did not restore on every process"
    if not common:
        return (
            f"no local step is on every process (this process holds {mine or 'none'}): a "
            "process lost its local disk, or never saved there"
        )
    return f"the newest local step on every process ({common[-1]}) is older than {step}"
