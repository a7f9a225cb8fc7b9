"""The transaction of an object store: files written in place, committed by a marker.

Buckets have no atomic rename of a prefix, so a transaction writes every file directly under
its final name and makes the step visible by creating one object last, the commit marker
``_CHECKPOINT_METADATA``, with a *conditional create* (the storage's ``create_exclusive``): of
two writers racing for one step exactly one creates it. Readers (``format.is_committed``,
``checkpoint.locate``) already treat a step without the marker as incomplete, so a save killed
at any moment leaves nothing that looks complete.

The transaction holds the marker's bytes back when the writer hands them over and creates the
object only in ``commit()``; it refuses to start when the step already has a marker. Every
other file is written with a plain PUT under a name the format makes unique per save, so two
racing saves never write the same object: the loser's files are its own, and it deletes them.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING

from stepsafe.errors import CheckpointExistsError, StepsafeError
from stepsafe.storage.base import Transaction

if TYPE_CHECKING:
    from stepsafe.storage.remote import RemoteStorage

# Must equal stepsafe.format.layout.COMMIT_FILE (a test checks): storage sits above format
# in the layer order and cannot import it, but it has to know which file commits.
COMMIT_MARKER = "_CHECKPOINT_METADATA"


class RemoteTransaction(Transaction):
    """Files written in place; visible when ``commit`` creates the marker exclusively."""

    def __init__(self, storage: RemoteStorage, path: str, *, joined: bool = False) -> None:
        """``joined``: another process opened this save; this writer writes its own files
        (deleted on abort) and never commits."""
        self.storage = storage
        self.path = path
        self.joined = joined
        self.marker_path = storage.join(path, COMMIT_MARKER)
        if storage.exists(self.marker_path):
            raise CheckpointExistsError(
                f"{path} already holds a committed checkpoint: stepsafe never overwrites one; "
                "save to a new path or delete the old one first"
            )
        self._written: list[str] = []
        self._lock = threading.Lock()
        self._marker: bytes | None = None
        self._done = False

    def write_file(self, relpath: str, chunks: Iterable[memoryview | bytes]) -> None:
        if relpath.strip("/") == COMMIT_MARKER:
            self._marker = b"".join(bytes(c) for c in chunks)  # created by commit()
            return
        target = self.storage.join(self.path, relpath)
        with self._lock:
            self._written.append(target)  # before the upload: a failed one may leave bytes
        self.storage.upload(target, chunks)

    def commit(self) -> None:
        if self.joined:
            raise StepsafeError(f"only the process that opened the save of {self.path} commits it")
        if self._marker is None:
            raise StepsafeError(
                f"nothing to commit at {self.path}: on object stores a transaction becomes "
                f"visible through its {COMMIT_MARKER} file, and none was written"
            )
        try:
            self.storage.create_exclusive(self.marker_path, self._marker)
        except FileExistsError as e:
            owner = self._marker_owner()
            if owner == "ours":  # a retried create whose first try succeeded
                self._done = True
                return
            if owner == "other":
                self._delete_written()
            self._done = True  # "unknown": leaving files is safe, deleting might not be
            raise CheckpointExistsError(
                f"{self.path} was committed by another writer while this save ran; "
                "this save was discarded"
            ) from e
        except Exception:
            if self._marker_owner() == "ours":  # created, but the reply was lost
                self._done = True
                return
            raise
        self._done = True

    def _marker_owner(self) -> str:
        """Whose marker is at the step: "ours" (it holds our bytes, which include our save id
        and nanosecond timestamps), "other", "none", or "unknown" when it cannot be read."""
        try:
            raw = self.storage.read_bytes(self.marker_path)
        except FileNotFoundError:
            return "none"
        except Exception:
            return "unknown"
        return "ours" if raw == self._marker else "other"

    def abort(self) -> None:
        """Delete what this save wrote, unless its marker may have been created (a commit
        whose reply was lost): no other save writes these names, so no one else is hurt."""
        if self._done:
            return
        if self._marker is not None and self._marker_owner() in ("ours", "unknown"):
            self._done = True
            return
        self._delete_written()

    def _delete_written(self) -> None:
        self._done = True
        for target in self._written:
            with contextlib.suppress(Exception):
                self.storage.delete_file(target)
