"""File-system helpers: make a checkpoint durable, measure it on disk, evict it from the cache.

Peers that do not fsync (safetensors, torch.save) are made durable with ``fsync_tree`` inside
the timed region; cold reads need the page cache emptied, by ``drop_caches`` when root may,
else by ``posix_fadvise(DONTNEED)`` on every file of the checkpoint.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def fsync_path(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: str | Path) -> None:
    """fsync every file and directory under ``path`` (or the file itself), then its parent."""
    path = Path(path)
    if path.is_dir():
        for root, _dirs, files in os.walk(path, topdown=False):
            for name in files:
                fsync_path(os.path.join(root, name))
            fsync_path(root)
    else:
        fsync_path(path)
    fsync_path(path.parent)


def files_under(path: str | Path) -> list[Path]:
    path = Path(path)
    if path.is_file():
        return [path]
    return [p for p in path.rglob("*") if p.is_file()]


def disk_usage(path: str | Path) -> tuple[int, int]:
    """(bytes allocated on disk, file count) of a checkpoint."""
    files = files_under(path)
    return sum(p.stat().st_blocks * 512 for p in files), len(files)


def _drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def _fadvise(path: str | Path) -> None:
    os.sync()
    for p in files_under(path):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def cold_method() -> str:
    """``drop_caches`` if this process may write it, else ``fadvise``."""
    try:
        _drop_caches()
        return "drop_caches"
    except OSError:
        return "fadvise"


def evict(path: str | Path, method: str) -> None:
    """Empty the page cache of ``path``'s files, with the method ``cold_method`` chose."""
    if method == "drop_caches":
        _drop_caches()
    else:
        _fadvise(path)


def warm(path: str | Path) -> None:
    """Read every file once so that the next restore finds it all in the page cache."""
    buf = bytearray(16 << 20)
    for p in files_under(path):
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def remove(path: str | Path) -> None:
    path = Path(path)
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()
