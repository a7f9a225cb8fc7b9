"""Write one checkpoint: plan the data files, write them, build the manifest from what was
written, commit.

Data files are split at a target size so that big states spread over files that can be written
and read in parallel (``plan.py``); each file's writer returns the record of what it wrote
(``written.py``); the manifest is assembled from those records only, and refused unless every
array is covered exactly (``merge.py``). The manifest, any extra files, and
``_CHECKPOINT_METADATA`` follow the data, the record last, and only then does the transaction
commit. Under many processes each writes its own part (``write_part``) into one transaction and
process 0 commits them all (``commit_parts``); one process does both (``write_checkpoint``).
"""

from __future__ import annotations

import time
from typing import Any

from stepsafe.errors import ConfigError, ManifestError
from stepsafe.format.checksum import checksum
from stepsafe.format.grid_parts import merge_grid_parts
from stepsafe.format.layout import COMMIT_FILE, CommitRecord, check_extra_name, stamped
from stepsafe.format.manifest import GRID_VERSION, Manifest
from stepsafe.format.merge import merge_parts
from stepsafe.format.plan import ALIGN, HostArray, plan_files
from stepsafe.format.written import WrittenPart, write_files
from stepsafe.storage import Storage, Transaction
from stepsafe.tree import Structure

__all__ = ["HostArray", "commit_manifest", "commit_parts", "write_checkpoint", "write_part"]


def write_checkpoint(
    storage: Storage,
    path: str,
    structure: Structure,
    arrays: list[HostArray],
    values: dict[str, Any],
    *,
    record: CommitRecord,
    extra_files: dict[str, bytes] | None = None,
    file_size: int | None = None,
) -> Manifest:
    """Write ``arrays`` and ``values`` as a committed checkpoint at ``path`` on ``storage``.

    Args:
        structure: the tree's structure, as ``tree.flatten`` gives it.
        arrays: every array of the tree, with every one of its shards.
        values: the non-array leaves, stored inline in the manifest.
        record: written last, as ``_CHECKPOINT_METADATA``; its checksums are filled in here.
        extra_files: small files stored beside the state (name -> bytes).
        file_size: where data files are split; None for the storage's default (big files on
            a local disk, smaller ones on buckets, where each goes up in one request).

    Raises:
        ConfigError: ``file_size`` (``data_file_size_bytes``) below 64 bytes.
        ManifestError: shards that do not tile their arrays, or data not written in full;
            nothing is committed then.
        StorageError: as the storage raised it; nothing is committed then.
    """
    file_size = check_file_size(storage, file_size)
    with storage.transaction(path) as txn:
        part = write_part(txn, arrays, record.save_id, 0, file_size, extra_files)
        manifest = commit_parts(txn, structure, arrays, values, [part], record)
    assert manifest is not None  # one process: version 1
    return manifest


def check_file_size(storage: Storage, file_size: int | None) -> int:
    """The data file size to split at: ``file_size``, or the storage's default for None.

    Raises:
        ConfigError: ``file_size`` below the format's alignment.
    """
    file_size = storage.default_file_size if file_size is None else file_size
    if file_size < ALIGN:
        raise ConfigError(f"data_file_size_bytes must be at least {ALIGN}, got {file_size}")
    return file_size


def write_part(
    txn: Transaction,
    arrays: list[HostArray],
    save_id: str,
    process_index: int,
    file_size: int,
    extra_files: dict[str, bytes] | None = None,
) -> WrittenPart:
    """Write one process's shards of ``arrays`` and its ``extra_files`` into ``txn`` (data
    files named for ``process_index`` and ``save_id``) and return what was written.

    Raises:
        ManifestError: a shard outside its array, or data not written in full.
        UnsupportedLeafError: an extra file's name is unsafe.
        StorageError: as the storage raised it.
    """
    part = write_files(txn, plan_files(arrays, file_size, process_index, save_id))
    for name, content in (extra_files or {}).items():
        check_extra_name(name, "extra_files")
        txn.write_file(stamped(name, save_id), [content])
        part.extra_files[name] = checksum(content)
    return part


def commit_parts(
    txn: Transaction,
    structure: Structure,
    arrays: list[HostArray],
    values: dict[str, Any],
    parts: list[WrittenPart],
    record: CommitRecord,
) -> Manifest | None:
    """Merge every process's part into the manifest (refused unless it covers every array
    exactly), write it and the record, and commit ``txn``; the manifest (None for version 2,
    whose shards stay in the part files). Parts that put cells in part files
    (many processes: ``grid_parts.write_cells``) make a version-2 manifest.

    Raises:
        ManifestError: the parts do not tile the arrays, or two name the same extra file.
        StorageError, CheckpointExistsError: as the storage raised them.
    """
    manifest = None
    if any(part.cells or part.part_file for part in parts):
        raw = merge_grid_parts(structure, arrays, values, parts, record.save_id)
        record.format_version = GRID_VERSION
    else:
        manifest = merge_parts(structure, arrays, values, parts, record.save_id)
        raw = manifest.to_json()
    for part in parts:
        for name, digest in part.extra_files.items():
            if name in record.extra_files:
                raise ManifestError(f"extra file {name!r} was written twice: nothing was committed")
            record.extra_files[name] = digest
    commit_manifest(txn, raw, record)
    return manifest


def commit_manifest(txn: Transaction, raw: bytes, record: CommitRecord) -> None:
    """Write the manifest's bytes ``raw`` and the record (last) into ``txn`` and commit it;
    the data and extra files must be in ``txn`` already, their checksums in ``record``.

    Raises:
        UnsupportedLeafError: a manifest bigger than readers accept.
        StorageError, CheckpointExistsError: as the storage raised them.
    """
    txn.write_file(record.manifest_path, [raw])
    record.manifest_checksum = checksum(raw)
    record.commit_timestamp_nsecs = time.time_ns()
    txn.write_file(COMMIT_FILE, [record.to_json()])
    txn.commit()
