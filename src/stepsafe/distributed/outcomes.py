"""One decision, one outcome for the whole job: process 0 decides, every process raises alike.

Under several processes a choice that one process makes alone (which steps exist, whether a
step may be saved, whether a restore worked) can split the job: one process restores step 300
while another starts from scratch, and the next collective hangs. So such choices are made once,
by process 0 (``on_process_0``), or gathered from all (``gather_failures``), and a failure on
any process is raised on every process with the same stepsafe error type (``as_error``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeVar

from stepsafe import errors
from stepsafe.distributed.coordinator import coordinator
from stepsafe.errors import StepsafeError

T = TypeVar("T")


def failure(e: BaseException, process: int) -> dict[str, Any]:
    """``e`` as JSON-ready data that another process can raise again (``as_error``)."""
    return {"type": type(e).__name__, "message": str(e), "process": process}


def as_error(doc: dict[str, Any], count: int) -> StepsafeError:
    """The failure ``doc`` of another process, to raise here: the same stepsafe error type
    (``StepsafeError`` for any other exception), naming the process it happened on."""
    cls = getattr(errors, str(doc.get("type")), None)
    if not (isinstance(cls, type) and issubclass(cls, StepsafeError)):
        cls = StepsafeError
    return cls(f"on process {doc['process']} of {count} ({doc['type']}): {doc['message']}")


def on_process_0(name: str, compute: Callable[[], T]) -> T:
    """``compute()``, run on process 0 only; every process returns its (JSON) result or raises
    its error. A single process just calls ``compute``.

    Raises:
        CoordinationError: process 0 did not answer in time.
        StepsafeError: ``compute`` failed on process 0 (its type there).
    """
    c = coordinator()
    if c.count == 1:
        return compute()
    if c.index == 0:
        try:
            value = compute()
        except Exception as e:
            c.broadcast(name, json.dumps({"error": failure(e, 0)}).encode())
            raise
        c.broadcast(name, json.dumps({"value": value}).encode())
        return value
    doc = json.loads(c.broadcast(name, None))
    if "error" in doc:
        raise as_error(doc["error"], c.count)
    return doc["value"]


def gather_failures(name: str, error: BaseException | None) -> list[dict[str, Any] | None]:
    """Every process's failure (``failure``) or None, in process order, on every process.

    Raises:
        CoordinationError: a process did not answer in time.
    """
    c = coordinator()
    mine = None if error is None else failure(error, c.index)
    if c.count == 1:
        return [mine]
    return [json.loads(v) for v in c.all_gather(name, json.dumps(mine).encode())]
