"""S3 (and S3-compatible servers) through s3fs.

Configuration, from the environment, so the same code runs against AWS, MinIO or moto:

- endpoint: ``STEPSAFE_S3_ENDPOINT_URL``, else ``AWS_ENDPOINT_URL_S3``, else
  ``AWS_ENDPOINT_URL``, else AWS itself.
- credentials: botocore's usual chain (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` /
  ``AWS_SESSION_TOKEN``, ``AWS_PROFILE`` and the files in ``~/.aws``, web identity, SSO, the
  container's and then the EC2 instance's metadata service); ``STEPSAFE_S3_ANON=1`` for
  unsigned requests (a public bucket).
- region: ``AWS_REGION`` / ``AWS_DEFAULT_REGION``, else ``us-east-1`` when an endpoint is set.

No credentials is an error when the client is made (``CredentialsError``, naming what to set),
not a ``NoCredentialsError`` traceback at the first request: the chain is walked once up front.
Its last step asks the instance metadata service, as botocore always does: one attempt with a
1 s timeout (``AWS_METADATA_SERVICE_TIMEOUT`` / ``AWS_METADATA_SERVICE_NUM_ATTEMPTS``), at
``AWS_EC2_METADATA_SERVICE_ENDPOINT`` if set (tests point it at a closed loopback port). The
credentials themselves are left to s3fs to resolve and refresh (an instance role's expire).

Commit marker: ``PutObject`` with ``If-None-Match: *`` (AWS since 2024; moto enforces it); a
412 ``PreconditionFailed`` (or 409 ``ConditionalRequestConflict``) means another object is there.

Timeouts: 10 s to connect, ``STEPSAFE_S3_READ_TIMEOUT`` seconds (default 120) for a reply; a
request that times out is retried like a failed one.

Retries: botocore "standard" mode, ``STEPSAFE_S3_MAX_ATTEMPTS`` attempts (default 10) with
exponential backoff and jitter on 429/5xx/throttling and connection errors, per request (one
part of a multipart upload is one request, so a retry resends one part); s3fs adds its own
retries on dropped connections.

Uploads: a data file of up to ``SINGLE_UPLOAD_MAX`` goes up in one ``PutObject``; a bigger
one as a multipart upload whose parts (``PART_SIZE``) are sent concurrently, at most
``MAX_PARTS_IN_FLIGHT`` per process, within the process's budget (budget.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections import deque
from collections.abc import Iterable
from concurrent.futures import Future
from typing import Any

from stepsafe.errors import CredentialsError
from stepsafe.storage.budget import IN_FLIGHT
from stepsafe.storage.remote import RemoteStorage, gather_parts

MAX_PARTS_IN_FLIGHT = 16  # per process: bounds upload memory at 16 x PART_SIZE = 1 GiB
PARTS_PER_FILE = 8  # one file's parts in flight at once; files are written concurrently too
_in_flight = threading.BoundedSemaphore(MAX_PARTS_IN_FLIGHT)


def _new_slots_in_child() -> None:  # the parent's parts in flight never release theirs here
    global _in_flight
    _in_flight = threading.BoundedSemaphore(MAX_PARTS_IN_FLIGHT)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_slots_in_child)
NO_CREDENTIALS = (
    "no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE "
    "(a profile in ~/.aws/credentials or ~/.aws/config), or STEPSAFE_S3_ANON=1 for a public "
    "bucket (STEPSAFE_S3_ENDPOINT_URL for another server); no instance metadata service "
    "answered (not an EC2 instance)"
)


def s3_filesystem() -> Any:
    """An ``S3FileSystem`` configured from the environment (see the module docstring)."""
    import s3fs  # imported here: an optional extra

    endpoint = (
        os.environ.get("STEPSAFE_S3_ENDPOINT_URL")
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
    )
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    client_kwargs: dict[str, Any] = {}
    if endpoint:
        client_kwargs["endpoint_url"] = endpoint
        region = region or "us-east-1"
    if region:
        client_kwargs["region_name"] = region
    attempts = int(os.environ.get("STEPSAFE_S3_MAX_ATTEMPTS", "10"))
    anon = os.environ.get("STEPSAFE_S3_ANON", "") in ("1", "true")
    if not anon:
        check_credentials()
    return s3fs.S3FileSystem(
        anon=anon,
        client_kwargs=client_kwargs,
        config_kwargs={
            "retries": {"max_attempts": attempts, "mode": "standard"},
            "connect_timeout": 10,
            "read_timeout": float(os.environ.get("STEPSAFE_S3_READ_TIMEOUT", "120")),
            "max_pool_connections": 64,
        },
        use_listings_cache=False,  # other processes write: never trust a cached listing
        skip_instance_cache=True,
        max_concurrency=8,
    )


def check_credentials() -> None:
    """Walk botocore's credential chain once (see the module docstring), so that a missing
    credential is a clear error now rather than a traceback at the first request.

    Raises:
        CredentialsError: the chain found nothing, or a profile it was told to use is broken.
    """
    import botocore.exceptions
    import botocore.session

    try:
        found = botocore.session.Session().get_credentials()
    except botocore.exceptions.BotoCoreError as e:
        raise CredentialsError(
            f"AWS credentials unusable ({e}): fix AWS_PROFILE or the files in ~/.aws "
            "(AWS_CONFIG_FILE, AWS_SHARED_CREDENTIALS_FILE)"
        ) from None  # the reason is in the message; a chained OSError would read as a disk's
    if found is None:
        raise CredentialsError(NO_CREDENTIALS)


def _is_precondition_failure(e: BaseException) -> bool:
    text = f"{type(e).__name__} {e} {getattr(e, 'response', '')}"
    return any(
        s in text for s in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409")
    )


class S3Storage(RemoteStorage):
    scheme = "s3"

    def create_exclusive(self, path: str, data: bytes) -> None:
        bucket, key, _ = self.fs.split_path(path)
        try:
            self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
        except Exception as e:
            if _is_precondition_failure(e):
                raise FileExistsError(path) from e
            raise

    def unfinished_uploads(self, prefix: str) -> list[tuple[str, str]]:
        bucket, key, _ = self.fs.split_path(prefix)
        key = key.rstrip("/") + "/" if key else ""
        out: list[tuple[str, str]] = []
        marker: dict[str, str] = {}
        while True:
            page = self.fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=key, **marker)
            out += [(f"s3://{bucket}/{u['Key']}", u["UploadId"]) for u in page.get("Uploads", [])]
            if not page.get("IsTruncated"):
                return out
            marker = {
                "KeyMarker": page["NextKeyMarker"],
                "UploadIdMarker": page["NextUploadIdMarker"],
            }

    def abort_upload(self, path: str, upload_id: str) -> None:
        bucket, key, _ = self.fs.split_path(path)
        self.fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id)

    def put_whole(self, path: str, body: bytes) -> None:
        bucket, key, _ = self.fs.split_path(path)
        self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=body)

    def put_parts(self, path: str, chunks: Iterable[memoryview | bytes], part: int) -> None:
        """A multipart upload whose parts are read from ``chunks`` while earlier parts are
        still being sent (at most ``PARTS_PER_FILE`` per file, ``MAX_PARTS_IN_FLIGHT`` per
        process, and within the bytes-in-flight budget)."""
        bucket, key, _ = self.fs.split_path(path)
        upload_id = self.fs.call_s3("create_multipart_upload", Bucket=bucket, Key=key)["UploadId"]
        pending: deque[tuple[int, Future]] = deque()
        done: list[dict[str, Any]] = []

        def send(number: int, body: bytes) -> None:
            _in_flight.acquire()
            IN_FLIGHT.acquire(len(body))
            coro = self.fs._call_s3(
                "upload_part",
                Bucket=bucket,
                Key=key,
                UploadId=upload_id,
                PartNumber=number,
                Body=body,
            )
            fut = asyncio.run_coroutine_threadsafe(coro, self.fs.loop)
            fut.add_done_callback(lambda _: (IN_FLIGHT.release(len(body)), _in_flight.release()))
            pending.append((number, fut))

        def settle(keep: int) -> None:
            while len(pending) > keep:
                number, fut = pending.popleft()
                done.append({"PartNumber": number, "ETag": fut.result()["ETag"]})

        try:
            for number, body in enumerate(gather_parts(chunks, part), start=1):
                settle(PARTS_PER_FILE - 1)
                send(number, body)
            settle(0)
            self.fs.call_s3(
                "complete_multipart_upload",
                Bucket=bucket,
                Key=key,
                UploadId=upload_id,
                MultipartUpload={"Parts": done},
            )
        except BaseException:
            for _, fut in pending:
                fut.cancel()
                with contextlib.suppress(BaseException):
                    fut.result()
            with contextlib.suppress(Exception):  # best effort: else gc aborts it
                self.abort_upload(path, upload_id)
            raise
