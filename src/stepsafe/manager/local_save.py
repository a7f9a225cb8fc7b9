"""One local-tier save of a job: every process saves the step, or none does.

Each process finds on its own disk whether the step can be saved (``LocalTier.prepare``); under
several processes they agree before anything is written: a step that one process cannot save
(its name holds something else there) is saved by none, and one that every process holds
already is not saved again, so that the local steps of all processes stay alike and a
promotion (multi-tier) never waits for a process that has nothing to promote. Process 0 also
says whether the run's lease is still this manager's: a manager whose run was taken over
stops saving on every process.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from stepsafe.distributed import coordinator
from stepsafe.distributed.outcomes import as_error, failure
from stepsafe.errors import StepsafeError
from stepsafe.format import CommitRecord
from stepsafe.manager.iterator_state import CheckpointableIterator
from stepsafe.manager.local_tier import BLOCKED, COMMITTED, FREE, LocalTier
from stepsafe.manager.promoter import Promoter

log = logging.getLogger("stepsafe")


def save_local(
    local: LocalTier,
    promoter: Promoter | None,
    step: int,
    state: Any,
    *,
    data_iterator: CheckpointableIterator | None,
    record: CommitRecord,
    background: bool,
    force: bool,
    check_lease: Callable[[], None],
) -> bool:
    """Save ``state`` as local step ``step`` on every process, and hand it to ``promoter``
    when its backup interval says so; whether a save was started.

    Raises:
        RunInUseError: another manager has taken the run over (on every process).
        BackgroundSaveError: the previous local save failed.
        UnsupportedLeafError: a leaf, or the iterator's state, that cannot be saved.
        CoordinationError: under several processes, another did not answer in time.
    """
    status = _agreed(f"local-save-{local.tag}-{step}", step, local.prepare(step), check_lease)
    if status == BLOCKED:
        return False
    promote = promoter is not None and promoter.due(step, force)  # decided alike everywhere
    if status == COMMITTED:
        if promote and promoter is not None:  # e.g. the last step, saved on its period
            promoter.offer(step)
        return False
    local.save(
        step, state, data_iterator=data_iterator, record=record, copy=background,
        background=background, after_commit=promoter.offer if promote and promoter else None,
    )  # fmt: skip
    return True


def _agreed(name: str, step: int, status: str, check_lease: Callable[[], None]) -> str:
    """Every process's ``status`` made one: the same everywhere, else ``BLOCKED``; raises on
    every process when process 0 finds the lease lost."""
    c = coordinator()
    lost = None
    if c.index == 0:
        try:
            check_lease()
        except StepsafeError as e:
            lost = e
    if c.count == 1:
        if lost is not None:
            raise lost
        return status
    mine = {"status": status, "lost": None if lost is None else failure(lost, 0)}
    docs = [json.loads(v) for v in c.all_gather(name, json.dumps(mine).encode())]
    if lost is not None:
        raise lost
    if docs[0]["lost"] is not None:
        raise as_error(docs[0]["lost"], c.count)
    statuses = [d["status"] for d in docs]
    if len(set(statuses)) == 1:
        return status
    others = [p for p, s in enumerate(statuses) if s != FREE]
    log.error(
        "Local step %d is not saved on any process: process(es) %s cannot save it (%s; see "
        "their logs), and a step only some processes hold would never restore",
        step, ", ".join(map(str, others)), ", ".join(statuses[p] for p in others),
    )  # fmt: skip
    return BLOCKED
