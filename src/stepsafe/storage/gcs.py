"""Google Cloud Storage (and fake-gcs-server) through gcsfs's public API.

Connection settings, read from the environment when the client is made (the one place they
are documented):

- endpoint: ``STEPSAFE_GCS_ENDPOINT_URL``, else ``STORAGE_EMULATOR_HOST`` (the variable Google's
  own clients read), else Google.
- credentials: ``STEPSAFE_GCS_TOKEN`` (anything gcsfs' ``token`` takes: ``anon`` for a public
  bucket, ``google_default``, ``cloud``, or the path of a service-account JSON), else ``anon``
  when an emulator endpoint is set, else Application Default Credentials, looked for in
  Google's order: the key file that ``GOOGLE_APPLICATION_CREDENTIALS`` names, then the file
  ``gcloud auth application-default login`` writes, then the metadata server of the Google
  Cloud VM (GKE pod, Cloud Run...) we run on. ``GOOGLE_CLOUD_PROJECT`` names the project.
- With an emulator endpoint, ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT`` defaults to ``false``
  before gcsfs is imported: its gRPC probe otherwise stalls every call for a minute.

No credentials is an error at once (``CredentialsError``, naming what to set), not after a
minute or two. Left to itself (``token=None``), gcsfs tries google-auth's chain, whose metadata
ping is 3 attempts, then its own "cloud" step, 5 more with backoff, then falls back to anonymous
requests without a word; its bucket-type probe pings twice more, and the anonymous requests
fail after 6 retries: 59 s measured with the metadata address refusing connections, 103 s with
it silent, then a traceback. Here the metadata server is asked once, only when no credential
file was found, with ``GCE_METADATA_TIMEOUT`` seconds (google-auth's variable, default 3) to
answer; ``GCE_METADATA_IP`` moves it and ``NO_GCE_CHECK=true`` skips it, as for google-auth
(tests point it at a loopback port).

Commit marker: gcsfs ``pipe_file(mode="create")``, a one-shot multipart upload with
``ifGenerationMatch=0``; GCS answers 412 when the object exists, which gcsfs raises as
``FileExistsError`` (fake-gcs-server enforces the precondition for multipart uploads, which is
why the marker never goes up resumably).

Retries: gcsfs retries every request up to 6 times with exponential backoff and jitter on
408/429/5xx and connection errors.

Uploads: a data file of up to ``knobs.SINGLE_UPLOAD_MAX`` goes up in one media POST (gcsfs'
``call``, to the upload URL of the endpoint configured here); a bigger one as a resumable
upload (gcsfs' ``open(..., "wb")``) in ``knobs.PART_SIZE`` pieces, which GCS accepts only in
order, so they are sequential (files are written concurrently).
"""

from __future__ import annotations

import http.client
import os
from pathlib import Path
from typing import Any

from stepsafe.errors import CredentialsError
from stepsafe.storage.budget import ByteBudget
from stepsafe.storage.remote import RemoteStorage

GOOGLE = "https://storage.googleapis.com"  # the endpoint when none is configured
ENV_KEYS = (  # what the client is made from (storage.dispatch makes one per configuration)
    "STEPSAFE_GCS_ENDPOINT_URL",
    "STORAGE_EMULATOR_HOST",
    "STEPSAFE_GCS_TOKEN",
    "GOOGLE_APPLICATION_CREDENTIALS",
    "GOOGLE_CLOUD_PROJECT",
)
SCOPE = "https://www.googleapis.com/auth/devstorage.full_control"  # gcsfs' default access
METADATA_IP = "169.254.169.254"  # google-auth's default; GCE_METADATA_IP overrides it
NO_CREDENTIALS = (
    "no Google Cloud credentials found: set GOOGLE_APPLICATION_CREDENTIALS to a "
    "service-account key file, or run `gcloud auth application-default login`, or set "
    "STEPSAFE_GCS_TOKEN=anon for a public bucket (STEPSAFE_GCS_ENDPOINT_URL for another "
    "server); no metadata server answered at {ip} within {timeout:g} s (not a Google Cloud VM)"
)


def config_key() -> tuple:
    """What the client is made from: a different value needs a different client."""
    return tuple(os.environ.get(k) for k in ENV_KEYS)


def gcs_endpoint() -> str | None:
    """The endpoint configured in the environment (see the module docstring), with its
    scheme; None for Google's own."""
    endpoint = os.environ.get("STEPSAFE_GCS_ENDPOINT_URL") or os.environ.get(
        "STORAGE_EMULATOR_HOST"
    )
    if not endpoint:
        return None
    return endpoint if "://" in endpoint else f"http://{endpoint}"


def gcs_filesystem() -> Any:
    """A ``GCSFileSystem`` configured from the environment (see the module docstring)."""
    endpoint = gcs_endpoint()
    if endpoint:
        os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    import gcsfs  # imported here: an optional extra

    token: Any = os.environ.get("STEPSAFE_GCS_TOKEN") or ("anon" if endpoint else None)
    project = os.environ.get("GOOGLE_CLOUD_PROJECT")
    if token is None:
        token, found_project = default_credentials()
        project = project or found_project
    kwargs: dict[str, Any] = {
        "token": token,
        "use_listings_cache": False,  # other processes write: never trust a cached listing
        "skip_instance_cache": True,
    }
    if endpoint:
        kwargs["endpoint_url"] = endpoint
    if project:
        kwargs["project"] = project
    return gcsfs.GCSFileSystem(**kwargs)


def default_credentials() -> tuple[Any, str | None]:
    """Application Default Credentials and their project, found in Google's order (see the
    module docstring), with the metadata server asked once, briefly: a CredentialsError when
    there are none, instead of a minute of retries and then anonymous requests.

    Raises:
        CredentialsError: no credential file, and no metadata server answered; or the
            credentials found are unusable (a missing or malformed key file).
    """
    import google.auth
    import google.auth.exceptions

    if not (
        os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
        or _gcloud_credentials_file().is_file()
        or _on_google_cloud()
    ):
        ip = os.environ.get("GCE_METADATA_IP") or METADATA_IP
        raise CredentialsError(NO_CREDENTIALS.format(ip=ip, timeout=_metadata_timeout()))
    try:
        return google.auth.default(scopes=[SCOPE])
    except google.auth.exceptions.GoogleAuthError as e:
        reason = " ".join(str(e).split())
        raise CredentialsError(
            f"Google Cloud credentials unusable ({reason}): fix GOOGLE_APPLICATION_CREDENTIALS "
            "or run `gcloud auth application-default login` again"
        ) from None  # the reason is in the message; a chained OSError would read as a disk's


def _gcloud_credentials_file() -> Path:
    """Where ``gcloud auth application-default login`` writes (google-auth reads it there)."""
    if os.environ.get("CLOUDSDK_CONFIG"):
        config = Path(os.environ["CLOUDSDK_CONFIG"])
    elif os.name == "nt":
        config = Path(os.environ.get("APPDATA", "C:\\")) / "gcloud"
    else:
        config = Path.home() / ".config" / "gcloud"
    return config / "application_default_credentials.json"


def _metadata_timeout() -> float:
    try:
        return float(os.environ.get("GCE_METADATA_TIMEOUT", "3"))
    except ValueError:
        return 3.0


def _on_google_cloud() -> bool:
    """google-auth's ``is_on_gce`` with its metadata ping made once instead of three times
    (``NO_GCE_CHECK=true`` skips it, as there). Unlike it, the machine's DMI product name does
    not count: it would make a Google VM whose metadata server is unreachable wait out
    google-auth's retries; raise ``GCE_METADATA_TIMEOUT`` for a slow one instead."""
    return os.environ.get("NO_GCE_CHECK") != "true" and _metadata_server_answers()


def _metadata_server_answers() -> bool:
    """Whether a Google metadata server answers one request within the timeout: what
    google-auth's ``ping`` checks (the ``Metadata-Flavor: Google`` reply header), once."""
    ip = os.environ.get("GCE_METADATA_IP") or METADATA_IP
    conn = http.client.HTTPConnection(ip, timeout=_metadata_timeout())  # never via a proxy
    try:
        conn.request("GET", "/", headers={"Metadata-Flavor": "Google"})
        return conn.getresponse().getheader("Metadata-Flavor") == "Google"
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


class GCSStorage(RemoteStorage):
    """Args (besides RemoteStorage's): ``endpoint``, the one ``fs`` was made for (default:
    the environment's, as ``gcs_filesystem`` reads it); uploads are addressed to it."""

    scheme = "gs"

    def __init__(
        self, fs: Any, budget: ByteBudget | None = None, endpoint: str | None = None
    ) -> None:
        super().__init__(fs, budget)
        self.endpoint = (endpoint or gcs_endpoint() or GOOGLE).rstrip("/")

    def create_exclusive(self, path: str, data: bytes) -> None:
        self.fs.pipe_file(path, data, mode="create")  # gcsfs: 412 -> FileExistsError

    def put_whole(self, path: str, body: bytes) -> None:
        """A media upload: the bytes as the request's body, without the multipart envelope
        that gcsfs' ``pipe_file`` wraps them in (which costs a copy on each side). Measured on
        fake-gcs-server, nine 128 MiB files on 8 threads: 141-159 MB/s and half the client
        CPU, against 100-105 MB/s through ``pipe_file``. Sent through gcsfs' ``call`` (its
        credentials, its retries), to the JSON API's upload URL of our own endpoint."""
        bucket, key, _ = self.fs.split_path(path)
        self.fs.call(
            "POST",
            f"{self.endpoint}/upload/storage/v1/b/{{}}/o",
            bucket,
            uploadType="media",
            name=key,
            headers={"Content-Type": "application/octet-stream"},
            data=body,
            json_out=True,
        )
