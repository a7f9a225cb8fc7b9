"""Where a run saves: the local disk, or a bucket on a loopback S3 (moto) or GCS
(fake-gcs-server) server. The storage is the harness's one parameter that changes what a case
touches; everything else (the case runner, the methods, the report) takes it as an argument.

- ``disk``: checkpoints under ``out/scratch/``; ``sync`` flushes what an earlier case left
  dirty, the page cache is emptied before a cold restore (``fsutil``), and each checkpoint is
  deleted after its group.
- ``s3``, ``gcs``: a *fresh* server (a child process, tests/servers.py) for each group of
  cases, stopped after it: no case sees another's objects, and what a server held for one case
  is released before the next. The children find it through the environment
  (``servers.endpoint_env``); no client can reach a real cloud (``isolate``).

The servers are the test suite's own: tests/ is not a package, so its directory goes on
``sys.path`` here, as stress/backends.py does, and ``servers`` is the same module the tests use.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from benchmarks import fsutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import servers  # tests/ is not a package: on sys.path above

STORAGES = ("disk", "s3", "gcs")
BUCKETS = ("s3", "gcs")
BUCKET = servers.BUCKET
NAMES = {"disk": "local disk", "s3": "S3 (moto_server)", "gcs": "GCS (fake-gcs-server)"}


def scheme(storage: str) -> str:
    return {"s3": "s3", "gcs": "gs"}[storage]


def isolate() -> None:
    """Dummy credentials and dead metadata endpoints for this process and its children."""
    servers.isolate_cloud_environment()


@dataclass
class Session:
    """One group's storage: the children's environment (None: this process's) and the server
    serving it (None on disk)."""

    storage: str
    env: dict[str, str] | None = None
    server: servers.Server | None = None


@contextlib.contextmanager
def session(storage: str, log_dir: Path) -> Iterator[Session]:
    """The storage for one group of cases: on a bucket, a fresh server for the block."""
    if storage == "disk":
        yield Session(storage)
        return
    with servers.running(storage, log_dir / f"server-{storage}.log") as srv:
        yield Session(storage, {**os.environ, **servers.endpoint_env(storage, srv.url)}, srv)


def clear(storage: str, location: str) -> None:
    """Before and after a group on disk: no checkpoint left at ``location``, nothing dirty in
    the page cache. Nothing to do on a bucket: its server is fresh for each group."""
    if storage == "disk" and location != "-":
        fsutil.remove(location)
        os.sync()


def before(how: str | None, location: str, cold_method: str) -> None:
    """Empty (``evict``) or fill (``warm``) the page cache of ``location`` before a case."""
    if how == "evict":
        fsutil.evict(location, cold_method)
    elif how == "warm":
        fsutil.warm(location)
