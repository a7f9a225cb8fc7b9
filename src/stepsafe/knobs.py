"""Every tunable of stepsafe, in one place: its default, its unit, its environment override.

A knob changes how fast stepsafe goes or how much memory it holds, never what it writes: a
checkpoint saved under any setting reads back the same under any other. The format's own
limits (``format.manifest.MAX_CHUNK``, the size limits in ``format.layout``) are rules of the
format, not knobs, and live with it.

Code reads a knob as ``knobs.NAME`` at the moment of use. Its value is ``STEPSAFE_<NAME>``
from the environment when that is set (read at each use, so a variable set after import
counts, as it always did for the S3 client's settings), else its default; a test or a benchmark
may also assign ``knobs.NAME = value``, which wins until it is deleted. A value that does not
parse or is out of range is a ``ConfigError`` naming the variable, raised where that knob is
used, never at import (a bad S3 setting must not stop a local save).

The bytes that may be in flight to and from buckets at once (MaxText's
``checkpoint_storage_concurrent_gb``) is a ``CheckpointManager`` option and a storage option
(``storage.budget``), passed to what uses it; ``CONCURRENT_BYTES`` is only its default.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from stepsafe.errors import ConfigError

PREFIX = "STEPSAFE_"


@dataclass(frozen=True)
class Knob:
    name: str
    default: int | float
    unit: str  # "bytes", "count", "elements" or "seconds"
    doc: str
    minimum: int | float = 1
    env: str = ""  # the variable's name, when it is not PREFIX + name

    @property
    def variable(self) -> str:
        return self.env or PREFIX + self.name

    def parse(self, raw: str) -> int | float:
        """The value ``raw`` (the variable's text) stands for.

        Raises:
            ConfigError: not a number (an integer unless the unit is seconds), or below the
                knob's minimum.
        """
        seconds = self.unit == "seconds"
        try:
            number = float(raw.strip()) if seconds else int(raw.strip())
        except ValueError:
            kind = "a number of seconds" if seconds else "an integer"
            raise ConfigError(f"{self.variable}={raw!r} is not {kind}: fix or unset it") from None
        if seconds and not number > 0:
            raise ConfigError(f"{self.variable}={number} must be a positive number of seconds")
        if number < self.minimum:
            raise ConfigError(f"{self.variable}={number} is below its minimum {self.minimum}")
        return number


KNOBS = {
    k.name: k
    for k in (
        # -- threads and windows (every storage) --
        Knob("IO_THREADS", 8, "count", "Threads of the process-wide I/O pool that writes and "
             "reads data files (read when the pool is first made)."),
        Knob("PARALLEL_BYTES", 32 << 20, "bytes", "Batches of ranged reads smaller than this run "
             "on the calling thread (threads cost more than they save)."),
        Knob("PARALLEL_COPY_BYTES", 32 << 20, "bytes", "A save's host snapshot copies leaves on "
             "the I/O threads once they add up to this."),
        Knob("BULK_MAP_BYTES", 4 << 20, "bytes", "Host buffers at least this big (snapshot "
             "copies, restored arrays) are mapped with huge pages and populated in one call "
             "instead of faulting in page by page (storage.host_memory)."),
        Knob("WINDOW_BYTES", 256 << 20, "bytes", "Restore and verify read in windows of about "
             "this size, each one batch of ranged reads; it bounds the host memory of device "
             "arrays' staging on restore."),
        Knob("CHUNK_BYTES", 1 << 20, "bytes", "A save cuts every shard into chunks of at most "
             "this size, each with its own checksum (readers accept up to 64 MiB). A restore "
             "reads whole chunks, so this is how finely a process restoring part of a saved "
             "shard (another topology) reads only what it needs.", minimum=64),
        Knob("GATHER_BYTES", 1 << 20, "bytes", "Pieces of a data file smaller than this are "
             "copied together into one write."),
        Knob("DIFF_BLOCK_ELEMENTS", 1 << 20, "elements", "``diff --values`` compares arrays in "
             "blocks of this many (8 MiB of float64)."),
        Knob("CONVERT_BLOCK_BYTES", 1 << 30, "bytes", "A conversion makes an array bigger "
             "than this block by block (contiguous runs of its rows), where its source can "
             "read a region: peak memory is then about this, not the array's size (MaxText's "
             "stacked weights of a large model are hundreds of GB each). Smaller arrays are "
             "held whole: unstacking such an array along a middle axis block by block reads "
             "it once per layer.", minimum=64),
        Knob("CONVERT_BUCKET_FILE_BYTES", 32 << 20, "bytes", "A conversion to a bucket splits "
             "its data files at this size unless told otherwise: a bucket upload holds a whole "
             "file, twice, so smaller files keep a conversion's memory near its largest array "
             "(a save's default there is 128 MiB).", minimum=64),
        Knob("CONVERT_AHEAD_BYTES", 128 << 20, "bytes", "A conversion makes its output arrays "
             "on a thread of its own at most this far ahead of the writer, so that reading and "
             "slicing overlap writing (at most two blocks where CONVERT_BLOCK_BYTES is lower)."),
        Knob("CONVERT_BUCKET_AHEAD_BYTES", 32 << 20, "bytes", "The same, for a conversion into a "
             "bucket, whose uploads already hold a data file in memory."),
        Knob("ORBAX_CHUNK_BYTES", 64 << 20, "bytes", "An export to Orbax stores arrays bigger "
             "than this in chunks of contiguous rows, each read, written and dropped before the "
             "next: the export's peak memory is a few chunks, whatever the model's size.",
             minimum=64),
        Knob("ORBAX_PIECE_BYTES", 64 << 20, "bytes", "Reads of an Orbax array are cut into "
             "pieces of whole chunks of about this, each decoded straight into the result: "
             "tensorstore decodes a read's chunks all at once, so a whole read of an array of "
             "many chunks would hold it about twice (a 360 MiB array of 16 MiB chunks: ~200 MiB "
             "over the array at once, ~100 in 64 MiB pieces, as fast)."),
        Knob("ORBAX_CLEANUP_WAIT_S", 5.0, "seconds", "After a failed export to Orbax, how long "
             "its temporaries are retried for removal while Orbax's writer threads finish "
             "writing into them (what is left then is named in the error)."),
        # -- local disk --
        Knob("SYNC_NOW_BYTES", 1 << 20, "bytes", "A data file at least this big is fsynced as "
             "soon as it is written, so the disk works while other threads still write; "
             "smaller ones are fsynced together at commit."),
        Knob("DIRECT_WRITE_BUFFER_BYTES", 8 << 20, "bytes", "Data files on a local disk are "
             "written with O_DIRECT, around the page cache, through two reused aligned buffers "
             "of this size per thread that writes them, one written while the other fills "
             "(storage.direct_write; kept for the process's life: up to 2 x IO_THREADS of them, "
             "the second touched only by files bigger than one buffer). Restores read runs of "
             "at least this size that are not in the page cache with O_DIRECT, through one "
             "more such buffer per reading thread (storage.direct_read). 0: buffered writes and "
             "reads.",
             minimum=0),
        Knob("WRITEBACK_KICK_BYTES", 8 << 20, "bytes", "Writeback of a file being written is "
             "started after every this many bytes (``sync_file_range``), so that the final "
             "fsync finds little left to do."),
        # -- buckets --
        Knob("BUCKET_FILE_SIZE", 128 << 20, "bytes", "The default size at which data files are "
             "split on buckets, so that each goes up in one request (on local disk the "
             "default is MaxText's 2 GiB)."),
        Knob("SINGLE_UPLOAD_MAX", 256 << 20, "bytes", "A file up to this size goes up in one "
             "request; bigger ones in parts."),
        Knob("PART_SIZE", 64 << 20, "bytes", "Parts of a multipart (S3) or resumable (GCS) "
             "upload; S3 needs at least 5 MiB, GCS multiples of 256 KiB (sizes are rounded "
             "down to one).", minimum=8 << 20),
        Knob("READ_SPAN", 64 << 20, "bytes", "Neighbouring ranged reads are merged into "
             "requests of up to this size."),
        Knob("READ_GAP", 1 << 20, "bytes", "Ranged reads closer than this share one request "
             "(the gap is read and dropped).", minimum=0),
        Knob("S3_PARTS_IN_FLIGHT", 16, "count", "Multipart upload parts in flight per process "
             "(16 x ``PART_SIZE`` = 1 GiB)."),
        Knob("S3_PARTS_PER_FILE", 8, "count", "One file's parts in flight at once; files are "
             "written concurrently too."),
        Knob("S3_MAX_ATTEMPTS", 10, "count", "Attempts per S3 request (botocore's \"standard\" "
             "retries, backoff with jitter)."),
        Knob("S3_READ_TIMEOUT_S", 120.0, "seconds", "How long an S3 request waits for a reply "
             "before it is retried.", env=PREFIX + "S3_READ_TIMEOUT"),
        Knob("CONCURRENT_BYTES", 96 * 10**9, "bytes", "The default bytes-in-flight budget of a "
             "storage made without one (MaxText's ``checkpoint_storage_concurrent_gb`` "
             "default, 96 GB, as in Orbax)."),
        # -- many processes --
        Knob("COORDINATION_TIMEOUT_S", 300.0, "seconds", "How long a process waits for the "
             "others of its jax.distributed job at a barrier or an exchange before it gives up "
             "with a CoordinationError (Orbax's barrier timeout is 300 s too); keep it below "
             "jax.distributed's heartbeat timeout so that the error, not JAX, ends the wait."),
        Knob("REPLICA_SLICE_MIN_BYTES", 64 << 10, "bytes", "Under several processes a shard "
             "that r devices hold is split among them only if each of the r slices has at "
             "least this many bytes; smaller ones are written whole by one replica (measured: "
             "300 replicated 64-byte arrays split 4 ways made the manifest 2.3x bigger and "
             "save and restore ~50 ms slower). Set it alike on every process: a mismatch is "
             "refused at commit.", minimum=0),
        Knob("STOP_POLL_S", 0.2, "seconds", "Under several processes, how often a "
             "background thread looks for another process's request to stop (a signal or the "
             "time limit there): one key-value read each time, none per training step.",
             minimum=0.001),
        Knob("SINGLE_REPLICA_BROADCAST_BYTES", 1000 << 20, "bytes", "A single-replica restore "
             "broadcasts leaves in groups whose bytes per device add up to at most this "
             "(MaxText's 1000 MiB); a device holds about twice a group at the peak."),
        # -- the run lease --
        Knob("LEASE_RENEW_S", 10.0, "seconds", "Seconds between renewals of a live manager's "
             "run lease."),
        Knob("LEASE_TIMEOUT_S", 60.0, "seconds", "A lease not renewed for this long is stale, "
             "and another manager may take it."),
    )
}  # fmt: skip

_parsed: dict[str, tuple[str, int | float]] = {}  # name -> (the variable's text, its value)


def value(name: str) -> int | float:
    """The value of knob ``name`` now (an assigned ``knobs.NAME`` aside).

    Raises:
        ConfigError: its variable is set to something that does not parse or is out of range.
    """
    knob = KNOBS[name]
    raw = os.environ.get(knob.variable)
    if raw is None:
        return knob.default
    cached = _parsed.get(name)
    if cached is not None and cached[0] == raw:
        return cached[1]
    parsed = knob.parse(raw)
    _parsed[name] = (raw, parsed)
    return parsed


def __getattr__(name: str) -> Any:  # knobs.NAME, unless a test assigned one
    if name in KNOBS:
        return value(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *KNOBS])
