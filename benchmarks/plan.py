"""The cases of a run, as names only: which (method, variant) groups run on each storage, and
the cases of one group in order, with where each one reads or writes.

Kept apart from the methods so that the orchestrator never imports stepsafe or a client
library: it may point the children at a snapshot of stepsafe (``--snapshot``), and it must not
hold an import of the working tree's copy itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from benchmarks.states import STEP
from benchmarks.storages import BUCKET, scheme

SCRATCH = Path(__file__).resolve().parent / "out" / "scratch"


@dataclass(frozen=True)
class Variant:
    """One way to move the bytes: ``op`` is save or restore; ``storages`` where it applies."""

    name: str
    op: str
    storages: tuple[str, ...]
    doc: str


# One large object: every way the same client library offers to write and read it. The
# baseline of each server and direction is the variant with the best median.
VARIANTS: tuple[Variant, ...] = (
    Variant("put-object", "save", ("s3",), "pipe_file(buffer): one PutObject"),
    Variant("pipe-50M", "save", ("s3",), "pipe_file(buffer): multipart, 50 MiB parts, 8 at once"),
    Variant("pipe-128M", "save", ("s3",), "pipe_file(buffer): multipart, 128 MiB parts, 8 at once"),
    Variant("put-file", "save", ("s3",), "put_file from a tmpfs copy (written untimed)"),
    Variant("pipe-64M", "save", ("gcs",), "pipe_file(buffer): resumable, 64 MiB pieces"),
    Variant("pipe-256M", "save", ("gcs",), "pipe_file(buffer): resumable, 256 MiB pieces"),
    Variant("pipe-single", "save", ("gcs",), "pipe_file(buffer): one multipart POST"),
    Variant("media-single", "save", ("gcs",), "one media POST, as stepsafe sends each file"),
    Variant("cat-file", "restore", ("s3", "gcs"), "cat_file: one GET"),
    Variant("cat-file-c16", "restore", ("gcs",), "cat_file(concurrency=16): 16 ranged GETs"),
    Variant("ranges-64M", "restore", ("s3", "gcs"), "cat_ranges: 64 MiB ranged GETs at once"),
    Variant("ranges-256M", "restore", ("s3", "gcs"), "cat_ranges: 256 MiB ranged GETs at once"),
)

# stepsafe with another ``data_file_size_bytes`` (a public argument of ``stepsafe.save``): not a
# target row. 2 GiB is MaxText's default for checkpoint_storage_target_data_file_size_bytes (ours
# is the storage's choice, 128 MiB on buckets): files that big go up in parts.
STEPSAFE_FILE_SIZES = ("2048M",)


def variants(storage: str, op: str) -> list[Variant]:
    return [v for v in VARIANTS if op == v.op and storage in v.storages]


def groups(methods: list[str], file_sizes: list[str]) -> list[tuple[str, str | None]]:
    """(method, stepsafe variant) of each group, in order; a group runs all its cases on one
    fresh server (buckets) or one scratch path (disk)."""
    out: list[tuple[str, str | None]] = []
    for method in methods:
        out.append((method, None))
        if method == "stepsafe":
            out += [(method, f"files-{size}") for size in file_sizes]
    return out


@dataclass(frozen=True)
class Case:
    """One child process: ``op`` (save, restore, memcpy) at ``location``, recorded as ``phase``
    (a disk restore is ``cold`` or ``warm``); ``before``: ``evict`` or ``warm`` the page cache
    of ``location`` first, or nothing."""

    phase: str
    op: str
    location: str
    variant: str | None = None
    before: str | None = None


def cases(
    storage: str, kind: str, method: str, variant: str | None, state: str, repeat: int
) -> list[Case]:
    """The cases of one group in order: saves first, then the restores that read what they
    wrote. On disk a restore runs twice, cold (page cache emptied) and warm; on a bucket, once
    per variant of the method (one-object) or once."""
    if kind == "memcpy":
        return [Case("memcpy", "memcpy", "-")]
    if storage == "disk":
        path = str(SCRATCH / f"{state}-{method}-{repeat}")
        save = [Case("save", "save", path, variant)]
        if kind != "sync":
            return save
        return [*save, Case("cold", "restore", path, variant, "evict"),
                Case("warm", "restore", path, variant, "warm")]  # fmt: skip
    base = f"{scheme(storage)}://{BUCKET}"
    if method == "one-object":
        url = f"{base}/one-object-{repeat}.bin"
        ops = ("save", "restore")
        return [Case(op, op, url, v.name) for op in ops for v in variants(storage, op)]
    url = f"{base}/{method}-{variant or 'default'}-{repeat}/{STEP}"
    return [Case("save", "save", url, variant), Case("restore", "restore", url, variant)]
