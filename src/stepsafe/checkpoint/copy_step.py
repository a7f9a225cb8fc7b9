"""Copy a committed checkpoint to another place, its files as they are, the marker last.

What multi-tier checkpointing promotes from a local disk to the persistent tier: the files are
already in their final format, so nothing is captured or packed again. Every byte is checked
as it streams: the manifest against the record, each chunk of each data file against its
checksum (a mismatch stops the copy before anything is committed), each extra file against the
record; the commit record, byte for byte the source's, goes last. A copy cut short, or stopped
by damage, leaves no committed step (a temporary on a local disk, unmarked files on a bucket,
which the run's next start or ``stepsafe gc`` clears). A step written by several processes
(whose chunk tables lie in part files) is verified whole first, then copied.
"""

from __future__ import annotations

from collections.abc import Iterator

from stepsafe.errors import ChecksumMismatchError, CorruptCheckpointError, ManifestError
from stepsafe.format import COMMIT_FILE, ITEMS_DIR, CheckpointReader
from stepsafe.format.check import check_checkpoint
from stepsafe.format.checksum import checksum
from stepsafe.format.layout import COMMIT_RECORD_MAX_BYTES
from stepsafe.format.manifest import MANIFEST_MAX_BYTES
from stepsafe.format.step_files import read_extra, read_step_file
from stepsafe.storage import Storage

BLOCK_BYTES = 16 << 20  # what one read gathers of back-to-back chunks

Span = tuple[int, int, str | None]  # offset, length, checksum (None: padding, not checked)


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
    reader = CheckpointReader(src_storage, src)  # the record, and the manifest's checksum
    if step is not None and reader.record.step != step:
        raise ManifestError(
            f"{src} holds the checkpoint of step {reader.record.step}, not {step}: not copied"
        )
    record = reader.record
    if reader.manifest.parts is not None:  # chunk tables in part files: verify whole first
        _verify(src_storage, src)
    reader.check_files()  # every data and part file there, of its size
    spans = _spans(reader)
    raw_record = read_step_file(src_storage, src, COMMIT_FILE, COMMIT_RECORD_MAX_BYTES)
    copied = 0
    with dst_storage.transaction(dst) as txn:
        for rel in reader.named_files():
            path = src_storage.join(src, rel)
            name = rel.removeprefix(f"{ITEMS_DIR}/")
            if rel == record.manifest_path:
                raw = read_step_file(src_storage, src, rel, MANIFEST_MAX_BYTES)
                if checksum(raw) != record.manifest_checksum:
                    raise ChecksumMismatchError(f"{path} changed while it was copied")
                body = [raw]
            elif name in spans:
                body = _checked(src_storage, path, spans[name])
            elif rel.startswith(f"{ITEMS_DIR}/"):  # a part file (verified above)
                body = _checked(src_storage, path, [(0, src_storage.size(path), None)])
            else:  # an extra file: its checksum is in the record
                extra = next(n for n in record.extra_files if record.extra_path(n) == rel)
                body = [read_extra(src_storage, src, extra, record) or b""]
            copied += src_storage.size(path)
            txn.write_file(rel, body)
        txn.write_file(COMMIT_FILE, [raw_record])
        txn.commit()
    return copied


def _verify(storage: Storage, src: str) -> None:
    report = check_checkpoint(storage, src)
    if not report.ok:
        first = report.problems[0]
        raise CorruptCheckpointError(
            f"{src} is damaged ({first.kind}: {first.message}), so it is not copied; "
            f"{len(report.problems)} problem(s) in all (`stepsafe verify {src}`)"
        )


def _spans(reader: CheckpointReader) -> dict[str, list[Span]]:
    """Each data file's bytes in order: its chunks (with their checksums) and the padding
    between and after them, covering the file exactly."""
    chunks: dict[str, list[tuple[int, int, str]]] = {}
    if reader.manifest.parts is None:
        for entry in reader.manifest.arrays.values():
            for shard in entry.shards:
                for c in shard.chunks:
                    chunks.setdefault(c.file, []).append((c.offset, c.length, c.checksum))
    out: dict[str, list[Span]] = {}
    for name, size in reader.manifest.files.items():
        spans: list[Span] = []
        pos = 0
        for offset, length, digest in sorted(chunks.get(name, [])):
            if offset > pos:
                spans.append((pos, offset - pos, None))
            spans.append((offset, length, digest))
            pos = offset + length
        if size > pos:
            spans.append((pos, size - pos, None))
        out[name] = spans
    return out


def _checked(storage: Storage, path: str, spans: list[Span]) -> Iterator[memoryview]:
    """The file's bytes in blocks of back-to-back spans, each chunk checked as it passes.

    Raises:
        ChecksumMismatchError: a chunk does not match (the copy stops uncommitted).
    """
    handle = storage.open_read(path)
    try:
        i = 0
        while i < len(spans):
            start, j, end = spans[i][0], i, spans[i][0]
            while j < len(spans) and (j == i or end - start + spans[j][1] <= BLOCK_BYTES):
                end = spans[j][0] + spans[j][1]
                j += 1
            buf = memoryview(bytearray(end - start))
            handle.read_into(start, buf)
            for offset, length, digest in spans[i:j]:
                part = buf[offset - start : offset - start + length]
                if digest is not None and checksum(part) != digest:
                    raise ChecksumMismatchError(
                        f"{path}: the chunk at offset {offset} ({length} bytes) does not match "
                        "its checksum, so it is not copied (`stepsafe verify` the step)"
                    )
            yield buf
            i = j
    finally:
        handle.close()
