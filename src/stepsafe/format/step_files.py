"""A step's small files, read as the untrusted input they are: the commit record (whether the
step is committed, and what it says) and the extra files it lists with their checksums.

Every read is bounded (a link to ``/dev/zero`` is refused, not read forever) and never follows
a link inside the step: listings and resumes read these files of every step they pass, and one
damaged step must be reported, never hang or crash them.
"""

from __future__ import annotations

from stepsafe.errors import (
    ChecksumMismatchError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    StepsafeError,
    StorageError,
    TruncatedDataError,
)
from stepsafe.format.checksum import checksum
from stepsafe.format.layout import (
    COMMIT_FILE,
    COMMIT_RECORD_MAX_BYTES,
    EXTRA_FILE_MAX_BYTES,
    CommitRecord,
)
from stepsafe.storage import Storage


def read_step_file(storage: Storage, step: str, rel: str, limit: int) -> bytes:
    """The file ``rel`` (``/``-separated) inside the step directory ``step``, read as the
    untrusted input it is: refused if a directory on the way is a symbolic link (the storage
    opens the file itself without following one, and only if it is a regular file), or if it
    holds more than ``limit`` bytes.

    Raises:
        FileNotFoundError, NotADirectoryError, IsADirectoryError: as the storage raised them;
            callers decide what a missing file means.
        CorruptCheckpointError: a link, FIFO or device on the way, or a file over ``limit``.
        StorageError: any other failure to read it, naming the path.
    """
    parent = step
    for part in rel.split("/")[:-1]:
        parent = storage.join(parent, part)
        if storage.is_link(parent):
            raise CorruptCheckpointError(
                f"{parent} is a symbolic link: stepsafe never reads through links inside a "
                "checkpoint, which it never writes; it was put there by something else"
            )
    path = storage.join(step, rel)
    try:
        return storage.read_bytes(path, limit)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        raise
    except StepsafeError:
        raise
    except OSError as e:
        error = StorageError(f"{path} cannot be read: {e.strerror or e}")
        error.errno = e.errno
        raise error from e


def is_committed(storage: Storage, path: str) -> bool:
    """True when ``path`` holds a committed checkpoint (record with a commit timestamp);
    False when its record is missing, unreadable (a link, FIFO or device, huge, no
    permission) or not stepsafe's: one bad step must not stop a listing or a resume, which
    pass it by. ``stepsafe ls`` shows it as Damaged, and ``read_commit_record`` says what is wrong.
    """
    try:
        raw = read_step_file(storage, path, COMMIT_FILE, COMMIT_RECORD_MAX_BYTES)
    except (OSError, StepsafeError):
        return False
    try:
        return CommitRecord.from_json(raw, path).commit_timestamp_nsecs is not None
    except Exception:
        return False


def read_commit_record(storage: Storage, path: str) -> CommitRecord:
    """The record of the committed checkpoint at ``path``; IncompleteCheckpointError if the
    save that wrote it never finished."""
    try:
        raw = read_step_file(storage, path, COMMIT_FILE, COMMIT_RECORD_MAX_BYTES)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as e:
        raise IncompleteCheckpointError(
            f"{path} is not a committed checkpoint (no {COMMIT_FILE} file): the save that "
            "wrote it did not finish; delete it or restore an earlier step"
        ) from e
    record = CommitRecord.from_json(raw, storage.join(path, COMMIT_FILE))
    if record.commit_timestamp_nsecs is None:
        raise IncompleteCheckpointError(f"{path} was never committed")
    return record


def read_extra(
    storage: Storage, path: str, name: str, record: CommitRecord | None = None
) -> bytes | None:
    """Extra file ``name`` (as its writer named it) of the checkpoint at ``path``, checked
    against the checksum in its commit record; None when the save wrote no such file."""
    record = record or read_commit_record(storage, path)
    want = record.extra_files.get(name)
    if want is None:
        return None
    rel = record.extra_path(name)
    where = storage.join(path, rel)
    try:
        raw = read_step_file(storage, path, rel, EXTRA_FILE_MAX_BYTES)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as e:
        raise TruncatedDataError(f"{where} is missing: the checkpoint is damaged") from e
    if checksum(raw) != want:
        raise ChecksumMismatchError(
            f"{where} does not match the checksum in {COMMIT_FILE}: it is corrupt"
        )
    return raw
