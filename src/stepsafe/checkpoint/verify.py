"""Re-read every byte of a checkpoint and check every checksum; report problems as data.

``restore`` already verifies what it reads, but stops at the first bad chunk and only reads
what was asked for. ``verify`` reads everything, keeps going past failures and returns each
problem with the array, the file and the offset, so that an operator learns the full extent of
the damage (one flipped bit or a missing file) before deciding what to delete.
Chunks are read in windows of about ``WINDOW_BYTES``, each window as one batch (a bucket merges
neighbouring chunks into a few large requests), so memory stays bounded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from stepsafe.checkpoint.locate import CHECKPOINTS_DIR, is_step_name, locate, step_number
from stepsafe.errors import (
    ChecksumMismatchError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    UnsupportedFormatError,
)
from stepsafe.format import (
    ITEMS_DIR,
    METADATA_FILE,
    CheckpointReader,
    read_extra,
    read_metadata,
)
from stepsafe.format.checksum import checksum
from stepsafe.format.manifest import Chunk
from stepsafe.storage import RangeRead, Storage, storage_for

WINDOW_BYTES = 256 << 20

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
            if is_step_name(n) and storage.exists(storage.join(d, n, METADATA_FILE))
        )
        if steps:
            return [storage.join(d, str(s)) for s in steps]
    return [locate(storage, p)]


def verify(path: str, progress: Progress | None = None) -> VerifyReport:
    """Check one checkpoint (``path`` as ``restore`` accepts it; a run means its latest step)."""
    storage, p = storage_for(str(path))
    step_dir = locate(storage, p)
    report = VerifyReport(step_dir)
    where = storage.join(step_dir, METADATA_FILE)
    try:
        metadata = read_metadata(storage, step_dir)
        where = storage.join(step_dir, metadata.manifest_path)
        reader = CheckpointReader(storage, step_dir)
    except UnsupportedFormatError:
        raise
    except CorruptCheckpointError as e:
        report.problems.append(Problem("metadata", str(e), where))
        return report
    except IncompleteCheckpointError as e:
        report.problems.append(Problem("incomplete", str(e), where))
        return report
    for name in metadata.extra_files:
        try:
            read_extra(storage, step_dir, name, metadata)
        except (CorruptCheckpointError, OSError) as e:
            kind = "checksum" if isinstance(e, ChecksumMismatchError) else "missing"
            file = storage.join(step_dir, metadata.extra_path(name))
            report.problems.append(Problem(kind, str(e), file))
    manifest = reader.manifest
    report.step = reader.metadata.step
    report.num_arrays = len(manifest.arrays)
    report.num_files = len(manifest.files)
    bad_files = _check_files(storage, step_dir, manifest.files, report)
    chunks = [
        (key, c)
        for key, entry in manifest.arrays.items()
        for shard in entry.shards
        for c in shard.chunks
    ]
    report.bytes_total = sum(c.length for _, c in chunks)
    done = 0
    reported_missing: set[tuple[str, str]] = set()
    window: list[tuple[str, Chunk]] = []
    window_bytes = 0
    for i, (key, c) in enumerate(chunks):
        if bad_files.get(c.file) == "missing":
            if (key, c.file) not in reported_missing:
                reported_missing.add((key, c.file))
                file = storage.join(step_dir, ITEMS_DIR, c.file)
                report.problems.append(
                    Problem("missing", f"array {key!r}: its data file is missing", file, key,
                            c.offset, c.length)
                )  # fmt: skip
            done += c.length
        else:
            window.append((key, c))
            window_bytes += c.length
        last = i == len(chunks) - 1
        if window and (last or window_bytes >= WINDOW_BYTES):
            _check_window(storage, step_dir, window, report)
            done += window_bytes
            window, window_bytes = [], 0
        if progress is not None and (last or not window):
            progress(done, report.bytes_total)
    return report


def _check_window(
    storage: Storage, step_dir: str, window: list[tuple[str, Chunk]], report: VerifyReport
) -> None:
    """Read a window of chunks as one batch and check each; if the batch fails, read them one
    by one, so that the report says which chunks could not be read."""
    files = [storage.join(step_dir, ITEMS_DIR, c.file) for _, c in window]
    buf = memoryview(bytearray(sum(c.length for _, c in window)))
    views, pos = [], 0
    for _, c in window:
        views.append(buf[pos : pos + c.length])
        pos += c.length
    bad: list[int] = []

    def check(i: int) -> None:
        if checksum(views[i]) != window[i][1].checksum:
            bad.append(i)

    try:
        storage.read_ranges(
            [RangeRead(f, c.offset, v) for f, (_, c), v in zip(files, window, views)], check
        )
        unreadable: dict[int, Exception] = {}
    except (CorruptCheckpointError, OSError):
        bad, unreadable = [], {}
        for i, (f, (_, c), v) in enumerate(zip(files, window, views)):
            try:
                storage.read_into(f, c.offset, v)
            except (CorruptCheckpointError, OSError) as e:
                unreadable[i] = e
            else:
                check(i)
    for i, ((key, c), f) in enumerate(zip(window, files)):
        if i in unreadable:
            report.problems.append(
                Problem("unreadable", str(unreadable[i]), f, key, c.offset, c.length)
            )
            continue
        report.bytes_checked += c.length
        if i in bad:
            report.problems.append(
                Problem("checksum", f"checksum mismatch in array {key!r}", f, key, c.offset,
                        c.length)
            )  # fmt: skip


def _check_files(
    storage: Storage, step_dir: str, files: dict[str, int], report: VerifyReport
) -> dict[str, str]:
    """Data files that are missing or of the wrong size: name -> "missing" | "size"."""
    bad: dict[str, str] = {}
    for name, want in files.items():
        path = storage.join(step_dir, ITEMS_DIR, name)
        try:
            size = storage.size(path)
        except OSError:
            bad[name] = "missing"
            report.problems.append(Problem("missing", f"data file {path} is missing", path))
            continue
        if size != want:
            bad[name] = "size"
            message = f"data file {path} has {size} bytes, the manifest says {want}"
            report.problems.append(Problem("size", message, path))
    return bad
