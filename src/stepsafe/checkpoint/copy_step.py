"""Copy a committed checkpoint to another place, its files as they are, the marker last.

What multi-tier checkpointing promotes from a local disk to the persistent tier: the files are
already in their final format, so nothing is captured or packed again. Every checksum of the
source is checked first (a damaged local step must never become a persistent one); then each
file streams through in blocks into a transaction on the destination, and the commit record,
byte for byte the source's, goes last: a copy cut short leaves no committed step (a temporary
on a local disk, unmarked files on a bucket, which the run's next start or ``stepsafe gc``
clears).
"""

from __future__ import annotations

from collections.abc import Iterator

from stepsafe.errors import CorruptCheckpointError, ManifestError
from stepsafe.format import COMMIT_FILE, CheckpointReader
from stepsafe.format.check import check_checkpoint
from stepsafe.format.layout import COMMIT_RECORD_MAX_BYTES
from stepsafe.format.step_files import read_step_file
from stepsafe.storage import Storage

BLOCK_BYTES = 16 << 20  # one read and one write at a time per file


def copy_step(
    src_storage: Storage, src: str, dst_storage: Storage, dst: str, *, step: int | None = None
) -> int:
    """Copy the committed checkpoint ``src`` to ``dst`` (which must not hold one); the bytes
    copied. ``step``: the step ``src`` must hold (its record says).

    Raises:
        CorruptCheckpointError: ``src`` fails a check, or holds another step than ``step``
            (nothing is written then).
        CheckpointExistsError: ``dst`` holds a committed checkpoint already.
        StorageError: either storage refused; nothing is committed at ``dst`` then.
    """
    report = check_checkpoint(src_storage, src)
    if not report.ok:
        first = report.problems[0]
        raise CorruptCheckpointError(
            f"{src} is damaged ({first.kind}: {first.message}), so it is not copied; "
            f"{len(report.problems)} problem(s) in all (`stepsafe verify {src}`)"
        )
    reader = CheckpointReader(src_storage, src)
    if step is not None and reader.record.step != step:
        raise ManifestError(
            f"{src} holds the checkpoint of step {reader.record.step}, not {step}: not copied"
        )
    files = reader.named_files()
    raw_record = read_step_file(src_storage, src, COMMIT_FILE, COMMIT_RECORD_MAX_BYTES)
    copied = 0
    with dst_storage.transaction(dst) as txn:
        for rel in files:
            path = src_storage.join(src, rel)
            copied += src_storage.size(path)
            txn.write_file(rel, _blocks(src_storage, path))
        txn.write_file(COMMIT_FILE, [raw_record])
        txn.commit()
    return copied


def _blocks(storage: Storage, path: str) -> Iterator[memoryview]:
    size = storage.size(path)
    handle = storage.open_read(path)
    try:
        for offset in range(0, size, BLOCK_BYTES):
            buf = memoryview(bytearray(min(BLOCK_BYTES, size - offset)))
            handle.read_into(offset, buf)
            yield buf
    finally:
        handle.close()
