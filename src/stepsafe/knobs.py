"""Every tunable of stepsafe, in one place: its default, its unit, its environment override.

A knob changes how fast stepsafe goes or how much memory it holds, never what it writes: a
checkpoint saved under any setting reads back the same under any other. The format's own
limits (``format.manifest.MAX_CHUNK``, the size limits in ``format.layout``) are rules of the
format, not knobs, and live with it.

Each knob is read once, when stepsafe is imported, from ``STEPSAFE_<NAME>`` if that is set
(an integer, or for ``_S`` knobs a number of seconds), else its default. Code reads it as
``knobs.NAME`` at the moment of use, so a test or a benchmark may assign a new value to the
module attribute. A value that does not parse, or is out of range, is refused at import with
the variable's name.

The bytes that may be in flight to and from buckets at once (MaxText's
``checkpoint_storage_concurrent_gb``) is not a knob: it is a ``CheckpointManager`` option and
a storage option (``storage.budget``), passed to what uses it.
"""

from __future__ import annotations

import os

from stepsafe.errors import ConfigError

PREFIX = "STEPSAFE_"


def _int(name: str, default: int, minimum: int = 1) -> int:
    raw = os.environ.get(PREFIX + name)
    if raw is None:
        return default
    try:
        value = int(raw.strip(), 0)
    except ValueError:
        raise ConfigError(f"{PREFIX}{name}={raw!r} is not an integer; unset it or fix it") from None
    if value < minimum:
        raise ConfigError(f"{PREFIX}{name}={value} is below its minimum {minimum}")
    return value


def _seconds(name: str, default: float) -> float:
    raw = os.environ.get(PREFIX + name)
    if raw is None:
        return default
    try:
        value = float(raw.strip())
    except ValueError:
        raise ConfigError(f"{PREFIX}{name}={raw!r} is not a number of seconds") from None
    if not value > 0:
        raise ConfigError(f"{PREFIX}{name}={value} must be a positive number of seconds")
    return value


# -- threads and windows (every storage) ------------------------------------------------------
IO_THREADS = _int("IO_THREADS", 8)
"""Threads (count) of the process-wide I/O pool that writes and reads data files."""

PARALLEL_BYTES = _int("PARALLEL_BYTES", 32 << 20)
"""Bytes: batches of ranged reads smaller than this run on the calling thread (threads cost
more than they save)."""

PARALLEL_COPY_BYTES = _int("PARALLEL_COPY_BYTES", 32 << 20)
"""Bytes: a save's host snapshot copies leaves on the I/O threads once they add up to this."""

WINDOW_BYTES = _int("WINDOW_BYTES", 256 << 20)
"""Bytes: restore and verify read in windows of about this size, each one batch of ranged
reads; it bounds the host memory of device arrays' staging on restore."""

GATHER_BYTES = _int("GATHER_BYTES", 1 << 20)
"""Bytes: pieces of a data file smaller than this are copied together into one write."""

DIFF_BLOCK_ELEMENTS = _int("DIFF_BLOCK_ELEMENTS", 1 << 20)
"""Elements: ``diff --values`` compares arrays in blocks of this many (8 MiB of float64)."""

# -- local disk ---------------------------------------------------------------------------------
SYNC_NOW_BYTES = _int("SYNC_NOW_BYTES", 1 << 20)
"""Bytes: a data file at least this big is fsynced as soon as it is written, so the disk
works while other threads still write; smaller ones are fsynced together at commit."""

WRITEBACK_KICK_BYTES = _int("WRITEBACK_KICK_BYTES", 8 << 20)
"""Bytes: writeback of a file being written is started after every this many bytes
(``sync_file_range``), so that the final fsync finds little left to do."""

# -- buckets ----------------------------------------------------------------------------------
BUCKET_FILE_SIZE = _int("BUCKET_FILE_SIZE", 128 << 20)
"""Bytes: the default size at which data files are split on buckets, so that each goes up in
one request (on local disk the default is MaxText's 2 GiB)."""

SINGLE_UPLOAD_MAX = _int("SINGLE_UPLOAD_MAX", 256 << 20)
"""Bytes: a file up to this size goes up in one request; bigger ones in parts."""

PART_SIZE = _int("PART_SIZE", 64 << 20, minimum=8 << 20)
"""Bytes: parts of a multipart (S3) or resumable (GCS) upload; S3 needs at least 5 MiB, GCS
multiples of 256 KiB (sizes are rounded down to one)."""

READ_SPAN = _int("READ_SPAN", 64 << 20)
"""Bytes: neighbouring ranged reads are merged into requests of up to this size."""

READ_GAP = _int("READ_GAP", 1 << 20, minimum=0)
"""Bytes: ranged reads closer than this share one request (the gap is read and dropped)."""

S3_PARTS_IN_FLIGHT = _int("S3_PARTS_IN_FLIGHT", 16)
"""Count: multipart upload parts in flight per process (16 x ``PART_SIZE`` = 1 GiB)."""

S3_PARTS_PER_FILE = _int("S3_PARTS_PER_FILE", 8)
"""Count: one file's parts in flight at once; files are written concurrently too."""

S3_MAX_ATTEMPTS = _int("S3_MAX_ATTEMPTS", 10)
"""Count: attempts per S3 request (botocore's "standard" retries, backoff with jitter)."""

S3_READ_TIMEOUT_S = _seconds("S3_READ_TIMEOUT", 120.0)
"""Seconds: how long an S3 request waits for a reply before it is retried (variable
``STEPSAFE_S3_READ_TIMEOUT``)."""

CONCURRENT_BYTES = _int("CONCURRENT_BYTES", 96 * 10**9)
"""Bytes: the default bytes-in-flight budget of a storage made without one (MaxText's
``checkpoint_storage_concurrent_gb`` default, 96 GB, as in Orbax)."""

# -- the run lease ------------------------------------------------------------------------------
LEASE_RENEW_S = _seconds("LEASE_RENEW_S", 10.0)
"""Seconds between renewals of a live manager's run lease."""

LEASE_TIMEOUT_S = _seconds("LEASE_TIMEOUT_S", 60.0)
"""Seconds: a lease not renewed for this long is stale, and another manager may take it."""
