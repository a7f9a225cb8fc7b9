"""Names inside one checkpoint directory, and its ``_CHECKPOINT_METADATA`` document.

    <step dir>/_CHECKPOINT_METADATA    JSON, Orbax-compatible keys plus stepsafe's own
    <step dir>/items/manifest.json     the tree (see manifest.py)
    <step dir>/items/<process>.<n>.data  packed shard bytes, split at a target size
    <step dir>/<extra>/...             other items (the run manager's ``iter/``)

``_CHECKPOINT_METADATA`` carries a commit timestamp and is written last, so it doubles as the
commit marker on storage without atomic rename.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from stepsafe.errors import ChecksumMismatchError, ManifestError, UnsupportedFormatError
from stepsafe.format.checksum import checksum
from stepsafe.format.manifest import FORMAT, FORMAT_VERSION

METADATA_FILE = "_CHECKPOINT_METADATA"
ITEMS_DIR = "items"
MANIFEST_FILE = "manifest.json"
MANIFEST_PATH = f"{ITEMS_DIR}/{MANIFEST_FILE}"


def data_file_name(process_index: int, n: int) -> str:
    return f"process_{process_index}.{n:05d}.data"


def _canonical(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


@dataclass
class CheckpointMetadata:
    """The contents of ``_CHECKPOINT_METADATA``.

    It carries the manifest's checksum and one over its own other fields, so that not a byte of
    a checkpoint (step, user metadata, inline values in the manifest) can change unnoticed.
    """

    step: int | None = None
    init_timestamp_nsecs: int = field(default_factory=time.time_ns)
    commit_timestamp_nsecs: int | None = None
    custom_metadata: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    manifest_checksum: str | None = None

    def to_json(self) -> bytes:
        doc = {
            "format": FORMAT,
            "format_version": self.format_version,
            "step": self.step,
            "init_timestamp_nsecs": self.init_timestamp_nsecs,
            "commit_timestamp_nsecs": self.commit_timestamp_nsecs,
            "custom_metadata": self.custom_metadata,
            "manifest_checksum": self.manifest_checksum,
            "item_handlers": None,
            "metrics": {},
            "performance_metrics": {},
        }
        doc["checksum"] = checksum(_canonical(doc))
        return json.dumps(doc, indent=1).encode()

    @classmethod
    def from_json(cls, raw: bytes, where: str) -> CheckpointMetadata:
        try:
            doc = json.loads(raw)
            if not isinstance(doc, dict) or doc.get("format") != FORMAT:
                raise ManifestError(f"{where} was not written by stepsafe")
            version = doc.get("format_version")
            if version != FORMAT_VERSION:
                raise UnsupportedFormatError(
                    f"checkpoint {where} has format version {version!r}; this stepsafe reads "
                    f"version {FORMAT_VERSION}: upgrade stepsafe to read it"
                )
            stored = doc.pop("checksum", None)
            if stored != checksum(_canonical(doc)):
                raise ChecksumMismatchError(
                    f"{where} does not match its checksum: the checkpoint's metadata is corrupt"
                )
            step = doc.get("step")
            return cls(
                step=int(step) if step is not None else None,
                init_timestamp_nsecs=int(doc["init_timestamp_nsecs"]),
                commit_timestamp_nsecs=doc.get("commit_timestamp_nsecs"),
                custom_metadata=dict(doc.get("custom_metadata") or {}),
                format_version=version,
                manifest_checksum=doc["manifest_checksum"],
            )
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
            raise ManifestError(f"{where} is corrupt ({type(e).__name__}: {e})") from e
