"""The bucket client stepsafe itself uses, for the methods that talk to a bucket directly."""

from __future__ import annotations

from typing import Any


def bucket_fs(storage: str) -> Any:
    """The fsspec filesystem stepsafe itself would use for ``storage``, from the environment."""
    if storage == "s3":
        from stepsafe.storage.s3 import s3_filesystem

        return s3_filesystem()
    from stepsafe.storage.gcs import gcs_filesystem

    return gcs_filesystem()


def warm_up(fs: Any, url: str) -> None:
    """One HEAD of a key that does not exist, in the bucket of ``url``: the client's first
    request loads its service models, resolves credentials and opens a connection (about
    0.2 s with botocore), which a method's first timed request would otherwise pay. Done the
    same way for stepsafe and the one-object baseline; Orbax's clients live inside its calls."""
    bucket = url.split("://", 1)[1].split("/", 1)[0]
    fs.exists(f"{url.split('://', 1)[0]}://{bucket}/stepsafe-bench-warm-up")
