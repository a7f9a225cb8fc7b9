"""Which runs and checkpoints exist under a base output directory, how big, complete or not.

    <base>/<run>/checkpoints/<step>/                      a checkpoint (complete once committed)
    <base>/<run>/checkpoints/<step>.stepsafe-tmp-<...>/   a save that has not committed (yet)

Everything goes through the ``Storage`` API (list, size, read), never ``os``, so the same code
lists a bucket once bucket storage exists. "Complete" means committed, exactly as ``restore``
and ``latest`` decide it; anything else under a step-like name is "Incomplete".
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field

from stepsafe.checkpoint.locate import CHECKPOINTS_DIR
from stepsafe.errors import StepsafeError
from stepsafe.format import METADATA_FILE, CheckpointMetadata, is_committed
from stepsafe.storage import Storage, is_temporary, storage_for
from stepsafe.storage.local import TMP_MARK

COMPLETE = "Complete"
INCOMPLETE = "Incomplete"


@dataclass(frozen=True)
class StepEntry:
    """One step directory (or the temporary of a save of that step)."""

    step: int
    name: str  # directory name: "300", or "300.stepsafe-tmp-host-pid-rand"
    path: str
    size_bytes: int
    num_files: int
    status: str  # COMPLETE | INCOMPLETE
    created_nsecs: int | None  # when the save began (metadata's init timestamp), if known
    temporary: bool = False

    @property
    def complete(self) -> bool:
        return self.status == COMPLETE


@dataclass(frozen=True)
class RunInventory:
    name: str
    path: str  # the run directory
    checkpoints_dir: str
    steps: list[StepEntry] = field(default_factory=list)  # by step, temporaries after their step

    @property
    def complete(self) -> list[StepEntry]:
        return [s for s in self.steps if s.complete]

    @property
    def incomplete(self) -> list[StepEntry]:
        return [s for s in self.steps if not s.complete]

    @property
    def latest(self) -> StepEntry | None:
        """The newest committed checkpoint: the one a resume would load."""
        done = self.complete
        return done[-1] if done else None

    @property
    def size_bytes(self) -> int:
        return sum(s.size_bytes for s in self.steps)


@dataclass(frozen=True)
class Inventory:
    base: str
    runs: list[RunInventory]

    @property
    def size_bytes(self) -> int:
        return sum(r.size_bytes for r in self.runs)

    @property
    def num_checkpoints(self) -> int:
        return sum(len(r.steps) for r in self.runs)


def step_of(name: str) -> int | None:
    """The step a directory name stands for: ``"300"`` and ``"300.stepsafe-tmp-..."`` -> 300."""
    head = name.split(TMP_MARK, 1)[0] if is_temporary(name) else name
    return int(head) if head.isdigit() else None


def list_runs(base: str, run_name: str | None = None) -> Inventory:
    """Every run under ``base`` (a directory holding ``<run>/checkpoints/``), or only
    ``run_name``. ``base`` may also be a run directory itself: then that one run is listed."""
    storage, root = storage_for(str(base))
    if run_name is not None:
        names = [run_name] if storage.is_dir(storage.join(root, run_name, CHECKPOINTS_DIR)) else []
        return Inventory(root, [scan_run(storage, storage.join(root, n), n) for n in names])
    if storage.is_dir(storage.join(root, CHECKPOINTS_DIR)):
        name = posixpath.basename(root.rstrip("/")) or root
        return Inventory(root, [scan_run(storage, root, name)])
    names = [
        n for n in storage.list_dir(root) if storage.is_dir(storage.join(root, n, CHECKPOINTS_DIR))
    ]
    return Inventory(root, [scan_run(storage, storage.join(root, n), n) for n in names])


def scan_run(storage: Storage, run_dir: str, name: str) -> RunInventory:
    """The steps under ``<run_dir>/checkpoints``, oldest first."""
    ckpt_dir = storage.join(run_dir, CHECKPOINTS_DIR)
    entries = []
    for n in storage.list_dir(ckpt_dir):
        step = step_of(n)
        if step is not None:
            entries.append(_scan_step(storage, storage.join(ckpt_dir, n), n, step))
    entries.sort(key=lambda e: (e.step, e.temporary, e.name))
    return RunInventory(name, run_dir, ckpt_dir, entries)


def _scan_step(storage: Storage, path: str, name: str, step: int) -> StepEntry:
    size, files = _du(storage, path)
    temporary = is_temporary(name)
    done = not temporary and is_committed(storage, path)
    return StepEntry(
        step, name, path, size, files, COMPLETE if done else INCOMPLETE, _created(storage, path),
        temporary,
    )  # fmt: skip


def _du(storage: Storage, path: str) -> tuple[int, int]:
    """Total bytes and number of files under ``path``."""
    size = files = 0
    for n in storage.list_dir(path):
        p = storage.join(path, n)
        if storage.is_dir(p):
            s, f = _du(storage, p)
            size, files = size + s, files + f
        else:
            try:
                size += storage.size(p)
                files += 1
            except FileNotFoundError:  # deleted while we looked
                continue
    return size, files


def _created(storage: Storage, path: str) -> int | None:
    """The save's start time from its metadata; None when there is none or it is unreadable
    (the storage API has no modification times, and an incomplete save may have no metadata)."""
    try:
        raw = storage.read_bytes(storage.join(path, METADATA_FILE))
        return CheckpointMetadata.from_json(raw, path).init_timestamp_nsecs
    except (OSError, StepsafeError):
        return None
