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


ENDPOINT_VARS = {"s3": "STEPSAFE_S3_ENDPOINT_URL", "gs": "STEPSAFE_GCS_ENDPOINT_URL"}


@pytest.fixture
def proxied(request, bucket_url, monkeypatch):
    """Yields a function that starts a proxy (fault_proxy.py) in front of the bucket's server
    and points stepsafe at it; ``direct()`` (and the fixture's exit) talk to the server itself
    again, to check what was left."""
    from fault_proxy import FaultProxy

    scheme = bucket_url.split("://")[0]
    server = request.getfixturevalue("s3_server" if scheme == "s3" else "gcs_server")
    var = ENDPOINT_VARS[scheme]
    proxies: list[FaultProxy] = []

    def start(**kwargs) -> FaultProxy:
        proxy = FaultProxy(server.url, **kwargs)
        proxies.append(proxy)
        monkeypatch.setenv(var, proxy.url)
        return proxy

    start.direct = lambda: monkeypatch.setenv(var, server.url)  # type: ignore[attr-defined]
    yield start
    monkeypatch.setenv(var, server.url)
    for proxy in proxies:
        proxy.stop()


@pytest.fixture
def small_transfers():
    """A 24 MiB bytes-in-flight budget: files over 24 MiB go up in 12 MiB parts (S3 multipart,
    GCS resumable) and reads go in 12 MiB requests, so that tests exercise the protocols of big
    files without writing hundreds of MiB."""
    from stepsafe import knobs

    default = knobs.CONCURRENT_BYTES
    knobs.CONCURRENT_BYTES = 24 << 20  # the process default budget follows the knob
    yield
    knobs.CONCURRENT_BYTES = default


@pytest.fixture(scope="module")
def mesh():
    """A 2x2 mesh ("data", "model") of the 4 CPU devices set above (JAX imported only here)."""
    import jax
    import numpy as np
    from jax.sharding import Mesh

    devices = jax.devices()
    assert len(devices) == 4, "XLA_FLAGS above sets 4 CPU devices"
    return Mesh(np.array(devices).reshape(2, 2), ("data", "model"))
