"""What a run does with the steps already on storage: it never overwrites one, passes damaged,
linked and foreign ones by (and says so once, loudly: a run that silently resumed from an older
step would look like lost work), and deletes old ones past ``max_to_keep`` after each commit.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from stepsafe.checkpoint import committed_steps
from stepsafe.errors import StepsafeError
from stepsafe.format import delete_checkpoint
from stepsafe.manager.gc import plan_retention
from stepsafe.manager.inventory import (
    COMPLETE,
    DAMAGED,
    INCOMPLETE,
    UNREADABLE,
    StepEntry,
    scan_step,
)
from stepsafe.storage import Storage

log = logging.getLogger("stepsafe")


class PassedSteps:
    """The steps one manager passes by: ``damaged`` ones (found at start-up or by a restore,
    left in place) and the names already reported, so that each is logged once."""

    def __init__(self) -> None:
        self.damaged: set[int] = set()
        self._reported: set[str] = set()

    def report(self, entry: StepEntry) -> None:
        """Say once that ``entry`` (damaged, a link, another tool's) is passed by."""
        if entry.name in self._reported:
            return
        self._reported.add(entry.name)
        if entry.status == DAMAGED:
            self.damaged.add(entry.step)
        level = logging.ERROR if entry.status in (DAMAGED, UNREADABLE) else logging.WARNING
        log.log(
            level, "Step %s (%s) is %s: %s; it is left in place, and resumes and retention "
            "pass it by", entry.name, entry.path, entry.status, entry.detail,
        )  # fmt: skip

    def kept(self, entry: StepEntry, reason: str) -> None:
        """Say once that retention kept ``entry``, and why."""
        if entry.name in self._reported:
            return
        self._reported.add(entry.name)
        level = logging.ERROR if entry.status == DAMAGED else logging.WARNING
        log.log(level, "Kept checkpoint %s: %s", entry.path, reason)


def save_is_blocked(storage: Storage, directory: str, step: int, passed: PassedSteps) -> bool:
    """Whether a save of ``step`` must not go ahead, logged: the step is committed already
    (intact or damaged), or its name holds a damaged, linked or foreign entry. An unfinished
    save of ours is no block: a bucket save writes beside it, a local one into a temporary."""
    path = storage.join(directory, str(step))
    if step in committed_steps(storage, directory):
        if step in passed.damaged:
            log.error(
                "Checkpoint at step %d exists but is damaged; it is not overwritten, so this "
                "step is not saved again (move %s aside to save it)", step, path,
            )  # fmt: skip
        else:
            log.info("Checkpoint at step %d already exists; not saving it again", step)
        return True
    if not (storage.exists(path) or storage.is_link(path)):
        return False
    entry = scan_step(storage, path, str(step), step, sizes=False)
    if entry.status in (COMPLETE, INCOMPLETE):
        return False
    passed.report(entry)
    log.error(
        "Step %d is not saved: %s holds something that is not a committed checkpoint (%s); "
        "stepsafe never overwrites it: move it aside to save this step",
        step, entry.path, entry.status,
    )  # fmt: skip
    return True


def apply_retention(
    storage: Storage,
    directory: str,
    keep: int,
    passed: PassedSteps,
    policy: Callable[[list[StepEntry]], dict[int, str]] | None = None,
    what: str = "checkpoint",
) -> None:
    """Delete committed steps beyond the newest ``keep`` intact ones (``plan_gc``'s rules:
    damaged, linked and foreign steps are kept and not counted); ``keep <= 0`` keeps all.
    ``policy``: which intact steps to keep instead (``retention_policy.policy_of``: by metric,
    ``keep_period``). ``what``: the steps' name in logs ("local checkpoint" for the local tier).

    Runs after a save committed, so nothing here may fail that save: a step another deleter
    (``stepsafe gc``) removed first is gone as wanted, and a deletion the storage refuses is
    logged.
    """
    if keep <= 0 or len(committed_steps(storage, directory)) <= keep:
        return
    plan = plan_retention(storage, directory, keep, passed.damaged, policy)
    for a in plan.attention:
        passed.kept(a.entry, a.reason)
    for a in plan.delete:
        try:
            delete_checkpoint(storage, a.entry.path)
        except (OSError, StepsafeError) as e:
            log.error("Could not delete old %s %s: %s", what, a.entry.path, e)
            continue
        log.info("Deleted old %s at step %d (keeping %d): %s", what, a.entry.step, keep, a.reason)
