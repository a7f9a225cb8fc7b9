"""Test-wide setup. JAX reads XLA_FLAGS once, at import: set 4 CPU devices before anything
imports it, and keep JAX on the CPU so it never probes for accelerators or cloud metadata."""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")


# -- buckets: loopback S3 / GCS servers (tests/servers.py), started only when a test asks ----
import uuid

import pytest
import servers

BUCKET_KINDS = ["memory", "s3", "gcs"]


@pytest.fixture(scope="session", autouse=True)
def _no_real_cloud() -> None:
    """No client in any test may find real credentials or a cloud metadata server."""
    servers.isolate_cloud_environment()


@pytest.fixture(scope="session")
def s3_server():
    server = servers.S3Server()
    os.environ["STEPSAFE_S3_ENDPOINT_URL"] = server.url
    yield server
    server.stop()


@pytest.fixture(scope="session")
def gcs_server():
    server = servers.GCSServer()
    os.environ["STEPSAFE_GCS_ENDPOINT_URL"] = server.url
    yield server
    server.stop()


@pytest.fixture
def bucket_url(request) -> str:
    """A fresh, empty prefix in a bucket of the kind the test is parametrised with
    (``@pytest.mark.parametrize("bucket_url", BUCKET_KINDS, indirect=True)``)."""
    kind = getattr(request, "param", "memory")
    if kind == "s3":
        request.getfixturevalue("s3_server")
        scheme = "s3"
    elif kind == "gcs":
        request.getfixturevalue("gcs_server")
        scheme = "gs"
    else:
        scheme = "memory"
    name = "".join(c if c.isalnum() else "-" for c in request.node.name)[:40]
    return f"{scheme}://{servers.BUCKET}/{name}-{uuid.uuid4().hex[:8]}"
