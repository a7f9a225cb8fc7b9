"""A bucket URL without credentials: one clear line within seconds, not a minute of retries and
a traceback. And the clients' standard chain still works: credential files first, then the
cloud's metadata service (here a loopback stand-in), which is asked once and briefly.

Every case runs in a subprocess with an environment built from nothing (no credentials, HOME
an empty folder, every metadata address a loopback port) and an audit hook that refuses, and
records, any connection or name lookup beyond loopback: nothing here can reach a real host.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import servers

STEPSAFE = str(Path(sys.executable).parent / "stepsafe")
TIMEOUT = 60  # generous: a wedged subprocess fails the test instead of hanging the suite

GUARD = textwrap.dedent(
    """
    import errno, ipaddress, os, sys

    def _loopback(host):
        if isinstance(host, bytes):
            host = host.decode()
        if host in (None, "localhost"):
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False

    def _hook(event, args):
        if event in ("socket.connect", "socket.sendto"):
            address = args[-1]
            host = address[0] if isinstance(address, tuple) else None
        elif event in ("socket.getaddrinfo", "socket.gethostbyname"):
            host = args[0]
        else:
            return
        if not _loopback(host):
            with open(os.environ["STEPSAFE_TEST_NET_LOG"], "a") as f:
                f.write(f"{event} {host}\\n")
            raise OSError(errno.ENETUNREACH, f"test guard: {host} is beyond loopback")

    sys.addaudithook(_hook)
    """
)


@pytest.fixture
def clean_env(tmp_path: Path) -> dict[str, str]:
    """An environment with no cloud credentials, metadata at a closed loopback port, HOME an
    empty folder, and the network guard loaded into every Python process started with it."""
    guard = tmp_path / "guard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(GUARD)
    home = tmp_path / "home"
    home.mkdir()
    return {
        "PATH": str(Path(sys.executable).parent),  # no gcloud: google-auth would run it
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "PYTHONPATH": str(guard),
        "STEPSAFE_TEST_NET_LOG": str(tmp_path / "beyond-loopback.log"),
        "JAX_PLATFORMS": "cpu",
        "GCE_METADATA_HOST": servers.CLOSED,
        "GCE_METADATA_IP": servers.CLOSED,
        "AWS_EC2_METADATA_SERVICE_ENDPOINT": f"http://{servers.CLOSED}",
        "NO_PROXY": "127.0.0.1,localhost",
    }


def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    out = subprocess.run(args, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    log = Path(env["STEPSAFE_TEST_NET_LOG"])
    assert not log.exists(), f"tried to reach beyond loopback: {log.read_text()}"
    return out


SAVE = """
import sys
import numpy as np
import stepsafe
from stepsafe.errors import CredentialsError
try:
    stepsafe.save(sys.argv[1], {"a": np.arange(3)})
except CredentialsError as e:
    print(e, file=sys.stderr)
    sys.exit(3)
print("saved", stepsafe.restore(sys.argv[1])["a"].tolist())
"""

WHAT_TO_SET = {
    "gs": ("GOOGLE_APPLICATION_CREDENTIALS", "gcloud auth application-default login"),
    "s3": ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "STEPSAFE_S3_ANON"),
}


def assert_one_clear_line(out: subprocess.CompletedProcess, url: str) -> None:
    assert out.returncode != 0
    assert "Traceback" not in out.stderr, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert f"cannot access {url}: no " in lines[0], lines[0]
    for name in WHAT_TO_SET[url.split("://")[0]]:
        assert name in lines[0], lines[0]


@pytest.mark.parametrize("scheme", ["gs", "s3"])
def test_ls_without_credentials_is_one_line_naming_what_to_set(clean_env, scheme):
    url = f"{scheme}://bucket/x"
    out = run(clean_env, STEPSAFE, "ls", url)
    assert_one_clear_line(out, url)
    assert out.stderr.startswith("stepsafe: error: ")


@pytest.mark.parametrize("scheme", ["gs", "s3"])
def test_save_without_credentials_raises_credentials_error(clean_env, scheme):
    url = f"{scheme}://bucket/x"
    out = run(clean_env, sys.executable, "-c", SAVE, url)
    assert out.returncode == 3, out.stderr  # a CredentialsError, not some other failure
    assert_one_clear_line(out, url)


@pytest.fixture
def silent_metadata(clean_env) -> Iterator[dict[str, str]]:
    """A metadata address that accepts connections and never answers (as on a network where
    169.254.169.254 goes nowhere): each client must give up on its own short timeout."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)  # never accepted: the kernel completes handshakes, nobody replies
        address = f"127.0.0.1:{sock.getsockname()[1]}"
        env = dict(clean_env, GCE_METADATA_HOST=address, GCE_METADATA_IP=address)
        env["AWS_EC2_METADATA_SERVICE_ENDPOINT"] = f"http://{address}"
        yield env


@pytest.mark.parametrize("scheme", ["gs", "s3"])
def test_a_metadata_server_that_never_answers_is_given_up_on_quickly(silent_metadata, scheme):
    url = f"{scheme}://bucket/x"
    out = run(silent_metadata, sys.executable, "-c", SAVE, url)
    assert out.returncode == 3, out.stderr
    assert_one_clear_line(out, url)


class FakeMetadata(BaseHTTPRequestHandler):
    """What a cloud VM's metadata service answers, on loopback: Google's (ping, project id,
    access token) and EC2's IMDSv2 (session token, role, role credentials)."""

    asked: list[str]

    def _reply(self, body: str, status: int = 200) -> None:
        self.server.asked.append(f"{self.command} {self.path}")  # type: ignore[attr-defined]
        data = body.encode()
        self.send_response(status)
        self.send_header("Metadata-Flavor", "Google")
        self.send_header("Content-Type", "application/json" if body[:1] == "{" else "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_PUT(self) -> None:
        self._reply("imds-session-token" if self.path == "/latest/api/token" else "", 200)

    def do_GET(self) -> None:
        role = "/latest/meta-data/iam/security-credentials/"
        answers = {
            "/": "computeMetadata/",
            "/computeMetadata/v1/project/project-id": "stepsafe-vm-project",
            role: "stepsafe-role",
            role + "stepsafe-role": json.dumps(
                {
                    "Code": "Success",
                    "Type": "AWS-HMAC",
                    "AccessKeyId": "ASIAFROMMETADATA",
                    "SecretAccessKey": "from-metadata",
                    "Token": "from-metadata-token",
                    "Expiration": "2099-01-01T00:00:00Z",
                }
            ),
        }
        if self.path in answers:
            self._reply(answers[self.path])
        else:
            self._reply("not here", 404)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def metadata(clean_env) -> Iterator[tuple[dict[str, str], list[str]]]:
    """A metadata service on loopback (the VM case); yields the environment pointing at it and
    the list of requests it got."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeMetadata)
    server.asked = []  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    address = f"127.0.0.1:{server.server_address[1]}"
    env = dict(clean_env, GCE_METADATA_HOST=address, GCE_METADATA_IP=address)
    env["AWS_EC2_METADATA_SERVICE_ENDPOINT"] = f"http://{address}"
    yield env, server.asked  # type: ignore[attr-defined]
    server.shutdown()
    server.server_close()


GCS_CLIENT = """
from stepsafe.storage import remote_storage
fs = remote_storage("gs").fs
print(type(fs.credentials.credentials).__module__, fs.project)
"""


def test_gs_on_a_cloud_vm_takes_the_metadata_servers_credentials(metadata):
    env, asked = metadata
    out = run(env, sys.executable, "-c", GCS_CLIENT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["google.auth.compute_engine.credentials", "stepsafe-vm-project"]
    assert "GET /" in asked


def test_s3_on_a_cloud_vm_saves_with_the_instance_roles_credentials(metadata, s3_server):
    env, asked = metadata
    env = dict(env, STEPSAFE_S3_ENDPOINT_URL=s3_server.url, AWS_DEFAULT_REGION="us-east-1")
    url = f"s3://{servers.BUCKET}/from-instance-role"
    out = run(env, sys.executable, "-c", SAVE, url)
    assert out.returncode == 0, out.stderr
    assert "saved [0, 1, 2]" in out.stdout
    assert "GET /latest/meta-data/iam/security-credentials/stepsafe-role" in asked


def test_gs_credential_files_come_before_the_metadata_server(metadata, tmp_path):
    """The file ``gcloud auth application-default login`` writes is used; the metadata server
    is not even asked. A key file named by GOOGLE_APPLICATION_CREDENTIALS that is not there is
    a clear error naming it."""
    env, asked = metadata
    gcloud = Path(env["HOME"]) / ".config" / "gcloud"
    gcloud.mkdir(parents=True)
    (gcloud / "application_default_credentials.json").write_text(
        json.dumps(
            {
                "type": "authorized_user",
                "client_id": "stepsafe-test.apps.googleusercontent.com",
                "client_secret": "stepsafe-test",
                "refresh_token": "stepsafe-test",
            }
        )
    )
    out = run(env, sys.executable, "-c", GCS_CLIENT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[0] == "google.oauth2.credentials"
    assert asked == []

    missing = tmp_path / "no-such-key.json"
    env = dict(env, GOOGLE_APPLICATION_CREDENTIALS=str(missing))
    out = run(env, STEPSAFE, "ls", "gs://bucket/x")
    assert out.returncode != 0
    assert "Traceback" not in out.stderr, out.stderr
    assert "cannot access gs://bucket/x: Google Cloud credentials unusable" in out.stderr
    assert str(missing) in out.stderr


def test_s3_profile_from_a_credentials_file(clean_env, tmp_path, s3_server):
    """AWS_PROFILE names a profile in a shared credentials file: the save goes through; a
    profile that is not there is one clear line."""
    creds = tmp_path / "aws-credentials"
    creds.write_text("[stepsafe]\naws_access_key_id = fromfile\naws_secret_access_key = x\n")
    env = dict(
        clean_env,
        AWS_SHARED_CREDENTIALS_FILE=str(creds),
        AWS_CONFIG_FILE=str(tmp_path / "no-aws-config"),
        AWS_PROFILE="stepsafe",
        AWS_DEFAULT_REGION="us-east-1",
        STEPSAFE_S3_ENDPOINT_URL=s3_server.url,
    )
    url = f"s3://{servers.BUCKET}/from-profile"
    out = run(env, sys.executable, "-c", SAVE, url)
    assert out.returncode == 0, out.stderr
    assert "saved [0, 1, 2]" in out.stdout

    out = run(dict(env, AWS_PROFILE="nobody"), STEPSAFE, "ls", url)
    assert out.returncode != 0
    assert "Traceback" not in out.stderr, out.stderr
    assert f"cannot access {url}: AWS credentials unusable" in out.stderr
    assert "nobody" in out.stderr
