"""Where trials save: local disk, or a bucket on a loopback S3 (moto) / GCS (fake-gcs-server).

The servers and the cloud isolation are the test suite's own (tests/servers.py): dummy
credentials, dead metadata endpoints, explicit 127.0.0.1 endpoints, so that neither the harness
nor its children can ever reach a real cloud. Servers start on first use, once per harness run.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import servers  # tests/ is not a package: on sys.path above

servers.isolate_cloud_environment()  # before any cloud client is imported, here or in a child

KINDS = ("local", "s3", "gcs")
ENDPOINT_VARS = {"s3": "STEPSAFE_S3_ENDPOINT_URL", "gcs": "STEPSAFE_GCS_ENDPOINT_URL"}
_servers: dict[str, Any] = {}
_scratch: list[Path] = []


def scratch() -> Path:
    """The harness's local working directory (under the system temp directory), made on first
    use."""
    if not _scratch:
        _scratch.append(Path(tempfile.mkdtemp(prefix="stepsafe-stress-")))
    return _scratch[0]


def server(kind: str) -> Any:
    """The loopback server for ``s3`` or ``gcs``, started on first use; stepsafe (here and in
    children) is pointed at it through its endpoint variable."""
    if kind not in _servers:
        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's per-request log lines
        _servers[kind] = servers.S3Server() if kind == "s3" else servers.GCSServer()
    os.environ[ENDPOINT_VARS[kind]] = _servers[kind].url
    return _servers[kind]


def fresh_url(kind: str, name: str) -> str:
    """A new, empty place to save: a local directory path or a bucket prefix."""
    tag = f"{name}-{uuid.uuid4().hex[:8]}"
    if kind == "local":
        return str(scratch() / tag)
    server(kind)
    scheme = "s3" if kind == "s3" else "gs"
    return f"{scheme}://{servers.BUCKET}/{tag}"


def remove_scratch() -> None:
    if _scratch:
        shutil.rmtree(_scratch.pop(), ignore_errors=True)


def stop_all() -> None:
    for s in _servers.values():
        s.stop()
    _servers.clear()
