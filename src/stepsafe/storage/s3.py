"""S3 (and S3-compatible servers) through s3fs's public API and the aiobotocore client it
hands out.

Connection settings, read from the environment when the client is made (the one place they
are documented), so the same code runs against AWS, MinIO or moto:

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

Commit marker: s3fs ``pipe_file(mode="create")``, a ``PutObject`` with ``If-None-Match: *``
(AWS since 2024; moto enforces it). s3fs turns the 412 ``PreconditionFailed`` into
``FileExistsError``; a 409 ``ConditionalRequestConflict`` (a racing conditional write) is
recognised by botocore's error code, which s3fs keeps as the cause of the ``OSError`` it raises.

Timeouts: 10 s to connect, ``knobs.S3_READ_TIMEOUT_S`` for a reply; a request that times out
is retried like a failed one.

Retries: botocore "standard" mode, ``knobs.S3_MAX_ATTEMPTS`` attempts with exponential backoff
and jitter on 429/5xx/throttling and connection errors, per request (one part of a multipart
upload is one request, so a retry resends one part); the requests s3fs makes (``pipe_file``,
reads, listings) get s3fs's own retries on dropped connections too.

Uploads: a data file of up to ``knobs.SINGLE_UPLOAD_MAX`` goes up in one ``PutObject``
(``pipe_file``); a bigger one as a multipart upload, driven here through the client that
s3fs's public ``set_session`` returns, on the filesystem's event loop (``fs.loop``). Its parts
(``knobs.PART_SIZE``) are sent concurrently, at most ``knobs.S3_PARTS_PER_FILE`` per file and
``knobs.S3_PARTS_IN_FLIGHT`` per process, within the storage's budget (budget.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections import deque
from collections.abc import Iterable
from concurrent.futures import Future
from typing import Any

from stepsafe import knobs
from stepsafe.errors import CredentialsError
from stepsafe.storage.budget import ByteBudget
from stepsafe.storage.remote import RemoteStorage, gather_parts

# Parts in flight in this process, all storages together (reset in a forked child, budget.py).
PARTS = ByteBudget(knob="S3_PARTS_IN_FLIGHT")
ENDPOINT_VARS = ("STEPSAFE_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
ENV_KEYS = (  # what the client is made from (storage.dispatch makes one per configuration)
    *ENDPOINT_VARS,
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ACCESS_KEY_ID",
    "AWS_PROFILE",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "STEPSAFE_S3_ANON",
)
NO_CREDENTIALS = (
    "no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE "
    "(a profile in ~/.aws/credentials or ~/.aws/config), or STEPSAFE_S3_ANON=1 for a public "
    "bucket (STEPSAFE_S3_ENDPOINT_URL for another server); no instance metadata service "
    "answered (not an EC2 instance)"
)


def config_key() -> tuple:
    """What the client is made from: a different value needs a different client."""
    return (*(os.environ.get(k) for k in ENV_KEYS), knobs.S3_MAX_ATTEMPTS, knobs.S3_READ_TIMEOUT_S)


def s3_filesystem() -> Any:
    """An ``S3FileSystem`` configured from the environment (see the module docstring)."""
    import s3fs  # imported here: an optional extra

    endpoint = next((os.environ[v] for v in ENDPOINT_VARS if os.environ.get(v)), None)
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    client_kwargs: dict[str, Any] = {}
    if endpoint:
        client_kwargs["endpoint_url"] = endpoint
        region = region or "us-east-1"
    if region:
        client_kwargs["region_name"] = region
    anon = os.environ.get("STEPSAFE_S3_ANON", "") in ("1", "true")
    if not anon:
        check_credentials()
    return s3fs.S3FileSystem(
        anon=anon,
        client_kwargs=client_kwargs,
        config_kwargs={
            "retries": {"max_attempts": knobs.S3_MAX_ATTEMPTS, "mode": "standard"},
            "connect_timeout": 10,
            "read_timeout": knobs.S3_READ_TIMEOUT_S,
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


# botocore error codes of a conditional create that found, or raced, another object
NOT_CREATED = ("PreconditionFailed", "ConditionalRequestConflict")


def _not_created(e: BaseException) -> bool:
    """Whether ``e`` says a conditional create did not create the object because another one
    is there or is being written: a 412 ``PreconditionFailed`` that s3fs did not already turn
    into ``FileExistsError`` (servers that leave out its ``Condition``), or a 409
    ``ConditionalRequestConflict``. s3fs raises them as an ``OSError`` whose cause is
    botocore's ``ClientError``, whose code says which."""
    import botocore.exceptions

    cause = e.__cause__
    return (
        isinstance(cause, botocore.exceptions.ClientError)
        and cause.response.get("Error", {}).get("Code") in NOT_CREATED
    )


class S3Storage(RemoteStorage):
    scheme = "s3"

    def create_exclusive(self, path: str, data: bytes) -> None:
        try:
            self.fs.pipe_file(path, data, mode="create")  # 412 -> FileExistsError
        except FileExistsError:
            raise
        except OSError as e:
            if _not_created(e):  # settled by whose marker is there (RemoteTransaction)
                raise FileExistsError(path) from e
            raise

    def put_whole(self, path: str, body: bytes) -> None:
        """One ``PutObject``: a chunk size above the body's keeps s3fs from going multipart."""
        self.fs.pipe_file(path, body, chunksize=len(body) + 1)

    def _client(self) -> Any:
        """The aiobotocore S3 client of this filesystem (s3fs' public ``set_session``, which
        makes it once and hands the same one back), for the calls s3fs has no method for."""
        from fsspec.asyn import sync

        return sync(self.fs.loop, self.fs.set_session)

    def _start(self, coro: Any) -> Future:
        """Run a client coroutine on the filesystem's event loop (fsspec's public ``loop``)."""
        return asyncio.run_coroutine_threadsafe(coro, self.fs.loop)

    def _call(self, method: str, **kwargs: Any) -> Any:
        """``client.<method>(**kwargs)`` and its reply; a refusal as s3fs raises it (an
        ``OSError`` subclass by its error code, botocore's error as the cause)."""
        return _result(self._start(getattr(self._client(), method)(**kwargs)))

    def unfinished_uploads(self, prefix: str) -> list[tuple[str, str]]:
        bucket, key, _ = self.fs.split_path(prefix)
        key = key.rstrip("/") + "/" if key else ""
        out: list[tuple[str, str]] = []
        marker: dict[str, str] = {}
        while True:
            page = self._call("list_multipart_uploads", Bucket=bucket, Prefix=key, **marker)
            out += [(f"s3://{bucket}/{u['Key']}", u["UploadId"]) for u in page.get("Uploads", [])]
            if not page.get("IsTruncated"):
                return out
            marker = {
                "KeyMarker": page["NextKeyMarker"],
                "UploadIdMarker": page["NextUploadIdMarker"],
            }

    def abort_upload(self, path: str, upload_id: str) -> None:
        bucket, key, _ = self.fs.split_path(path)
        self._call("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id)

    def put_parts(self, path: str, chunks: Iterable[memoryview | bytes], part: int) -> None:
        """A multipart upload whose parts are read from ``chunks`` while earlier parts are
        still being sent (at most ``knobs.S3_PARTS_PER_FILE`` per file,
        ``knobs.S3_PARTS_IN_FLIGHT`` per process, and within the bytes-in-flight budget)."""
        bucket, key, _ = self.fs.split_path(path)
        upload_id = self._call("create_multipart_upload", Bucket=bucket, Key=key)["UploadId"]
        client = self._client()
        where = {"Bucket": bucket, "Key": key, "UploadId": upload_id}
        pending: deque[tuple[int, Future]] = deque()
        done: list[dict[str, Any]] = []

        def send(number: int, body: bytes) -> None:
            PARTS.acquire(1)
            self.budget.acquire(len(body))
            try:
                fut = self._start(client.upload_part(**where, PartNumber=number, Body=body))
            except BaseException:
                self.budget.release(len(body))
                PARTS.release(1)
                raise
            fut.add_done_callback(lambda _: (self.budget.release(len(body)), PARTS.release(1)))
            pending.append((number, fut))

        def settle(keep: int) -> None:
            while len(pending) > keep:
                number, fut = pending.popleft()
                done.append({"PartNumber": number, "ETag": _result(fut)["ETag"]})

        try:
            for number, body in enumerate(gather_parts(chunks, part), start=1):
                settle(knobs.S3_PARTS_PER_FILE - 1)
                send(number, body)
            settle(0)
            self._call("complete_multipart_upload", **where, MultipartUpload={"Parts": done})
        except BaseException:
            for _, fut in pending:
                fut.cancel()
                with contextlib.suppress(BaseException):
                    fut.result()
            with contextlib.suppress(Exception):  # best effort: else gc aborts it
                self.abort_upload(path, upload_id)
            raise


def _result(fut: Future) -> Any:
    """The reply of a client call; botocore's refusal translated as s3fs translates its own
    (``s3fs.errors.translate_boto_error``: 404 -> FileNotFoundError, 403 -> PermissionError,
    else an ``OSError`` with botocore's error as the cause)."""
    import botocore.exceptions
    from s3fs.errors import translate_boto_error

    try:
        return fut.result()
    except botocore.exceptions.ClientError as e:
        raise translate_boto_error(e) from e
