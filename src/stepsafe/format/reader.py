"""Read one committed checkpoint: its record, its manifest, and array bytes by range.

Arrays are read in two steps: plan which saved shards fill the wanted boxes (regions.py), then
hand every chunk of many arrays to the storage as one batch of ranged reads straight into the
destination arrays (a local disk: one ``preadv`` each; a bucket: neighbours merged into large
requests). Every chunk is checked against its checksum unless ``verify=False``.
``check_chunks`` reads chunks only to check them, and reports each problem instead of raising:
``check.py`` verifies a whole checkpoint with it, window by window.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import numpy as np

from stepsafe.errors import (
    ChecksumMismatchError,
    CorruptCheckpointError,
    ManifestError,
    TruncatedDataError,
)
from stepsafe.format.checksum import checksum
from stepsafe.format.layout import (
    COMMIT_FILE,
    ITEMS_DIR,
    part_file_name,
)
from stepsafe.format.manifest import MANIFEST_MAX_BYTES, ArrayEntry, Chunk, Manifest
from stepsafe.format.regions import ArrayRead, Box, plan_array_read
from stepsafe.format.step_files import read_commit_record, read_step_file
from stepsafe.storage import RangeRead, Storage


class CheckpointReader:
    """An open, committed checkpoint. Construction reads only the two small JSON files."""

    def __init__(self, storage: Storage, path: str) -> None:
        self.storage = storage
        self.path = path
        self.record = read_commit_record(storage, path)
        manifest_path = storage.join(path, self.record.manifest_path)
        try:
            raw = read_step_file(storage, path, self.record.manifest_path, MANIFEST_MAX_BYTES)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as e:
            raise TruncatedDataError(
                f"{manifest_path} is missing: the checkpoint is damaged"
            ) from e
        if checksum(raw) != self.record.manifest_checksum:
            raise ChecksumMismatchError(
                f"{manifest_path} does not match the checksum in {COMMIT_FILE}: the manifest is "
                "corrupt; restore an earlier step"
            )
        self.manifest = Manifest.from_json(raw, manifest_path)
        if self.manifest.parts is not None:  # version 2: part files, read when needed
            self.manifest.parts.read = self._read_part
            for p, entry in enumerate(self.manifest.parts.parts):
                if entry is not None and entry[0] != part_file_name(p, self.record.save_id):
                    raise ManifestError(
                        f"manifest {manifest_path} lists part file {entry[0]!r} for process {p}, "
                        "not that process's part of this save: the checkpoint is corrupt"
                    )
        self._checked_files: set[str] = set()
        self._paths: dict[str, str] = {}

    def _read_part(self, name: str, limit: int) -> bytes:
        try:
            return read_step_file(self.storage, self.path, f"{ITEMS_DIR}/{name}", limit)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as e:
            raise TruncatedDataError(
                f"part file {self.file_path(name)} is missing: the checkpoint is damaged"
            ) from e

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Nothing stays open between reads; kept so that readers work as context managers."""

    def named_files(self) -> list[str]:
        """Every file the commit names, relative to the step, the record itself aside: the
        manifest, the data files, the part files (version 2) and the extra files."""
        parts = self.manifest.parts.parts if self.manifest.parts is not None else []
        return [
            self.record.manifest_path,
            *(f"{ITEMS_DIR}/{name}" for name in self.manifest.files),
            *(f"{ITEMS_DIR}/{entry[0]}" for entry in parts if entry is not None),
            *(self.record.extra_path(name) for name in self.record.extra_files),
        ]

    def file_path(self, name: str) -> str:
        """The path of data file ``name`` (a name the manifest lists)."""
        path = self._paths.get(name)
        if path is None:
            path = self._paths[name] = self.storage.join(self.path, ITEMS_DIR, name)
        return path

    def check_files(self) -> None:
        """Every data file and part file exists and has the size the manifest says: a cheap
        test (sizes only, no array bytes) that retention and ``gc`` use to tell an intact
        step from a truncated one. A read checks its own files the same way (``plan``), before
        anything is allocated, so a lying manifest cannot make us allocate terabytes."""
        self._check_named(list(self.manifest.files))
        for entry in self.manifest.parts.parts if self.manifest.parts is not None else []:
            if entry is None:
                continue
            path = self.file_path(entry[0])
            size = self._size(path, "part file")
            if size != entry[1]:
                has = "is missing" if size is None else f"has {size} bytes"
                raise TruncatedDataError(
                    f"part file {path} {has}, the manifest says {entry[1]}: the checkpoint is "
                    "damaged"
                )

    def check_files_of(self, keys: Sequence[str]) -> None:
        """The data files that arrays ``keys`` lie in exist and have the sizes the manifest
        says, checked at once before a batch allocates or reads anything (arrays on a grid:
        when planned, their cells being in part files).

        Raises:
            TruncatedDataError: naming the file and the arrays it lost.
        """
        arrays = self.manifest.arrays
        entries = [e for k in keys if (e := arrays.get(k)) is not None and e.grid is None]
        self._check_named(list({c.file for e in entries for s in e.shards for c in s.chunks}))

    def _size(self, path: str, what: str) -> int | None:
        """The size of ``path``, None when it is missing."""
        try:
            return self.storage.size(path)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise TruncatedDataError(f"{what} {path} cannot be read: {e}") from e

    def _check_named(self, names: Sequence[str]) -> None:
        for name in names:
            if name not in self._checked_files:
                self._check_file(name)
                self._checked_files.add(name)

    def _check_file(self, name: str) -> None:
        path = self.file_path(name)
        want = self.manifest.files[name]
        size = self._size(path, "data file")
        if size != want:
            lost = self._arrays_in(name, min(size or 0, want))
            has = "is missing" if size is None else f"has {size} bytes, the manifest says {want}"
            raise TruncatedDataError(
                f"data file {path} {has}: it was truncated or replaced; arrays with bytes "
                f"past {min(size or 0, want)}: "
                f"{', '.join(repr(k) for k in lost[:5])}{', ...' if len(lost) > 5 else ''}"
            )

    def _arrays_in(self, file: str, start: int) -> list[str]:
        """Arrays with a chunk in ``file`` past byte ``start``: what a truncation lost (only
        asked once something is wrong, so a scan of the manifest is fine)."""
        return [
            k
            for k, entry in self.manifest.arrays.items()
            if any(
                c.file == file and c.offset + c.length > start
                for s in entry.shards
                for c in s.chunks
            )
        ]

    def plan(self, key: str, boxes: list[Box] | None = None) -> ArrayRead:
        """What reading ``boxes`` (default: the whole) of array ``key`` takes; nothing is read
        yet, and only the outputs' and staging buffers' address space is reserved."""
        entry: ArrayEntry = self.manifest.arrays[key]
        boxes = boxes or [tuple((0, n) for n in entry.shape)]
        shards = entry.shards_over(boxes)  # a grid's: only the cells that overlap
        self._check_named([c.file for s in shards for c in s.chunks])
        return plan_array_read(key, entry, boxes, shards)

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
        if not plans:
            return
        reads: list[RangeRead] = []
        owner: list[tuple[ArrayRead, Chunk]] = []
        mine: dict[int, list[int]] = {}  # id(plan) -> indices of its reads
        for plan in plans:
            mine[id(plan)] = []
            for chunks, dest in plan.reads:
                view = memoryview(dest.reshape(-1).view(np.uint8))
                pos = 0
                for c in chunks:
                    mine[id(plan)].append(len(reads))
                    part = view[pos : pos + c.length]
                    reads.append(RangeRead(self.file_path(c.file), c.offset, part))
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
                raise _mismatch(plan.key, reads[i].path, c)
            if len(mine[id(plan)]) == 1:  # its only chunk (most small arrays): no count to keep
                last = True
            else:
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

    def check_chunks(self, chunks: Sequence[tuple[str, Chunk]]) -> list[Exception | None]:
        """Read ``chunks`` (each with its array's key) into scratch memory as one batch and
        check each against its checksum, raising for none of them: for each, None when it is
        intact, a ChecksumMismatchError when its bytes differ, or the error that kept it from
        being read. If the batch fails, the chunks are read one by one, so that each failure
        is pinned to its chunk and the others are still checked.

        Raises:
            Only what is not damage (an interrupt, a bug); damage is returned.
        """
        paths = [self.file_path(c.file) for _, c in chunks]
        buf = memoryview(bytearray(sum(c.length for _, c in chunks)))
        views, pos = [], 0
        for _, c in chunks:
            views.append(buf[pos : pos + c.length])
            pos += c.length
        found: list[Exception | None] = [None] * len(chunks)

        def check(i: int) -> None:
            key, c = chunks[i]
            if checksum(views[i]) != c.checksum:
                found[i] = _mismatch(key, paths[i], c)

        try:
            self.storage.read_ranges(
                [RangeRead(p, c.offset, v) for p, (_, c), v in zip(paths, chunks, views)], check
            )
        except (CorruptCheckpointError, OSError):
            found[:] = [None] * len(chunks)
            for i, (p, (_, c), v) in enumerate(zip(paths, chunks, views)):
                try:
                    self.storage.read_into(p, c.offset, v)
                except (CorruptCheckpointError, OSError) as e:
                    found[i] = e
                else:
                    check(i)
        return found

    def read_array(self, key: str, verify: bool = True) -> np.ndarray:
        """The whole global array ``key`` as a fresh host array."""
        return self.read_arrays([key], verify)[0]

    def read_arrays(self, keys: Sequence[str], verify: bool = True) -> list[np.ndarray]:
        """The whole global arrays ``keys``, each as a fresh host array, read as one batch.

        An array saved as one shard (every array a single process saved) is read straight into
        its output, without a plan: restoring a hundred small arrays costs per-array Python,
        not reads, and the plan machinery was most of it. Arrays of many shards or on a grid
        go through ``plan`` and ``read``. Every file is checked before anything is allocated,
        as ``plan`` does.
        """
        arrays = self.manifest.arrays
        entries = [arrays[k] for k in keys]
        single = [e.grid is None and len(e.shards) == 1 for e in entries]
        self.check_files_of(keys)
        plans = {i: self.plan(keys[i]) for i, one in enumerate(single) if not one}
        outs: list[np.ndarray | None] = []
        reads: list[RangeRead] = []
        owner: list[tuple[str, Chunk]] = []
        for key, entry, one in zip(keys, entries, single):
            if not one:
                outs.append(None)
                continue
            out = np.empty(entry.shape, entry.dtype)
            outs.append(out)
            view = memoryview(out.reshape(-1).view(np.uint8))
            pos = 0
            for c in entry.shards[0].chunks:
                reads.append(
                    RangeRead(self.file_path(c.file), c.offset, view[pos : pos + c.length])
                )
                owner.append((key, c))
                pos += c.length

        def check(i: int) -> None:
            key, c = owner[i]
            if checksum(reads[i].buf) != c.checksum:
                raise _mismatch(key, reads[i].path, c)

        if reads:
            self.storage.read_ranges(reads, check if verify else lambda i: None)
        self.read(list(plans.values()), verify)
        for i, plan in plans.items():
            outs[i] = next(iter(plan.outs.values()))
        return outs  # type: ignore[return-value]

    def read_box(self, key: str, box: Box, verify: bool = True) -> np.ndarray:
        """The region ``box`` of array ``key``, reading only the saved shards it overlaps."""
        plan = self.plan(key, [box])
        self.read([plan], verify)
        return plan.outs[box]


def _mismatch(key: str, path: str, c: Chunk) -> ChecksumMismatchError:
    return ChecksumMismatchError(
        f"checksum mismatch in array {key!r}: file {path}, offset {c.offset}, {c.length} bytes; "
        "the checkpoint is corrupt (restore an earlier step, or pass verify=False to read it "
        "anyway)"
    )
