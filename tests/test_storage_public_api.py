"""Buckets through their clients' public APIs only: nothing in stepsafe reaches for a private
attribute of an fsspec / s3fs / gcsfs object (a client upgrade would break it silently), and a
conditional create is told apart from other failures by the clients' typed errors and error
codes, not by words in a message. Checked against the loopback servers, and against a small
loopback server that answers S3 requests with chosen refusals."""

from __future__ import annotations

import ast
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import BUCKET_KINDS

from stepsafe.storage import storage_for
from stepsafe.storage.dispatch import remote_storage

SRC = Path(__file__).resolve().parents[1] / "src" / "stepsafe"
CLIENTS = ("fsspec", "s3fs", "gcsfs", "aiobotocore", "botocore", "google")
PRIVATE_NAMES = {"_call_s3", "call_s3", "_location", "_strip_protocol"}


def private_uses(source: str) -> list[str]:
    """What in ``source`` uses a client's private surface: an underscore attribute of a
    filesystem (``fs._x``, ``self.fs._x``), a name known to be private or undocumented, a
    private module or name imported from a client library, or an error told apart by an HTTP
    status written in a string."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute):
            owner = node.value
            named_fs = (isinstance(owner, ast.Name) and owner.id == "fs") or (
                isinstance(owner, ast.Attribute) and owner.attr == "fs"
            )
            private = node.attr.startswith("_") and not node.attr.startswith("__")
            if (named_fs and private) or node.attr in PRIVATE_NAMES:
                found.append(f"line {node.lineno}: .{node.attr}")
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.split(".")[0] in CLIENTS and (
                any(part.startswith("_") for part in node.module.split("."))
                or any(a.name.startswith("_") for a in node.names)
            ):
                found.append(f"line {node.lineno}: from {node.module} import ...")
        elif isinstance(node, ast.Constant) and node.value in ("412", "409"):
            found.append(f"line {node.lineno}: status {node.value!r} matched as text")
    return found


def test_the_check_catches_what_stepsafe_used_to_do():
    """The static check below can fail: each way stepsafe once used a private API is caught."""
    before = [
        'fs._call_s3("upload_part", Bucket=b)',
        'self.fs.call_s3("put_object", Bucket=b, Key=k)',
        'url = f"{self.fs._location}/upload/storage/v1/b/{{}}/o"',
        'base = self.fs._strip_protocol(path).rstrip("/")',
        'any(s in text for s in ("412", "409"))',
        "from s3fs.core import _error_wrapper",
    ]
    for line in before:
        assert private_uses(line), line
    assert not private_uses('self.fs.pipe_file(path, data, mode="create")')


def test_no_module_uses_a_clients_private_api():
    found = {
        str(p.relative_to(SRC)): uses
        for p in sorted(SRC.rglob("*.py"))
        if (uses := private_uses(p.read_text()))
    }
    assert not found, found


@pytest.mark.parametrize("bucket_url", BUCKET_KINDS, indirect=True)
def test_a_second_conditional_create_is_file_exists_and_keeps_the_first(bucket_url):
    storage, _ = storage_for(bucket_url)
    path = storage.join(bucket_url, "marker")
    storage.create_exclusive(path, b"first")
    with pytest.raises(FileExistsError):
        storage.create_exclusive(path, b"second")
    assert storage.read_bytes(path) == b"first"


@pytest.mark.parametrize("bucket_url", BUCKET_KINDS, indirect=True)
def test_listing_names_children_not_the_directory_itself(bucket_url):
    """Listings compare fsspec's entries with our own path (no client's private helper): a
    child named like its directory is listed, the directory itself never is, and a file lists
    nothing."""
    storage, _ = storage_for(bucket_url)
    d = storage.join(bucket_url, "a")
    for name in ("a", "b"):
        storage.put_whole(storage.join(d, name), b"x")
    assert storage.list_dir(d) == ["a", "b"]
    assert storage.list_dir(d + "/") == ["a", "b"]
    assert storage.list_dir(bucket_url) == ["a"]
    assert storage.list_dir(storage.join(d, "b")) == []


class Refusing(BaseHTTPRequestHandler):
    """Answers every request with the status and S3 error code the server was given."""

    protocol_version = "HTTP/1.1"  # botocore asks "Expect: 100-continue" before a body

    def do_PUT(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        status, code = self.server.refusal  # type: ignore[attr-defined]
        body = f"<Error><Code>{code}</Code><Message>refused</Message></Error>".encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def refusing_s3(monkeypatch) -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Refusing)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("STEPSAFE_S3_ENDPOINT_URL", f"http://127.0.0.1:{server.server_port}")
    yield server
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(
    ("status", "code", "exists"),
    [
        (412, "PreconditionFailed", True),  # without the Condition element AWS adds
        (409, "ConditionalRequestConflict", True),  # a racing conditional write
        (403, "AccessDenied", False),
        (409, "BucketNotEmpty", False),  # a 409 that says nothing of this object
    ],
)
def test_s3_refusals_of_a_conditional_create_are_told_apart_by_error_code(
    refusing_s3, status, code, exists
):
    """Only the refusals that mean "another object is there (or is being written)" are
    FileExistsError, which the transaction settles by reading whose marker is there; any
    other is the OSError s3fs makes of it."""
    refusing_s3.refusal = (status, code)  # type: ignore[attr-defined]
    storage = remote_storage("s3")
    with pytest.raises(OSError) as info:
        storage.create_exclusive("s3://bucket/step/_CHECKPOINT_METADATA", b"marker")
    assert isinstance(info.value, FileExistsError) == exists, repr(info.value)
    if status == 403:
        assert isinstance(info.value, PermissionError)


def test_every_stepsafe_variable_has_one_home():
    """Tunables are documented in knobs.py (``STEPSAFE_<knob>``); a backend's connection
    settings in its own module's docstring. No variable is named in two modules."""
    import re

    from stepsafe import knobs

    homes: dict[str, set[str]] = {}
    for p in SRC.rglob("*.py"):
        for name in re.findall(r"STEPSAFE_[A-Z0-9_]*[A-Z0-9]", p.read_text()):
            homes.setdefault(name, set()).add(str(p.relative_to(SRC)))
    knob_names = re.findall(r'_(?:int|seconds)\("(\w+)"', (SRC / "knobs.py").read_text())
    assert "STEPSAFE_S3_ENDPOINT_URL" in homes and "STEPSAFE_GCS_TOKEN" in homes
    for name, files in homes.items():
        assert len(files) == 1, (name, files)
    for name in knob_names:
        assert homes.get(knobs.PREFIX + name, {"knobs.py"}) == {"knobs.py"}, name
