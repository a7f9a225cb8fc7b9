"""The state's bytes as ONE object, written and read back with the same client library stepsafe
uses (s3fs / gcsfs, configured by stepsafe's own ``s3_filesystem()`` / ``gcs_filesystem()``).

There is no checkpoint format, no manifest, no checksum, no per-array work: the ceiling for that
library on that server. Each way of moving the bytes is a *variant* (``benchmarks.plan``); the
report takes the best as the baseline.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import numpy as np

from benchmarks import states
from benchmarks.methods.base import Method
from benchmarks.methods.buckets import bucket_fs, warm_up

MiB = 1 << 20


class OneObject(Method):
    """The state's bytes as one object. ``make`` lays every leaf into one buffer (untimed),
    so that the leaves are views of exactly the bytes that go up; restore returns views of the
    bytes that came down, so the round-trip fingerprint checks them like any other method's."""

    def __init__(self, storage: str, variant: str | None) -> None:
        if variant is None:
            raise ValueError("one-object needs a variant (benchmarks.plan.VARIANTS)")
        super().__init__(storage, variant)
        self.fs = bucket_fs(storage)
        self.buffer = bytearray()
        self.staged: str | None = None

    def make(self, state: str) -> Any:
        self.buffer = bytearray(states.nbytes(state))
        leaves = self._views(state, self.buffer)
        for spec, values in states.random_leaves(state):
            leaves[spec.key][...] = values
        if self.variant == "put-file":  # the client reads a file: give it one in RAM
            self.staged = f"/dev/shm/stepsafe-bench-{os.getpid()}"
            with open(self.staged, "wb") as f:
                f.write(self.buffer)
        tree = states.nest(list(leaves.items()))
        tree["step"] = states.STEP
        return tree

    @staticmethod
    def _views(state: str, buf: bytes | bytearray) -> dict[states.Key, np.ndarray]:
        out: dict[states.Key, np.ndarray] = {}
        offset = 0
        for spec in states.specs(state):
            count = spec.nbytes // states.DTYPE.itemsize
            arr = np.frombuffer(buf, dtype=states.DTYPE, count=count, offset=offset)
            out[spec.key] = arr.reshape(spec.shape)
            offset += spec.nbytes
        return out

    def prepare(self, url: str, op: str) -> None:
        """Untimed: before a save, remove what an earlier variant left at ``url``; before a
        restore, one request through the client (see ``warm_up``)."""
        if op == "save":
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(url)
        else:
            warm_up(self.fs, url)

    def save(self, path: str, tree: Any) -> None:
        fs, buf, v = self.fs, self.buffer, self.variant
        if v == "put-object":
            fs.pipe_file(path, buf, chunksize=len(buf) + 1)
        elif v == "pipe-50M":
            fs.pipe_file(path, buf, chunksize=50 * MiB, max_concurrency=8)
        elif v == "pipe-128M":
            fs.pipe_file(path, buf, chunksize=128 * MiB, max_concurrency=8)
        elif v == "put-file":
            fs.put_file(self.staged, path)
        elif v == "pipe-64M":
            fs.pipe_file(path, memoryview(buf), chunksize=64 * MiB)
        elif v == "pipe-256M":
            fs.pipe_file(path, memoryview(buf), chunksize=256 * MiB)
        elif v == "pipe-single":
            fs.pipe_file(path, buf, chunksize=len(buf) + 1)
        elif v == "media-single":
            from stepsafe.storage.gcs import GCSStorage

            GCSStorage(fs).put_whole(path, buf)
        else:
            raise ValueError(f"no save variant {v!r}")

    def restore(self, path: str, state: str) -> Any:
        fs, v, n = self.fs, self.variant, states.nbytes(state)
        data: bytes | bytearray
        if v == "cat-file":
            data = fs.cat_file(path)
        elif v == "cat-file-c16":
            data = fs.cat_file(path, concurrency=16)
        elif v.startswith("ranges-"):
            piece = int(v.removeprefix("ranges-").removesuffix("M")) * MiB
            starts = list(range(0, n, piece))
            ends = [min(s + piece, n) for s in starts]
            data = bytearray(n)
            view = memoryview(data)
            for start, chunk in zip(starts, fs.cat_ranges([path] * len(starts), starts, ends)):
                if isinstance(chunk, BaseException):
                    raise chunk
                view[start : start + len(chunk)] = chunk
        else:
            raise ValueError(f"no restore variant {v!r}")
        if len(data) != n:
            raise RuntimeError(f"read {len(data)} bytes, expected {n}")
        tree = states.nest(list(self._views(state, data).items()))
        tree["step"] = states.STEP
        return tree

    def close(self) -> None:
        if self.staged:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.staged)
