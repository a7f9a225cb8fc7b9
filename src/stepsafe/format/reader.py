"""Read one committed checkpoint: its metadata, its manifest, and array bytes by range.

Bytes are read with ``preadv`` straight into the destination array when the destination region
is contiguous (always for whole arrays and for shards split along the first axis), so a restore
needs no staging copy; every chunk is checked against its checksum unless ``verify=False``.
"""

from __future__ import annotations

import threading

import numpy as np

from stepsafe.errors import ChecksumMismatchError, IncompleteCheckpointError, TruncatedDataError
from stepsafe.format.checksum import checksum
from stepsafe.format.layout import ITEMS_DIR, METADATA_FILE, CheckpointMetadata
from stepsafe.format.manifest import ArrayEntry, Manifest, Shard
from stepsafe.storage import ReadHandle, Storage


def is_committed(storage: Storage, path: str) -> bool:
    """True when ``path`` holds a committed checkpoint (metadata with a commit timestamp)."""
    try:
        raw = storage.read_bytes(storage.join(path, METADATA_FILE))
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return False
    try:
        return CheckpointMetadata.from_json(raw, path).commit_timestamp_nsecs is not None
    except Exception:
        return False


def read_metadata(storage: Storage, path: str) -> CheckpointMetadata:
    """The metadata of the committed checkpoint at ``path``; IncompleteCheckpointError if the
    save that wrote it never finished."""
    try:
        raw = storage.read_bytes(storage.join(path, METADATA_FILE))
    except FileNotFoundError as e:
        raise IncompleteCheckpointError(
            f"{path} is not a committed checkpoint (no {METADATA_FILE}): the save that "
            "wrote it did not finish; delete it or restore an earlier step"
        ) from e
    metadata = CheckpointMetadata.from_json(raw, storage.join(path, METADATA_FILE))
    if metadata.commit_timestamp_nsecs is None:
        raise IncompleteCheckpointError(f"{path} was never committed")
    return metadata


def read_extra(
    storage: Storage, path: str, name: str, metadata: CheckpointMetadata | None = None
) -> bytes | None:
    """Extra file ``name`` (as its writer named it) of the checkpoint at ``path``, checked
    against the checksum in its metadata; None when the save wrote no such file."""
    metadata = metadata or read_metadata(storage, path)
    want = metadata.extra_files.get(name)
    if want is None:
        return None
    where = storage.join(path, metadata.extra_path(name))
    try:
        raw = storage.read_bytes(where)
    except FileNotFoundError as e:
        raise TruncatedDataError(f"{where} is missing: the checkpoint is damaged") from e
    if checksum(raw) != want:
        raise ChecksumMismatchError(
            f"{where} does not match the checksum in {METADATA_FILE}: it is corrupt"
        )
    return raw


class CheckpointReader:
    """An open, committed checkpoint. Construction reads only the two small JSON files."""

    def __init__(self, storage: Storage, path: str) -> None:
        self.storage = storage
        self.path = path
        self.metadata = read_metadata(storage, path)
        manifest_path = storage.join(path, self.metadata.manifest_path)
        try:
            raw = storage.read_bytes(manifest_path)
        except FileNotFoundError as e:
            raise TruncatedDataError(
                f"{manifest_path} is missing: the checkpoint is damaged"
            ) from e
        if checksum(raw) != self.metadata.manifest_checksum:
            raise ChecksumMismatchError(
                f"{manifest_path} does not match the checksum in {METADATA_FILE}: the manifest is "
                "corrupt; restore an earlier step"
            )
        self.manifest = Manifest.from_json(raw, manifest_path)
        self._checked_files: set[str] = set()
        self._handles: dict[str, ReadHandle] = {}
        self._lock = threading.Lock()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            handles, self._handles = self._handles, {}
        for h in handles.values():
            h.close()

    def _handle(self, name: str) -> ReadHandle:
        with self._lock:
            h = self._handles.get(name)
            if h is None:
                h = self._handles[name] = self.storage.open_read(self._file(name))
            return h

    def _file(self, name: str) -> str:
        return self.storage.join(self.path, ITEMS_DIR, name)

    def check_files(self, key: str) -> None:
        """The data files of array ``key`` exist and have the size the manifest says: checked
        before anything is allocated, so a lying manifest cannot make us allocate terabytes."""
        for shard in self.manifest.arrays[key].shards:
            for c in shard.chunks:
                if c.file in self._checked_files:
                    continue
                path = self._file(c.file)
                try:
                    size = self.storage.size(path)
                except FileNotFoundError as e:
                    raise TruncatedDataError(f"data file {path} is missing") from e
                except OSError as e:
                    raise TruncatedDataError(f"data file {path} cannot be read: {e}") from e
                want = self.manifest.files[c.file]
                if size != want:
                    raise TruncatedDataError(
                        f"data file {path} has {size} bytes, the manifest says {want}: it was "
                        "truncated or replaced"
                    )
                self._checked_files.add(c.file)

    def read_shard_into(self, key: str, shard: Shard, out: np.ndarray, verify: bool) -> None:
        """Fill the C-contiguous ``out`` (the shard's shape) with the shard's bytes."""
        view = memoryview(out.reshape(-1).view(np.uint8))
        pos = 0
        for c in shard.chunks:
            part = view[pos : pos + c.length]
            self._handle(c.file).read_into(c.offset, part)
            if verify and checksum(part) != c.checksum:
                raise ChecksumMismatchError(
                    f"checksum mismatch in array {key!r}: file {self._file(c.file)}, offset "
                    f"{c.offset}, {c.length} bytes; the checkpoint is corrupt (restore an earlier "
                    "step, or pass verify=False to read it anyway)"
                )
            pos += c.length

    def read_array(self, key: str, verify: bool = True) -> np.ndarray:
        """The whole global array ``key`` as a fresh host array."""
        entry: ArrayEntry = self.manifest.arrays[key]
        self.check_files(key)
        out = np.empty(entry.shape, entry.dtype)
        for shard in entry.shards:
            self.read_region_from(key, shard, out[(*shard.slices, ...)], verify)
        return out

    def read_region_from(self, key: str, shard: Shard, dest: np.ndarray, verify: bool) -> None:
        if dest.flags.c_contiguous:
            self.read_shard_into(key, shard, dest, verify)
        else:
            tmp = np.empty(shard.shape, dest.dtype)
            self.read_shard_into(key, shard, tmp, verify)
            dest[...] = tmp

    def read_box(
        self, key: str, box: tuple[tuple[int, int], ...], verify: bool = True
    ) -> np.ndarray:
        """The region ``box`` of array ``key``, reading only the saved shards it overlaps."""
        entry = self.manifest.arrays[key]
        self.check_files(key)
        for shard in entry.shards:
            if shard.index == box:
                out = np.empty(shard.shape, entry.dtype)
                self.read_shard_into(key, shard, out, verify)
                return out
        out = np.empty(tuple(b - a for a, b in box), entry.dtype)
        for shard in entry.shards:
            inter = [(max(a, c), min(b, d)) for (a, b), (c, d) in zip(shard.index, box)]
            if any(lo >= hi for lo, hi in inter):
                continue
            src = np.empty(shard.shape, entry.dtype)
            self.read_shard_into(key, shard, src, verify)
            src_sl = tuple(slice(lo - a, hi - a) for (lo, hi), (a, _) in zip(inter, shard.index))
            dst_sl = tuple(slice(lo - c, hi - c) for (lo, hi), (c, _) in zip(inter, box))
            out[dst_sl] = src[src_sl]
        return out


def delete_checkpoint(storage: Storage, path: str) -> None:
    """Delete a checkpoint, its commit marker first: a half-deleted step never looks complete."""
    marker = storage.join(path, METADATA_FILE)
    if storage.exists(marker):
        storage.delete_file(marker)
    storage.delete_tree(path)


def stray_files(storage: Storage, path: str) -> list[str]:
    """Files in the committed step at ``path`` that its commit does not name, as paths: left
    by a save of the same step that died, or lost a race, before this one committed. Only
    buckets have them (a local save renames its own directory into place)."""
    with CheckpointReader(storage, path) as reader:
        meta = reader.metadata
        own = {METADATA_FILE, meta.manifest_path}
        own |= {f"{ITEMS_DIR}/{name}" for name in reader.manifest.files}
        own |= {meta.extra_path(name) for name in meta.extra_files}
    strays: list[str] = []
    dirs = [""]
    while dirs:
        rel = dirs.pop()
        for name in storage.list_dir(storage.join(path, rel) if rel else path):
            child = f"{rel}/{name}" if rel else name
            if child in own:
                continue
            if storage.is_dir(storage.join(path, child)):
                dirs.append(child)
            else:
                strays.append(storage.join(path, child))
    return sorted(strays)
