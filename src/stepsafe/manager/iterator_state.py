"""Data-iterator position under ``<step>/iter/``, one file per process.

Each process of a job saves and restores its own position (``iter/process_<p>``), and a step
saved by another number of processes is refused with a clear error: positions cannot be split
or merged without knowing the iterator. Any object with ``get_state()`` / ``set_state(state)``
works (Grain's protocol). A state that is ``bytes`` is stored as is (``.bin``); anything else
must be JSON (``.json``). Never pickle.
The files are extra files of the checkpoint: the format names them per save and checks them
against checksums in the step's record.
"""

from __future__ import annotations

import json
from typing import Any, Protocol

from stepsafe.distributed import process_count
from stepsafe.errors import StepsafeError, TruncatedDataError, UnsupportedLeafError
from stepsafe.format import read_commit_record, read_extra
from stepsafe.storage import Storage

ITER_DIR = "iter"


class CheckpointableIterator(Protocol):
    def get_state(self) -> Any: ...

    def set_state(self, state: Any) -> None: ...


def iterator_files(iterator: CheckpointableIterator, process_index: int = 0) -> dict[str, bytes]:
    state = iterator.get_state()
    name = f"{ITER_DIR}/process_{process_index}"
    if isinstance(state, bytes):
        return {f"{name}.bin": state}
    try:
        return {f"{name}.json": json.dumps(state).encode()}
    except (TypeError, ValueError) as e:
        raise UnsupportedLeafError(
            f"data iterator state must be bytes or JSON-serialisable: {e}"
        ) from e


def restore_iterator(
    storage: Storage,
    step_dir: str,
    iterator: CheckpointableIterator,
    process_index: int = 0,
    processes: int | None = None,
) -> None:
    """Set ``iterator``'s position from the state saved with the step at ``step_dir``.
    ``processes``: how many processes' states the step holds (None: this job's count; 1 for a
    local-tier step, which holds this process's own)."""
    name = f"{ITER_DIR}/process_{process_index}"
    record = read_commit_record(storage, step_dir)
    saved_by = {n.rsplit(".", 1)[0] for n in record.extra_files if n.startswith(f"{ITER_DIR}/")}
    count = process_count() if processes is None else processes
    if saved_by and len(saved_by) != count:
        raise StepsafeError(
            f"{step_dir} holds the data-iterator states of {len(saved_by)} process(es) and "
            f"this job has {count}: each process's position is its own, so it cannot be "
            "split or merged; restore on as many processes, or without data_iterator (the "
            "data then starts from scratch)"
        )
    raw = read_extra(storage, step_dir, f"{name}.bin", record)
    if raw is not None:
        iterator.set_state(raw)
        return
    raw = read_extra(storage, step_dir, f"{name}.json", record)
    if raw is not None:
        try:
            state = json.loads(raw)
        except ValueError as e:
            raise TruncatedDataError(f"{step_dir}/{name}.json is corrupt: {e}") from e
        iterator.set_state(state)
        return
    raise StepsafeError(
        f"{step_dir} holds no data-iterator state for process {process_index}: it was saved "
        "without a data iterator; restore without one or start the data from scratch"
    )
