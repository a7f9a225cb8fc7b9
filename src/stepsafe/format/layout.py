"""Names inside one checkpoint directory, and its commit record (``_CHECKPOINT_METADATA``).

    <step dir>/_CHECKPOINT_METADATA                JSON, Orbax-compatible keys plus stepsafe's own
    <step dir>/items/manifest.<save id>.json       the tree (see manifest.py)
    <step dir>/items/process_<p>.<n>.<save id>.data  packed shard bytes, split at a target size
    <step dir>/<extra>.<save id>.<ext>             other items (the run manager's ``iter/``)

``_CHECKPOINT_METADATA`` carries a commit timestamp and is written last, so it doubles as the
commit marker on storage without atomic rename. Every other file's name carries the id of the
save that wrote it, kept in the commit record: on a bucket two saves racing for one step write
disjoint files, and the one whose marker is created wins without the loser touching a byte of
it. Extra files' checksums live in the record too, so every byte of a step is covered.
"""

from __future__ import annotations

import json
import math
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from stepsafe.errors import (
    ChecksumMismatchError,
    ManifestError,
    UnsupportedFormatError,
    UnsupportedLeafError,
)
from stepsafe.format.checksum import checksum
from stepsafe.format.manifest import FORMAT, FORMAT_VERSION, READS

COMMIT_FILE = "_CHECKPOINT_METADATA"
ITEMS_DIR = "items"
# Readers refuse bigger files unread (a link to /dev/zero must not become an endless read), and
# writers refuse to write them: save and restore agree on every limit.
COMMIT_RECORD_MAX_BYTES = 16 << 20  # mostly the user's custom metadata
EXTRA_FILE_MAX_BYTES = 1 << 30  # e.g. a data iterator's state, per process
_SAVE_ID = re.compile(r"^[0-9a-f]{8,32}$")
_PART = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,100}"
_EXTRA_NAME = re.compile(rf"^{_PART}(/{_PART}){{0,3}}$")


def new_save_id() -> str:
    return secrets.token_hex(6)


def stamped(name: str, save_id: str) -> str:
    """``name`` with ``.<save_id>`` before its extension: ``iter/process_0.json`` ->
    ``iter/process_0.<save_id>.json``."""
    head, dot, ext = name.rpartition(".")
    return f"{head}.{save_id}.{ext}" if dot and "/" not in ext else f"{name}.{save_id}"


def manifest_path(save_id: str) -> str:
    return f"{ITEMS_DIR}/{stamped('manifest.json', save_id)}"


def data_file_name(process_index: int, n: int, save_id: str) -> str:
    return stamped(f"process_{process_index}.{n:05d}.data", save_id)


def part_file_name(process_index: int, save_id: str) -> str:
    """The name of process ``process_index``'s part file in ``items/`` (format version 2)."""
    return stamped(f"part_{process_index}.json", save_id)


def is_data_file_of(name: str, process_index: int, save_id: str) -> bool:
    """Whether ``name`` is a data file that process ``process_index`` writes in save
    ``save_id`` (what a merge requires of every file a process says it wrote)."""
    head, _, n = name.removesuffix(f".{save_id}.data").rpartition(".")
    return (
        name.endswith(f".{save_id}.data")
        and head == f"process_{process_index}"
        and len(n) >= 5
        and n.isascii()
        and n.isdigit()
    )


def is_save_id(value: object) -> bool:
    """Whether ``value`` has a save id's form (it names files: nothing else may pass)."""
    return isinstance(value, str) and _SAVE_ID.match(value) is not None


def check_extra_name(name: str, where: str) -> str:
    """Extra files' names come from the metadata, i.e. untrusted: relative, inside the step,
    nothing that ``..`` or a stray character could turn into another path."""
    if (
        not isinstance(name, str)
        or not _EXTRA_NAME.match(name)
        or ".." in name.split("/")
        or name.split("/")[0] in (ITEMS_DIR, COMMIT_FILE)
    ):
        raise ManifestError(f"{where} names an unsafe extra file {name!r}")
    return name


def metrics_problem(metrics: object) -> str | None:
    """Why ``metrics`` cannot be a step's metrics (a dict of str -> finite int or float, what
    retention by metric compares), or None when it can. One rule for the writer, which refuses
    it in the caller's thread, and the reader, which refuses a record that breaks it."""
    if not isinstance(metrics, dict):
        return f"metrics must be a dict of str -> number, got {type(metrics).__name__}"
    for key, value in metrics.items():
        if not isinstance(key, str):
            return f"metrics keys must be str, got {key!r}"
        if type(value) not in (int, float) or not math.isfinite(value):
            return f"metrics[{key!r}] must be a finite int or float, got {value!r}"
    return None


def _canonical(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


@dataclass
class CommitRecord:
    """The commit record: the contents of ``_CHECKPOINT_METADATA`` (the file keeps Orbax's
    name). Four things are called "metadata" around a checkpoint, each with its own name here:
    this record; the user's ``custom_metadata`` dict inside it; ``stepsafe.metadata(path)``, the
    tree of array shapes and dtypes (Orbax's name for it); a cloud's instance metadata service.

    It carries the manifest's checksum and one over its own other fields, so that not a byte of
    a checkpoint (step, user metadata, inline values in the manifest) can change unnoticed.
    """

    step: int | None = None
    init_timestamp_nsecs: int = field(default_factory=time.time_ns)
    commit_timestamp_nsecs: int | None = None
    custom_metadata: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    manifest_checksum: str | None = None
    save_id: str = field(default_factory=new_save_id)
    extra_files: dict[str, str] = field(default_factory=dict)  # name -> checksum of its bytes
    metrics: dict[str, int | float] = field(default_factory=dict)  # e.g. {"loss": 1.23}

    @property
    def manifest_path(self) -> str:
        return manifest_path(self.save_id)

    def extra_path(self, name: str) -> str:
        """Where extra file ``name`` (as the writer named it) lies inside the step."""
        return stamped(name, self.save_id)

    def to_json(self) -> bytes:
        doc = {
            "format": FORMAT,
            "format_version": self.format_version,
            "step": self.step,
            "init_timestamp_nsecs": self.init_timestamp_nsecs,
            "commit_timestamp_nsecs": self.commit_timestamp_nsecs,
            "custom_metadata": self.custom_metadata,
            "manifest_checksum": self.manifest_checksum,
            "save_id": self.save_id,
            "extra_files": self.extra_files,
            "item_handlers": None,
            "metrics": self.metrics,
            "performance_metrics": {},
        }
        doc["checksum"] = checksum(_canonical(doc))
        raw = json.dumps(doc, indent=1).encode()
        if len(raw) > COMMIT_RECORD_MAX_BYTES:
            raise UnsupportedLeafError(
                f"the checkpoint's metadata would be {len(raw)} bytes of JSON, more than the "
                f"{COMMIT_RECORD_MAX_BYTES} that readers accept: keep custom metadata small (save "
                "big things in the tree)"
            )
        return raw

    @classmethod
    def from_json(cls, raw: bytes, where: str) -> CommitRecord:
        try:
            doc = json.loads(raw)
            if not isinstance(doc, dict) or doc.get("format") != FORMAT:
                raise ManifestError(f"{where} was not written by stepsafe")
            version = doc.get("format_version")
            if version not in READS:
                raise UnsupportedFormatError(
                    f"checkpoint {where} has format version {version!r}; this stepsafe reads "
                    f"versions {', '.join(map(str, READS))}: upgrade stepsafe to read it"
                )
            stored = doc.pop("checksum", None)
            if stored != checksum(_canonical(doc)):
                raise ChecksumMismatchError(
                    f"{where} does not match its checksum: the checkpoint's metadata is corrupt"
                )
            step = doc.get("step")
            save_id = doc["save_id"]
            if not isinstance(save_id, str) or not _SAVE_ID.match(save_id):
                raise ManifestError(f"{where} holds an invalid save id {save_id!r}")
            extras = doc.get("extra_files") or {}
            for name, sum_ in extras.items():
                check_extra_name(name, where)
                if not isinstance(sum_, str):
                    raise ManifestError(f"{where} holds a bad checksum for extra file {name!r}")
            commit = doc.get("commit_timestamp_nsecs")
            for name, value in (("step", step), ("commit_timestamp_nsecs", commit)):
                if value is not None and type(value) is not int:
                    raise ManifestError(f"{where} holds a non-integer {name} {value!r}")
            if type(doc["init_timestamp_nsecs"]) is not int:
                raise ManifestError(f"{where} holds a non-integer init_timestamp_nsecs")
            metrics = doc.get("metrics") or {}
            problem = metrics_problem(metrics)
            if problem is not None:
                raise ManifestError(f"{where} holds bad metrics: {problem}")
            if not isinstance(doc["manifest_checksum"], str | None):
                raise ManifestError(f"{where} holds a bad manifest checksum")
            return cls(
                step=step,
                init_timestamp_nsecs=doc["init_timestamp_nsecs"],
                commit_timestamp_nsecs=commit,
                custom_metadata=dict(doc.get("custom_metadata") or {}),
                format_version=version,
                manifest_checksum=doc["manifest_checksum"],
                save_id=save_id,
                extra_files=dict(extras),
                metrics=dict(metrics),
            )
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
            raise ManifestError(f"{where} is corrupt ({type(e).__name__}: {e})") from e
