"""Which runs and checkpoints exist under a base output directory, how big, whose, intact or not.

    <base>/<run>/checkpoints/<step>/                 a checkpoint (complete once committed)
    <base>/<run>/checkpoints/<storage's temporary>/  a save that has not committed (yet)

(the layout is run_layout.py's). Everything goes through the ``Storage`` API (list, size, read,
which entries are its temporaries), never ``os``, so the same code lists a bucket. Every
step-like entry gets one status, and only stepsafe's own count:

- Complete: committed, and its marker and manifest parse and match their checksums (what
  ``CheckpointReader`` checks on opening); the only kind that counts as "latest" or in a keep.
- Incomplete: ours, never committed (a save that died or is running, a half-deleted step).
- Damaged: ours and committed (or meant to be), but its marker or manifest is corrupt.
- Symlink: the step directory is a symbolic link; never entered by a deletion.
- Orbax / Foreign: written by Orbax or by something else; never counted, never deleted.
  An Orbax step's detail says whether it is complete by Orbax's own rules (its directory no
  longer ``<step>.orbax-checkpoint-tmp[-*]``, and on GCS ``commit_success.txt`` in it): a
  complete one can be read (``stepsafe.restore``, ``inspect``, ``convert``, with the extra
  ``stepsafe[orbax]``); an unfinished one, temporaries included, is listed and left alone.
- Unreadable: could not be listed or read (permissions, a link loop, a newer format).
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass, field
from typing import Any

from stepsafe.checkpoint.orbax_locate import orbax_step_number
from stepsafe.checkpoint.run_layout import checkpoints_dir, is_run_dir, step_of
from stepsafe.errors import (
    CorruptCheckpointError,
    IncompleteCheckpointError,
    StepsafeError,
    UnsupportedFormatError,
)
from stepsafe.format import COMMIT_FILE, CheckpointReader
from stepsafe.format.deletion import (
    StepFiles,
    foreign_files,
    has_items,
    named_like_ours,
    walk_step,
)
from stepsafe.format.layout import COMMIT_RECORD_MAX_BYTES, CommitRecord
from stepsafe.format.manifest import FORMAT
from stepsafe.format.orbax_layout import (
    is_orbax_step,
    orbax_incomplete_reason,
    orbax_tmp_step,
)
from stepsafe.format.step_files import read_step_file
from stepsafe.storage import Storage, storage_for

COMPLETE = "Complete"
INCOMPLETE = "Incomplete"
DAMAGED = "Damaged"
SYMLINK = "Symlink"
ORBAX = "Orbax"
FOREIGN = "Foreign"
UNREADABLE = "Unreadable"
OURS = (COMPLETE, INCOMPLETE, DAMAGED)


@dataclass(frozen=True)
class StepEntry:
    """One step directory (or the temporary of a save of that step)."""

    step: int
    name: str  # directory name: "300", or the name of a storage's temporary for step 300
    path: str
    size_bytes: int
    num_files: int
    status: str  # one of the statuses above
    created_nsecs: int | None  # when the save began (metadata's init timestamp), if known
    temporary: bool = False
    detail: str = ""  # why the status, for anything but Complete and Incomplete
    foreign: tuple[str, ...] = ()  # entries inside that stepsafe did not write (links too)
    files: tuple[str, ...] = ()  # every plain file inside, relative to the step
    # A Complete step's metrics (``save(..., metrics=...)``), from the record its status read
    metrics: dict[str, int | float] = field(default_factory=dict, hash=False)

    @property
    def complete(self) -> bool:
        return self.status == COMPLETE

    @property
    def orbax_complete(self) -> bool | None:
        """For an Orbax step, whether it is complete by Orbax's rules; None for others."""
        return None if self.status != ORBAX else ORBAX_COMPLETE in self.detail

    @property
    def ours(self) -> bool:
        """Written by stepsafe (so a keep counts it or a gc may delete it)."""
        return self.status in OURS


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
        return [s for s in self.steps if s.status == INCOMPLETE]

    @property
    def latest(self) -> StepEntry | None:
        """The newest committed, intact checkpoint: the one a resume would load."""
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


def list_runs(base: str, run_name: str | None = None) -> Inventory:
    """Every run under ``base`` (a directory holding ``<run>/checkpoints/``), or only
    ``run_name``. ``base`` may also be a run directory itself: then that one run is listed.

    Raises:
        OSError: ``base`` itself cannot be listed (a step that cannot is listed as Unreadable).
    """
    storage, root = storage_for(str(base))
    if run_name is not None:
        names = [run_name] if is_run_dir(storage, storage.join(root, run_name)) else []
        return Inventory(root, [scan_run(storage, storage.join(root, n), n) for n in names])
    if is_run_dir(storage, root):
        name = posixpath.basename(root.rstrip("/")) or root
        return Inventory(root, [scan_run(storage, root, name)])
    names = [n for n in storage.list_dir(root) if is_run_dir(storage, storage.join(root, n))]
    return Inventory(root, [scan_run(storage, storage.join(root, n), n) for n in names])


def scan_run(storage: Storage, run_dir: str, name: str) -> RunInventory:
    """The steps under ``<run_dir>/checkpoints``, oldest first."""
    ckpt_dir = checkpoints_dir(storage, run_dir)
    return RunInventory(name, run_dir, ckpt_dir, scan_steps(storage, ckpt_dir))


def scan_steps(storage: Storage, ckpt_dir: str, *, sizes: bool = True) -> list[StepEntry]:
    """Every step-like entry directly under ``ckpt_dir``, by step (temporaries after theirs);
    ``sizes=False`` skips asking the size of every file (one request each on a bucket)."""
    entries = []
    for n in storage.list_dir(ckpt_dir):
        step = step_of(storage, n)
        if step is not None:
            entries.append(scan_step(storage, storage.join(ckpt_dir, n), n, step, sizes=sizes))
        elif orbax_tmp_step(n) is not None:  # an Orbax save that has not finished (or died)
            entries.append(_orbax_tmp(storage, storage.join(ckpt_dir, n), n, sizes))
        elif (number := orbax_step_number(n)) is not None:  # Orbax's ckpt_300, 000300
            e = scan_step(storage, storage.join(ckpt_dir, n), n, number, sizes=sizes)
            if e.status == ORBAX:  # listed, and left alone; anything else so named: passed by
                entries.append(e)
    entries.sort(key=lambda e: (e.step, e.temporary, e.name))
    return entries


def scan_step(
    storage: Storage, path: str, name: str, step: int, *, sizes: bool = True
) -> StepEntry:
    """Classify one step directory (or a temporary of ``storage``'s for a save of ``step``);
    never raises for what is in it, never follows a link."""
    temporary = storage.temporary_target(name) is not None

    def entry(
        status: str,
        walked: StepFiles | None,
        detail: str = "",
        created: Any = None,
        meta: CommitRecord | None = None,
    ) -> StepEntry:
        walked = walked or StepFiles()
        size = _size(storage, path, walked.files) if sizes else 0
        created = created if isinstance(created, int) and not isinstance(created, bool) else None
        if temporary:  # the directory's name is ours: so are the names we write
            foreign = sorted(walked.links + [f for f in walked.files if not named_like_ours(f)])
        else:
            foreign = foreign_files(walked, meta)
        return StepEntry(
            step, name, path, size, len(walked.files), status, created, temporary,
            detail, tuple(foreign), tuple(walked.files),
            dict(meta.metrics) if meta is not None and status == COMPLETE else {},
        )  # fmt: skip

    try:
        if storage.is_link(path):
            return entry(SYMLINK, None, "a symbolic link: stepsafe never deletes through one")
        if not storage.is_dir(path):
            return entry(FOREIGN, None, "a file, not a checkpoint directory: left alone")
        walked = walk_step(storage, path)
    except OSError as e:
        return entry(UNREADABLE, None, f"unreadable: cannot be listed: {e.strerror or e}")
    if walked.errors:
        why = f"unreadable: cannot list {'; '.join(walked.errors)}"
        return entry(UNREADABLE, walked, why)
    if temporary:
        return entry(INCOMPLETE, walked, "the temporary of a save that has not committed")
    doc = _metadata_doc(storage, path, walked)
    created = doc.get("init_timestamp_nsecs") if isinstance(doc, dict) else None
    if isinstance(doc, dict) and doc.get("format") == FORMAT:
        status, detail, meta = _open(storage, path)
        return entry(status, walked, detail, created, meta)
    marker = COMMIT_FILE in walked.files
    if marker and doc is None and has_items(walked):
        return entry(DAMAGED, walked, f"its {COMMIT_FILE} cannot be read or parsed")
    if not marker and has_items(walked):
        return entry(INCOMPLETE, walked, "never committed, or half deleted")
    if not walked.files and not walked.links:
        return entry(INCOMPLETE, walked, "empty")
    if is_orbax_step(storage, path, doc):
        return entry(ORBAX, walked, orbax_detail(storage, path), created)
    return entry(FOREIGN, walked, "not written by stepsafe: left alone")


def _open(storage: Storage, path: str) -> tuple[str, str, CommitRecord | None]:
    """Status of a step whose marker says stepsafe wrote it: open it as restore would (the
    marker and the manifest, checked against their checksums) and check every data file's
    size (no array bytes are read: a flipped bit is found by ``stepsafe verify``). With it, the
    committed metadata when the step is Complete: it names the step's extra files."""
    try:
        with CheckpointReader(storage, path) as reader:
            reader.check_files()
            return COMPLETE, "", reader.record
    except IncompleteCheckpointError:
        return INCOMPLETE, "never committed", None
    except UnsupportedFormatError as e:
        return UNREADABLE, f"unreadable: {e}", None
    except CorruptCheckpointError as e:
        if not storage.exists(storage.join(path, COMMIT_FILE)):  # being deleted right now
            return INCOMPLETE, "being deleted", None
        return DAMAGED, str(e), None
    except (StepsafeError, OSError) as e:
        return UNREADABLE, f"unreadable: {e}", None


def _metadata_doc(storage: Storage, path: str, walked: StepFiles) -> Any:
    """The step's ``_CHECKPOINT_METADATA`` as JSON, or None when there is none (or it is not a
    small plain file holding JSON)."""
    if COMMIT_FILE not in walked.files:
        return None
    try:
        return json.loads(read_step_file(storage, path, COMMIT_FILE, COMMIT_RECORD_MAX_BYTES))
    except (OSError, StepsafeError, ValueError, RecursionError):
        return None


def _size(storage: Storage, path: str, files: list[str]) -> int:
    total = 0
    for f in files:
        try:
            total += storage.size(storage.join(path, f))
        except OSError:  # deleted while we looked, or unreadable: it counts nothing
            continue
    return total


ORBAX_COMPLETE = "complete by Orbax's rules: readable, never deleted by stepsafe"


def orbax_detail(storage: Storage, path: str) -> str:
    """An Orbax step's detail: complete or not by Orbax's own rules, and that it is kept."""
    try:
        reason = orbax_incomplete_reason(storage, path)
    except OSError as e:
        return f"an Orbax checkpoint (cannot tell whether complete: {e}): left alone"
    if reason is None:
        return f"an Orbax checkpoint, {ORBAX_COMPLETE}"
    return f"an Orbax checkpoint, incomplete by Orbax's rules ({reason}): left alone"


def _orbax_tmp(storage: Storage, path: str, name: str, sizes: bool) -> StepEntry:
    """The temporary directory of an Orbax save (``300.orbax-checkpoint-tmp``, with ``-<ts>``
    in older versions): Orbax's to finish or clean up, never stepsafe's."""
    try:
        walked = walk_step(storage, path) if storage.is_dir(path) else StepFiles()
    except OSError:
        walked = StepFiles()
    size = _size(storage, path, walked.files) if sizes else 0
    step = orbax_tmp_step(name)
    assert step is not None
    return StepEntry(
        step, name, path, size, len(walked.files), ORBAX, None, True,
        orbax_detail(storage, path), tuple(walked.links), tuple(walked.files),
    )  # fmt: skip
