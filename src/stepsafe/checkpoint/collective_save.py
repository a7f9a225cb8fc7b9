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

The first exchange pairs each process's next save (the coordinator numbers it); the others are
named by the save id that process 0 chose, so that two saves running at once never mix. A
process that failed before the save began (a leaf its snapshot refused) still takes part, with
its error in place of its part: were it to skip the exchanges, the next save would pair with
this one. Process 0 checks that every process saved the same tree (a digest of keys, dtypes
and shapes) and that every data file a part names is that process's, in this save.

Process 0 deletes what a failed save wrote (the local temporary; its own bucket files); the
others delete their own files only when no commit can hold them: before they sent their part,
or when their own part failed. Otherwise a commit may hold them (a bucket marker whose
creation is in doubt); what an uncommitted save leaves is cleaned when the run starts again,
or by ``stepsafe gc``.
"""

from __future__ import annotations

import contextlib
import json
import posixpath
from typing import TYPE_CHECKING, Any

import numpy as np

from stepsafe import knobs
from stepsafe.distributed import Coordinator, coordinator
from stepsafe.distributed.outcomes import as_error, failure
from stepsafe.errors import CoordinationError, StepsafeError
from stepsafe.format import CommitRecord
from stepsafe.format.checksum import checksum
from stepsafe.format.grid_parts import write_cells
from stepsafe.format.layout import is_save_id
from stepsafe.format.writer import WrittenPart, commit_parts, write_part
from stepsafe.storage import Storage, Transaction

if TYPE_CHECKING:
    from stepsafe.checkpoint.save import Snapshot


def write_collective(
    storage: Storage,
    path: str,
    snap: Snapshot | None,
    *,
    record: CommitRecord,
    extra_files: dict[str, bytes] | None,
    file_size: int,
    local_error: BaseException | None = None,
) -> None:
    """Commit one checkpoint at ``path`` from every process of the job (each calls this with
    its own snapshot's shards and ``extra_files``; the tree's structure, values and ``record``
    are taken from process 0). A process whose own part failed before it got here (its
    snapshot refused a leaf) passes ``local_error`` and no snapshot: it still takes part, so
    that every process learns the same outcome and the next save pairs up as it should.

    Raises:
        CoordinationError: another process did not answer within the timeout.
        StepsafeError: the error (its type, with the failing process named) that made the save
            fail on any process; nothing was committed then.
    """
    c = coordinator()
    txn, published, committed = None, False, False
    own_error: BaseException | None = local_error
    try:
        txn, join_error = _open(c, storage, path, record)
        own_error = own_error or join_error
        try:
            if own_error is not None:
                raise own_error
            assert txn is not None and snap is not None
            part = write_part(txn, snap.arrays, record.save_id, c.index, file_size, extra_files)
            write_cells(txn, part, snap.arrays, c.index, record.save_id)
            txn.prepare()
            mine = _ok(part=part.to_json().decode(), tree=tree_digest(snap))
        except Exception as e:
            mine, own_error = _failed(e, c.index), e
        published = True
        name = f"save-{record.save_id}"  # pairs this save's exchanges whatever else runs
        if c.index == 0:
            assert txn is not None
            try:
                parts = c.gather(f"{name}-parts", mine.encode()) or []
            except CoordinationError as e:  # a process never sent its part: tell the others
                txn.abort()
                with contextlib.suppress(CoordinationError):  # the missing one never reads it
                    c.broadcast(f"{name}-done", _failed(e, 0).encode())
                raise
            answers = [json.loads(a) for a in parts]
            outcome = _commit(txn, snap, answers, record)
            committed = "error" not in json.loads(outcome)
            c.broadcast(f"{name}-done", outcome.encode())
        else:
            c.gather(f"{name}-parts", mine.encode())
            # Longer than process 0 waits for the parts: it may start waiting later (its own
            # write took longer), and must be the one to give up first, and say so.
            timeout = 2 * knobs.COORDINATION_TIMEOUT_S
            outcome = c.broadcast(f"{name}-done", None, timeout).decode()
        failed = json.loads(outcome).get("error")
        if failed is not None:
            if own_error is not None and failed["process"] == c.index:
                raise own_error
            raise as_error(failed, c.count)
    except BaseException:
        # Process 0 aborts all that is not committed. The others delete their own files only
        # when no commit can hold them: before they sent their part, or when their own part
        # failed (process 0 never commits then). Otherwise a commit may hold them (a bucket's
        # marker whose creation is in doubt), and what an uncommitted save leaves is cleaned
        # later.
        if txn is not None and not committed and (c.index == 0 or not published or own_error):
            txn.abort()
        raise


def tree_digest(snap: Snapshot) -> str:
    """A digest of the tree's structure and each array's key, dtype and shape: every process
    must save the same tree, and process 0 compares digests instead of whole trees."""
    arrays = [[a.path, np.dtype(a.dtype).str, list(a.shape)] for a in snap.arrays]
    return checksum(json.dumps([snap.structure, arrays], separators=(",", ":")).encode())


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
    if not is_save_id(doc.get("save_id")):
        raise StepsafeError(f"process 0 sent a malformed save id {doc.get('save_id')!r}")
    record.save_id = doc["save_id"]
    if _same_path(doc["path"]) != _same_path(path):
        return None, StepsafeError(
            f"process {c.index} saves to {path} while process 0 saves to {doc['path']}: "
            "every process must save the same step to the same path"
        )
    try:
        return storage.join_transaction(path, doc["token"]), None
    except Exception as e:
        return None, e


def _same_path(path: str) -> str:
    """``path`` as processes compare it: ``out/a/`` and ``out/./a`` are ``out/a``."""
    if "://" in path:
        scheme, rest = path.split("://", 1)
        return f"{scheme}://{posixpath.normpath(rest)}"
    return posixpath.normpath(path)


def _commit(
    txn: Transaction, snap: Snapshot | None, answers: list[dict[str, Any]], record: CommitRecord
) -> str:
    """Process 0: commit every process's part, or say why not (the first failure)."""
    for answer in answers:
        if "error" in answer:
            txn.abort()
            return json.dumps(answer)
    try:
        assert snap is not None  # process 0 had no error of its own
        mine = tree_digest(snap)
        for p, a in enumerate(answers):
            if a["tree"] != mine:
                raise StepsafeError(
                    f"process {p} saves another tree than process 0 (its keys, dtypes or "
                    "shapes differ): every process must save the same tree"
                )
        parts = [WrittenPart.from_json(a["part"].encode(), f"process {p}")
                 for p, a in enumerate(answers)]  # fmt: skip
        commit_parts(txn, snap.structure, snap.arrays, snap.values, parts, record)
    except Exception as e:
        txn.abort()
        return _failed(e, 0)
    return _ok()


def _ok(**fields: Any) -> str:
    return json.dumps(fields)


def _failed(e: BaseException, process: int) -> str:
    return json.dumps({"error": failure(e, process)})
