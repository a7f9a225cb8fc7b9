"""Re-read every byte of one checkpoint and check every checksum; report problems as data.

``restore`` verifies what it reads, but stops at the first bad chunk and reads only what was
asked for. This reads everything through ``CheckpointReader.check_chunks``, keeps going past
failures and returns each problem (a manifest that cannot be read, a missing or truncated
file, a checksum mismatch) with the array, the file and the offset, so that an operator learns
the full extent of the damage before deciding what to delete. Chunks are read in windows of
about ``knobs.WINDOW_BYTES``, each window one batch (a bucket merges neighbouring chunks into a
few large requests), so memory stays bounded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from stepsafe import knobs
from stepsafe.errors import (
    ChecksumMismatchError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    UnsupportedFormatError,
)
from stepsafe.format.layout import COMMIT_FILE
from stepsafe.format.manifest import Chunk
from stepsafe.format.reader import CheckpointReader
from stepsafe.format.step_files import read_commit_record, read_extra
from stepsafe.storage import Storage

Progress = Callable[[int, int], None]  # (bytes done, bytes total)


@dataclass(frozen=True)
class Problem:
    """One thing wrong. ``kind``: checksum | missing | size | unreadable | metadata |
    incomplete (never committed)."""

    kind: str
    message: str
    file: str
    key: str | None = None
    offset: int | None = None
    length: int | None = None


@dataclass
class VerifyReport:
    """What ``verify`` found in one checkpoint: ``ok`` when every byte was read and matched."""

    path: str
    step: int | None = None
    num_arrays: int = 0
    num_files: int = 0
    bytes_total: int = 0
    bytes_checked: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def check_checkpoint(
    storage: Storage, step_dir: str, progress: Progress | None = None
) -> VerifyReport:
    """Check the checkpoint at ``step_dir``: its record and manifest, its extra files, the
    size of every data file and the checksum of every chunk, collecting every problem.

    Raises:
        UnsupportedFormatError: a newer format than this stepsafe reads (not damage).
        StorageError: the storage failed in a way that is not about this checkpoint.
    """
    report = VerifyReport(step_dir)
    where = storage.join(step_dir, COMMIT_FILE)
    try:
        record = read_commit_record(storage, step_dir)
        where = storage.join(step_dir, record.manifest_path)
        reader = CheckpointReader(storage, step_dir)
    except UnsupportedFormatError:
        raise
    except CorruptCheckpointError as e:
        report.problems.append(Problem("metadata", str(e), where))
        return report
    except IncompleteCheckpointError as e:
        report.problems.append(Problem("incomplete", str(e), where))
        return report
    for name in record.extra_files:
        try:
            read_extra(storage, step_dir, name, record)
        except (CorruptCheckpointError, OSError) as e:
            kind = "checksum" if isinstance(e, ChecksumMismatchError) else "missing"
            file = storage.join(step_dir, record.extra_path(name))
            report.problems.append(Problem(kind, str(e), file))
    manifest = reader.manifest
    report.step = reader.record.step
    report.num_arrays = len(manifest.arrays)
    report.num_files = len(manifest.files)
    missing = _check_files(reader, report)
    chunks = []
    for key, entry in manifest.arrays.items():
        try:  # a version-2 array's shards come from a part file, which may be damaged
            shards = list(entry.shards)
        except CorruptCheckpointError as e:
            kind = "checksum" if isinstance(e, ChecksumMismatchError) else "metadata"
            report.problems.append(Problem(kind, str(e), reader.path, key))
            continue
        chunks += [(key, c) for shard in shards for c in shard.chunks]
    report.bytes_total = sum(c.length for _, c in chunks)
    done = 0
    reported_missing: set[tuple[str, str]] = set()
    window: list[tuple[str, Chunk]] = []
    window_bytes = 0
    limit = knobs.WINDOW_BYTES  # once, not per chunk
    for i, (key, c) in enumerate(chunks):
        if c.file in missing:
            if (key, c.file) not in reported_missing:
                reported_missing.add((key, c.file))
                message = f"array {key!r}: its data file is missing"
                file = reader.file_path(c.file)
                report.problems.append(Problem("missing", message, file, key, c.offset, c.length))
            done += c.length
        else:
            window.append((key, c))
            window_bytes += c.length
        last = i == len(chunks) - 1
        if window and (last or window_bytes >= limit):
            _check_window(reader, window, report)
            done += window_bytes
            window, window_bytes = [], 0
        if progress is not None and (last or not window):
            progress(done, report.bytes_total)
    return report


def _check_window(
    reader: CheckpointReader, window: list[tuple[str, Chunk]], report: VerifyReport
) -> None:
    for (key, c), found in zip(window, reader.check_chunks(window)):
        file = reader.file_path(c.file)
        if found is not None and not isinstance(found, ChecksumMismatchError):
            report.problems.append(Problem("unreadable", str(found), file, key, c.offset, c.length))
            continue
        report.bytes_checked += c.length
        if found is not None:
            message = f"checksum mismatch in array {key!r}"
            report.problems.append(Problem("checksum", message, file, key, c.offset, c.length))


def _check_files(reader: CheckpointReader, report: VerifyReport) -> set[str]:
    """Report data files that are missing or of the wrong size; returns the missing ones."""
    missing: set[str] = set()
    for name, want in reader.manifest.files.items():
        path = reader.file_path(name)
        try:
            size = reader.storage.size(path)
        except OSError:
            missing.add(name)
            report.problems.append(Problem("missing", f"data file {path} is missing", path))
            continue
        if size != want:
            message = f"data file {path} has {size} bytes, the manifest says {want}"
            report.problems.append(Problem("size", message, path))
    return missing
