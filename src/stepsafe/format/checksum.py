"""One checksum for every chunk: xxh3-64, ~13 GB/s on one core, so verifying is never the
bottleneck next to a disk or network."""

from __future__ import annotations

import xxhash

ALGORITHM = "xxh3_64"


def checksum(buf: memoryview | bytes) -> str:
    return xxhash.xxh3_64_hexdigest(buf)
