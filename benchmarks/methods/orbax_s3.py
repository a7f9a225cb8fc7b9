"""Let Orbax write its arrays to ``s3://`` on the loopback server (see ``allow_s3``)."""

from __future__ import annotations

import os
from typing import Any


def allow_s3() -> None:
    """Let Orbax 0.12.8 write its arrays to ``s3://`` through tensorstore's s3 driver.

    Out of the box it cannot: ``tensorstore_utils._normalize_path`` runs ``os.path.normpath``,
    which turns ``s3://b/k`` into ``s3:/b/k``, then refuses it as "not absolute" (only ``gs:/``
    is repaired), after having created a local directory named ``s3:``. Three private
    functions are patched, for ``s3://`` paths only: the normalisation keeps ``s3://``, such a
    path takes the "remote driver" branch that ``gs://`` takes, and its kvstore spec is
    tensorstore's ``s3`` driver with the loopback ``endpoint`` (credentials: the dummy ones in
    the environment). OCDBT, the handler and everything else are Orbax's own code.
    """
    from orbax.checkpoint._src.path import gcs_utils
    from orbax.checkpoint._src.serialization import tensorstore_utils as tsu

    normalize, gcs_kvstore = tsu._normalize_path, gcs_utils.get_kvstore_for_gcs

    def keep_s3(path: str) -> str:
        out = normalize(path)
        if out.startswith("s3:/") and not out.startswith("s3://"):
            out = "s3://" + out.removeprefix("s3:/")
        return out

    def kvstore(path: str) -> dict[str, Any]:
        if not str(path).startswith("s3://"):
            return gcs_kvstore(path)
        bucket, _, key = str(path).removeprefix("s3://").partition("/")
        return {
            "driver": "s3",
            "bucket": bucket,
            "path": key,
            "endpoint": os.environ["STEPSAFE_S3_ENDPOINT_URL"],
            "aws_region": os.environ.get("AWS_REGION", "us-east-1"),
        }

    tsu._normalize_path = keep_s3
    tsu._use_gcs_driver = lambda d: d.startswith(("gs://", "s3://"))
    gcs_utils.get_kvstore_for_gcs = kvstore
