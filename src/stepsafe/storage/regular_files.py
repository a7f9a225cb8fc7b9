"""Reading a checkpoint's files as untrusted input: regular files only, with size limits.

A checkpoint directory may have been touched by anyone: a symbolic link would make its bytes
come from anywhere (``/dev/zero``, a file outside the checkpoint), a FIFO or a device would
block forever or never end. Every local read of a checkpoint's file goes through here.
"""

from __future__ import annotations

import errno
import os
import stat

from stepsafe.errors import CorruptCheckpointError

_MAX_READ = 1 << 30  # Linux reads at most ~2 GiB per call; stay well under


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISLNK, "symbolic link"),
        (stat.S_ISFIFO, "FIFO"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISDIR, "directory"),
    ):
        if test(mode):
            return name
    return "special file"


def open_regular(path: str) -> tuple[int, os.stat_result]:
    """Open ``path`` for reading if, and only if, it is a regular file: never through a
    symbolic link (a checkpoint's files would then be bytes from anywhere: ``/dev/zero``, a
    file outside the checkpoint), never a FIFO or a device (reading one blocks forever or
    never ends). ``lstat`` first, so that nothing else is ever opened (opening some devices
    has effects), then ``O_NOFOLLOW | O_NONBLOCK`` and ``fstat`` on the fd, so that a file
    swapped in between is caught too. A directory raises IsADirectoryError, as ``open`` does.

    Raises:
        CorruptCheckpointError: ``path`` is a link, FIFO, device or socket.
        OSError: it cannot be opened (FileNotFoundError when it does not exist).
    """
    before = os.lstat(path)
    if stat.S_ISDIR(before.st_mode):
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
    if not stat.S_ISREG(before.st_mode):
        raise _not_regular(path, before.st_mode)
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) != (before.st_dev, before.st_ino):
        os.close(fd)
        raise _not_regular(path, st.st_mode)
    return fd, st


def _not_regular(path: str, mode: int) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"{path} is a {_kind(mode)}, not a regular file: stepsafe writes only regular files and "
        "reads nothing else (never through a link); something else put it there: remove it, or "
        "use another step"
    )


def read_whole(path: str, limit: int | None = None) -> bytes:
    """The bytes of the regular file ``path`` (see ``open_regular``); refused before reading
    when ``fstat`` says it holds more than ``limit`` bytes, and never more than ``limit + 1``
    bytes read should it grow meanwhile."""
    fd, st = open_regular(path)
    try:
        if limit is not None and st.st_size > limit:
            raise _too_big(path, st.st_size, limit)
        cap = None if limit is None else limit + 1
        parts: list[bytes] = []
        got = 0
        want = st.st_size + 1  # a regular file: one read, then one that returns b""
        while cap is None or got < cap:
            n = max(want - got, 1 << 16)
            part = os.read(fd, min(n, _MAX_READ) if cap is None else min(n, cap - got))
            if not part:
                break
            parts.append(part)
            got += len(part)
        if limit is not None and got > limit:
            raise _too_big(path, got, limit)
        return b"".join(parts)
    finally:
        os.close(fd)


def _too_big(path: str, size: int, limit: int) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"{path} holds {size} bytes, more than the {limit} bytes stepsafe ever writes to such "
        "a file: it is damaged or was not written by stepsafe; it was not read"
    )
