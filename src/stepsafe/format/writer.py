"""Write one checkpoint: plan the data files, write them, build the manifest from what was
written, commit.

Data files are split at a target size so that big states spread over files that can be written
and read in parallel (``plan.py``); each file's writer returns the record of what it wrote
(``written.py``); the manifest is assembled from those records only, and refused unless every
array is covered exactly (``merge.py``). The manifest, any extra files, and
``_CHECKPOINT_METADATA`` follow the data, the record last, and only then does the transaction
commit.
"""

from __future__ import annotations

import time
from typing import Any

from stepsafe.errors import ConfigError
from stepsafe.format.checksum import checksum
from stepsafe.format.layout import COMMIT_FILE, CommitRecord, check_extra_name
from stepsafe.format.manifest import Manifest
from stepsafe.format.merge import merge_parts
from stepsafe.format.plan import ALIGN, HostArray, plan_files
from stepsafe.format.written import write_files
from stepsafe.storage import Storage, Transaction
from stepsafe.tree import Structure

__all__ = ["HostArray", "commit_manifest", "write_checkpoint"]


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
    process_index: int = 0,
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
        process_index: names this process's data files.

    Raises:
        ConfigError: ``file_size`` (``data_file_size_bytes``) below 64 bytes.
        ManifestError: shards that do not tile their arrays, or data not written in full;
            nothing is committed then.
        StorageError: as the storage raised it; nothing is committed then.
    """
    file_size = storage.default_file_size if file_size is None else file_size
    if file_size < ALIGN:
        raise ConfigError(f"data_file_size_bytes must be at least {ALIGN}, got {file_size}")
    plan = plan_files(arrays, file_size, process_index, record.save_id)
    with storage.transaction(path) as txn:
        part = write_files(txn, plan)
        manifest = merge_parts(structure, arrays, values, [part])
        commit_manifest(txn, manifest, record, extra_files)
    return manifest


def commit_manifest(
    txn: Transaction,
    manifest: Manifest,
    record: CommitRecord,
    extra_files: dict[str, bytes] | None = None,
) -> None:
    """Write the manifest, the extra files and the record (last) into ``txn`` and commit it;
    the data files must be in ``txn`` already.

    Raises:
        UnsupportedLeafError: a manifest bigger than readers accept.
        StorageError, CheckpointExistsError: as the storage raised them.
    """
    raw = manifest.to_json()
    txn.write_file(record.manifest_path, [raw])
    for name, content in (extra_files or {}).items():
        check_extra_name(name, "extra_files")
        txn.write_file(record.extra_path(name), [content])
        record.extra_files[name] = checksum(content)
    record.manifest_checksum = checksum(raw)
    record.commit_timestamp_nsecs = time.time_ns()
    txn.write_file(COMMIT_FILE, [record.to_json()])
    txn.commit()
