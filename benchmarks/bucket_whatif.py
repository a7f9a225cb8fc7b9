"""What-if for the bucket benchmark: stepsafe with the storage changes RESULTS-buckets.md
proposes, patched in at run time, so that a proposal comes with a number before anyone edits
``src/stepsafe/storage``.

- ``--upload single``: each data file goes up in ONE request (S3 ``PutObject``, GCS one-shot
  multipart upload) instead of 16 MiB multipart parts (S3) or sequential 16 MiB resumable
  pieces (GCS). Files are still written concurrently (stepsafe's I/O threads).
- ``--read coalesced``: the first read of a data file fetches the whole file in ``--pieces``
  large ranged GETs at once and serves every array of that file from it, instead of one
  (or more) GETs per array. It stages the file in memory, which a real implementation would
  not: it would scatter large ranges straight into the arrays.
- ``--file-size``: ``data_file_size_bytes`` of the save (a public argument), e.g. 128M.

Each run starts a fresh server, saves and restores m95 once in this process (timing, client
and server CPU), and checks the round trip. It patches private classes of stepsafe's storage
layer (``S3Storage.upload``, ``GCSStorage.upload``, ``RemoteStorage.open_read``) as they are at
the commit it runs against: an experiment, not part of the benchmark.

    .venv-bench/bin/python -m benchmarks.bucket_whatif s3 --upload single --read coalesced
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import bucket_servers, states
from benchmarks.bucket_case import cpu_seconds
from benchmarks.bucket_plan import file_size_bytes, scheme

MiB = 1 << 20


def single_request_uploads() -> None:
    """Every data file in one request (the whole file is joined in memory first)."""
    from stepsafe.storage.gcs import GCSStorage
    from stepsafe.storage.s3 import S3Storage

    def s3_upload(self: Any, path: str, chunks: Iterable[memoryview | bytes]) -> None:
        bucket, key, _ = self.fs.split_path(path)
        body = b"".join(bytes(c) for c in chunks)
        self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=body)

    def gcs_upload(self: Any, path: str, chunks: Iterable[memoryview | bytes]) -> None:
        body = b"".join(bytes(c) for c in chunks)
        self.fs.pipe_file(path, body, chunksize=len(body) + 1)

    S3Storage.upload = s3_upload
    GCSStorage.upload = gcs_upload


def coalesced_reads(pieces: int) -> None:
    """Each data file read once, in ``pieces`` concurrent ranged GETs, on its first use."""
    from stepsafe.storage import remote
    from stepsafe.storage.base import ReadHandle

    class WholeFile(ReadHandle):
        def __init__(self, storage: Any, path: str) -> None:
            self.storage, self.path = storage, path
            self.data: memoryview | None = None
            self.lock = threading.Lock()

        def _fetch(self) -> memoryview:
            n = self.storage.size(self.path)
            piece = max(16 * MiB, -(-n // pieces))
            starts = list(range(0, n, piece))
            ends = [min(s + piece, n) for s in starts]
            got = self.storage.fs.cat_ranges([self.path] * len(starts), starts, ends)
            return memoryview(b"".join(got))

        def read_into(self, offset: int, buf: memoryview) -> None:
            with self.lock:
                if self.data is None:
                    self.data = self._fetch()
            view = buf.cast("B") if buf.format != "B" or buf.ndim != 1 else buf
            view[:] = self.data[offset : offset + len(view)]

        def close(self) -> None:
            self.data = None

    remote.RemoteStorage.open_read = lambda self, path: WholeFile(self, path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("server", choices=bucket_servers.SERVERS)
    p.add_argument("--upload", choices=["stock", "single"], default="stock")
    p.add_argument("--read", choices=["stock", "coalesced"], default="stock")
    p.add_argument("--pieces", type=int, default=8, help="ranged GETs per file (coalesced)")
    p.add_argument("--file-size", default="", help="data_file_size_bytes, e.g. 128M")
    p.add_argument("--state", default="m95", choices=states.STATES)
    a = p.parse_args()
    bucket_servers.isolate_cloud_environment()
    log = Path(__file__).parent / "out" / f"whatif-{a.server}.log"
    log.parent.mkdir(exist_ok=True)
    with bucket_servers.running(a.server, log) as srv:
        os.environ.update(bucket_servers.endpoint_env(a.server, srv.url))
        import stepsafe
        from benchmarks.bucket_methods import warm_up
        from benchmarks.methods.stepsafe import target
        from stepsafe.storage.dispatch import remote_storage

        if a.upload == "single":
            single_request_uploads()
        if a.read == "coalesced":
            coalesced_reads(a.pieces)
        tree = states.build(a.state)
        url = f"{scheme(a.server)}://{bucket_servers.BUCKET}/whatif/{states.STEP}"
        warm_up(remote_storage(scheme(a.server)).fs, url)
        kwargs = {"data_file_size_bytes": file_size_bytes(a.file_size)} if a.file_size else {}
        n = states.nbytes(a.state)
        label = f"{a.server} upload={a.upload} read={a.read} files={a.file_size or 'default'}"
        restored: Any = None
        for op in ("save", "restore"):
            c0, s0, t0 = cpu_seconds(), srv.cpu_seconds(), time.perf_counter()
            if op == "save":
                stepsafe.save(url, tree, **kwargs)
            else:
                restored = stepsafe.restore(url, target(a.state))
            dt = time.perf_counter() - t0
            print(
                f"{label} {op:7s} {n / dt / 1e6:6.1f} MB/s {dt:6.1f} s  CPU client "
                f"{cpu_seconds() - c0:5.1f} s, server {srv.cpu_seconds() - s0:5.1f} s",
                flush=True,
            )
        for spec in states.specs(a.state):
            got, want = restored, tree
            for part in spec.key:
                got, want = got[part], want[part]
            if not np.array_equal(np.asarray(got), want):
                raise SystemExit(f"round trip differs at {'/'.join(spec.key)}")


if __name__ == "__main__":
    main()
