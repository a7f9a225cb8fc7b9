"""``verify``: re-read every byte of a checkpoint a user names and check every checksum.

The checking itself is the format's (``format.check``, built on ``CheckpointReader``); this
module finds the checkpoint, or every step of a run, from the path the user typed.
"""

from __future__ import annotations

from stepsafe.checkpoint.locate import locate
from stepsafe.checkpoint.orbax_locate import NOT_STEPSAFE, orbax_for
from stepsafe.checkpoint.run_layout import CHECKPOINTS_DIR, is_step_name, step_number, step_path
from stepsafe.errors import UnsupportedFormatError
from stepsafe.format import COMMIT_FILE
from stepsafe.format.check import Problem, Progress, VerifyReport, check_checkpoint
from stepsafe.format.orbax_layout import is_orbax_step
from stepsafe.storage import Storage, storage_for

__all__ = ["Problem", "Progress", "VerifyReport", "verify", "verify_targets"]


def verify_targets(path: str) -> list[str]:
    """The step directories ``path`` designates: for a run (or a ``checkpoints/`` directory)
    every step that has a ``_CHECKPOINT_METADATA``, committed or not, so that a step whose
    marker is corrupt is reported rather than silently skipped; else the step ``locate`` finds.
    Steps without any marker are saves that never finished, not damage, and are left out."""
    storage, p = storage_for(str(path))
    for d in (storage.join(p, CHECKPOINTS_DIR), p):
        names = storage.list_dir(d)
        steps = sorted(
            step_number(n)
            for n in names
            if is_step_name(n) and storage.exists(storage.join(d, n, COMMIT_FILE))
        )
        paths = [step_path(storage, d, s) for s in steps]
        ours = [x for x in paths if not is_orbax_step(storage, x)]  # Orbax's have no checksums
        if ours:
            return ours
        if paths:
            break
    return [_ours(storage, p, path)]


def verify(path: str, progress: Progress | None = None) -> VerifyReport:
    """Re-read every byte of one checkpoint and check every checksum, reporting every problem
    (a missing or truncated file, a checksum mismatch, an unreadable manifest or metadata)
    instead of stopping at the first, so that the whole extent of the damage is known.

    Args:
        path: a checkpoint as ``restore`` accepts it: a step directory, its ``items/`` child,
            or a run (then its latest committed step); a local path or a bucket URL.
        progress: called as ``progress(bytes_done, bytes_total)`` as chunks are checked.

    Returns:
        The report: ``ok`` when nothing is wrong, else ``problems``, each with its kind, the
        file, and where known the array, offset and length.

    Raises:
        CheckpointNotFoundError: nothing at ``path``.
        IncompleteCheckpointError: ``path`` (or every step of a run) never committed.
        UnsupportedFormatError: a newer format than this stepsafe reads, or a checkpoint
            Orbax wrote (it has no stepsafe checksums).
        StorageError: the storage failed in a way that is not about this checkpoint.

    Example::

        report = stepsafe.verify("outputs/run/checkpoints/300")
        if not report.ok:
            for p in report.problems:
                print(p.kind, p.key, p.file, p.offset)
    """
    storage, p = storage_for(str(path))
    return check_checkpoint(storage, _ours(storage, p, path), progress)


def _ours(storage: Storage, p: str, path: str) -> str:
    """The stepsafe checkpoint ``p`` designates; one Orbax wrote is refused, saying why."""
    try:
        found = locate(storage, p)
    except NOT_STEPSAFE as e:
        if orbax_for(str(path), e) is None:
            raise
        raise _orbax_refused(path) from e
    if is_orbax_step(storage, found):
        raise _orbax_refused(path)
    return found


def _orbax_refused(path: str) -> UnsupportedFormatError:
    return UnsupportedFormatError(
        f"{path} is an Orbax checkpoint: it has no stepsafe checksums to verify (restore, "
        "inspect and convert read it)"
    )
