"""Read one committed checkpoint: its metadata, its manifest, and array bytes by range.

Arrays are read in two steps: plan which saved shards fill the wanted boxes (regions.py), then
hand every chunk of many arrays to the storage as one batch of ranged reads straight into the
destination arrays (a local disk: one ``preadv`` each; a bucket: neighbours merged into large
requests). Every chunk is checked against its checksum unless ``verify=False``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import numpy as np

from stepsafe.errors import ChecksumMismatchError, IncompleteCheckpointError, TruncatedDataError
from stepsafe.format.checksum import checksum
from stepsafe.format.layout import ITEMS_DIR, METADATA_FILE, CheckpointMetadata
from stepsafe.format.manifest import ArrayEntry, Chunk, Manifest
from stepsafe.format.regions import ArrayRead, Box, plan_array_read
from stepsafe.storage import RangeRead, Storage


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
        self._paths: dict[str, str] = {}

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Nothing stays open between reads; kept so that readers work as context managers."""

    def _file(self, name: str) -> str:
        path = self._paths.get(name)
        if path is None:
            path = self._paths[name] = self.storage.join(self.path, ITEMS_DIR, name)
        return path

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

    def plan(self, key: str, boxes: list[Box] | None = None) -> ArrayRead:
        """What reading ``boxes`` (default: the whole) of array ``key`` takes; nothing is read
        yet, and only the outputs' and staging buffers' address space is reserved."""
        entry: ArrayEntry = self.manifest.arrays[key]
        self.check_files(key)
        return plan_array_read(key, entry, boxes or [tuple((0, n) for n in entry.shape)])

    def read(
        self,
        plans: Sequence[ArrayRead],
        verify: bool = True,
        ready: Callable[[ArrayRead], None] | None = None,
    ) -> None:
        """Fill every planned array read: all their chunks go to the storage as one batch (a
        bucket merges neighbours into few large requests), each checked against its checksum
        as it lands. ``ready(plan)`` runs as soon as a plan's outputs are whole, on the thread
        that read its last chunk, and the batch then lets go of its buffers: the caller can
        use and free them while other arrays are still being read."""
        reads: list[RangeRead] = []
        owner: list[tuple[ArrayRead, Chunk]] = []
        mine: dict[int, list[int]] = {}  # id(plan) -> indices of its reads
        for plan in plans:
            mine[id(plan)] = []
            for shard, dest in plan.reads:
                view = memoryview(dest.reshape(-1).view(np.uint8))
                pos = 0
                for c in shard.chunks:
                    mine[id(plan)].append(len(reads))
                    part = view[pos : pos + c.length]
                    reads.append(RangeRead(self._file(c.file), c.offset, part))
                    owner.append((plan, c))
                    pos += c.length
        left = {k: len(v) for k, v in mine.items()}
        lock = threading.Lock()

        def whole(plan: ArrayRead) -> None:
            plan.finish()
            if ready is not None:
                ready(plan)

        def check(i: int) -> None:
            plan, c = owner[i]
            if verify and checksum(reads[i].buf) != c.checksum:
                raise ChecksumMismatchError(
                    f"checksum mismatch in array {plan.key!r}: file {reads[i].path}, offset "
                    f"{c.offset}, {c.length} bytes; the checkpoint is corrupt (restore an earlier "
                    "step, or pass verify=False to read it anyway)"
                )
            with lock:
                left[id(plan)] -= 1
                last = left[id(plan)] == 0
            if last:
                whole(plan)
                for j in mine.pop(id(plan)):  # read_ranges is done with them: free early
                    reads[j] = owner[j] = None  # type: ignore[call-overload]

        for plan in plans:
            if left[id(plan)] == 0:  # nothing to read: empty arrays
                whole(plan)
        self.storage.read_ranges(reads, check)

    def read_array(self, key: str, verify: bool = True) -> np.ndarray:
        """The whole global array ``key`` as a fresh host array."""
        plan = self.plan(key)
        self.read([plan], verify)
        return next(iter(plan.outs.values()))

    def read_box(self, key: str, box: Box, verify: bool = True) -> np.ndarray:
        """The region ``box`` of array ``key``, reading only the saved shards it overlaps."""
        plan = self.plan(key, [box])
        self.read([plan], verify)
        return plan.outs[box]


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
