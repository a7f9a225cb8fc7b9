"""A save under many processes: each writes its own shards, process 0 commits them all.

    process 0                          every other process
    open the transaction  --token-->   join it
    write its part, prepare            write its part, prepare     (data durable)
          <------------- every part (or error) -------------------
    merge, commit (rename / marker)
          ------------- the outcome to all ------------------------>
    return or raise                    return or raise the same

One save id (process 0's) names every process's files. Nothing is committed unless every
process sent a part and none failed; and every process returns or raises the same way, because
each learns the outcome from process 0 (a failure on process q is raised everywhere with q's
error type and message). The exchanges are named alike for every save (the coordinator numbers
them), so that processes saving to different paths meet, and learn that they disagree, instead
of waiting for each other under different names. Every exchange has a timeout
(``knobs.COORDINATION_TIMEOUT_S``), so a process that died turns into a ``CoordinationError``
on the others, never a hang.

A writer deletes its own files only while it is certain that no commit can include them: before
it has sent its part, or when process 0 says the save failed. A process that stops hearing from
the others leaves its files in place (on a bucket they may belong to a committed step); what an
uncommitted save leaves is cleaned when the run starts again.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

from stepsafe import knobs
from stepsafe.distributed import Coordinator, coordinator
from stepsafe.distributed.outcomes import as_error, failure
from stepsafe.errors import CoordinationError, StepsafeError
from stepsafe.format import CommitRecord, HostArray
from stepsafe.format.writer import WrittenPart, commit_parts, write_part
from stepsafe.storage import Storage, Transaction
from stepsafe.tree import Structure


def write_collective(
    storage: Storage,
    path: str,
    structure: Structure,
    arrays: list[HostArray],
    values: dict[str, Any],
    *,
    record: CommitRecord,
    extra_files: dict[str, bytes] | None,
    file_size: int,
) -> None:
    """Commit one checkpoint at ``path`` from every process of the job (each calls this with
    its own ``arrays`` shards and ``extra_files``; ``structure``, ``values`` and ``record`` are
    taken from process 0).

    Raises:
        CoordinationError: another process did not answer within the timeout.
        StepsafeError: the error (its type, with the failing process named) that made the save
            fail on any process; nothing was committed then.
    """
    c = coordinator()
    txn, published, committed, save_failed = None, False, False, False
    try:
        txn, join_error = _open(c, storage, path, record)
        own_error: BaseException | None = None
        try:
            if join_error is not None:
                raise join_error
            assert txn is not None
            part = write_part(txn, arrays, record.save_id, c.index, file_size, extra_files)
            txn.prepare()
            mine = _ok(part=part.to_json().decode())
        except Exception as e:
            mine, own_error = _failed(e, c.index), e
        published = True
        if c.index == 0:
            assert txn is not None
            try:
                parts = c.gather("save-parts", mine.encode()) or []
            except CoordinationError as e:  # a process never sent its part: tell the others
                txn.abort()
                with contextlib.suppress(CoordinationError):  # the missing one never reads it
                    c.broadcast("save-done", _failed(e, 0).encode())
                raise
            answers = [json.loads(a) for a in parts]
            outcome = _commit(txn, structure, arrays, values, answers, record)
            committed = "error" not in json.loads(outcome)
            c.broadcast("save-done", outcome.encode())
        else:
            c.gather("save-parts", mine.encode())
            # Longer than process 0 waits for the parts: it may start waiting later (its own
            # write took longer), and must be the one to give up first, and say so.
            outcome = c.broadcast("save-done", None, 2 * knobs.COORDINATION_TIMEOUT_S).decode()
        failed = json.loads(outcome).get("error")
        if failed is not None:
            save_failed = True
            if own_error is not None and failed["process"] == c.index:
                raise own_error
            raise as_error(failed, c.count)
    except BaseException:
        # Process 0 aborts all that is not committed; the others only their own files, and
        # only while no commit can hold them (not sent yet, or the save failed).
        if txn is not None and not committed and (c.index == 0 or not published or save_failed):
            txn.abort()
        raise


def _open(
    c: Coordinator, storage: Storage, path: str, record: CommitRecord
) -> tuple[Transaction | None, BaseException | None]:
    """Process 0 opens the transaction and tells the others its token and save id; they join.
    A process that cannot join still takes part: its error goes out in place of its part.

    Raises:
        StepsafeError: process 0 could not open it (on every process, the same type).
    """
    if c.index == 0:
        try:
            txn = storage.transaction(path)
        except Exception as e:
            c.broadcast("save-open", _failed(e, 0).encode())
            raise
        opened = _ok(token=txn.token(), save_id=record.save_id, path=path)
        try:
            c.broadcast("save-open", opened.encode())
        except BaseException:
            txn.abort()
            raise
        return txn, None
    doc = json.loads(c.broadcast("save-open", None))
    if "error" in doc:
        raise as_error(doc["error"], c.count)
    record.save_id = doc["save_id"]
    if doc["path"] != path:
        return None, StepsafeError(
            f"process {c.index} saves to {path} while process 0 saves to {doc['path']}: "
            "every process must save the same step to the same path"
        )
    try:
        return storage.join_transaction(path, doc["token"]), None
    except Exception as e:
        return None, e


def _commit(
    txn: Transaction,
    structure: Structure,
    arrays: list[HostArray],
    values: dict[str, Any],
    answers: list[dict[str, Any]],
    record: CommitRecord,
) -> str:
    """Process 0: commit every process's part, or say why not (the first failure)."""
    for answer in answers:
        if "error" in answer:
            txn.abort()
            return json.dumps(answer)
    try:
        parts = [
            WrittenPart.from_json(a["part"].encode(), f"process {p}") for p, a in enumerate(answers)
        ]
        commit_parts(txn, structure, arrays, values, parts, record)
    except Exception as e:
        txn.abort()
        return _failed(e, 0)
    return _ok()


def _ok(**fields: Any) -> str:
    return json.dumps(fields)


def _failed(e: BaseException, process: int) -> str:
    return json.dumps({"error": failure(e, process)})
