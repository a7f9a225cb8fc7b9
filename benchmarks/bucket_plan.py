"""The bucket benchmark's cases, as names only: which methods and variants run, in what order.

Kept apart from ``bucket_methods`` so that the orchestrator never imports stepsafe or a client
library: it may point the children at a snapshot of stepsafe (``--snapshot``), and it must not
hold an import of the working tree's copy itself.
"""

from __future__ import annotations

from dataclasses import dataclass

MiB = 1 << 20
METHODS = ("stepsafe", "one-object", "orbax")
LABELS = {
    "stepsafe": "stepsafe",
    "one-object": "one object, same client (best variant)",
    "orbax": "Orbax (sync Checkpointer, OCDBT via tensorstore)",
}


@dataclass(frozen=True)
class Variant:
    """One way to move the bytes: ``op`` is save or restore; ``servers`` where it applies."""

    name: str
    op: str
    servers: tuple[str, ...]
    doc: str


# One large object: every way the same client library offers to write and read it. The
# baseline of each server and direction is the variant with the best median.
VARIANTS: tuple[Variant, ...] = (
    Variant("put-object", "save", ("s3",), "pipe_file(buffer): one PutObject"),
    Variant("pipe-50M", "save", ("s3",), "pipe_file(buffer): multipart, 50 MiB parts, 8 at once"),
    Variant("pipe-128M", "save", ("s3",), "pipe_file(buffer): multipart, 128 MiB parts, 8 at once"),
    Variant("put-file", "save", ("s3",), "put_file from a tmpfs copy (written untimed)"),
    Variant("pipe-64M", "save", ("gcs",), "pipe_file(buffer): resumable, 64 MiB pieces"),
    Variant("pipe-256M", "save", ("gcs",), "pipe_file(buffer): resumable, 256 MiB pieces"),
    Variant("pipe-single", "save", ("gcs",), "pipe_file(buffer): one multipart POST"),
    Variant("media-single", "save", ("gcs",), "one media POST, as stepsafe sends each file"),
    Variant("cat-file", "restore", ("s3", "gcs"), "cat_file: one GET"),
    Variant("cat-file-c16", "restore", ("gcs",), "cat_file(concurrency=16): 16 ranged GETs"),
    Variant("ranges-64M", "restore", ("s3", "gcs"), "cat_ranges: 64 MiB ranged GETs at once"),
    Variant("ranges-256M", "restore", ("s3", "gcs"), "cat_ranges: 256 MiB ranged GETs at once"),
)

# stepsafe with another ``data_file_size_bytes`` (a public argument of ``stepsafe.save``): not a
# target row. 2 GiB is MaxText's default for checkpoint_storage_target_data_file_size_bytes (ours
# is the storage's choice, 128 MiB on buckets): files that big go up in parts.
STEPSAFE_FILE_SIZES = ("2048M",)


def variants(server: str, op: str) -> list[Variant]:
    return [v for v in VARIANTS if op == v.op and server in v.servers]


def file_size_bytes(variant: str) -> int:
    """``files-128M`` -> 128 MiB."""
    return int(variant.removeprefix("files-").removesuffix("M")) * MiB


def scheme(server: str) -> str:
    return {"s3": "s3", "gcs": "gs"}[server]
