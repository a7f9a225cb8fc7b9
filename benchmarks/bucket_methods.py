"""What the bucket benchmark compares: stepsafe, one large object, and Orbax, on one server.

- ``stepsafe``: ``stepsafe.save(url, tree)`` / ``stepsafe.restore(url, target)``, the same
  method as the disk benchmark (``benchmarks.methods.stepsafe``), pointed at a URL.
- ``one-object``: the state's bytes, laid out back to back in one buffer, written as ONE object
  and read back, with the same client library stepsafe uses (s3fs / gcsfs, configured by
  stepsafe's own ``s3_filesystem()`` / ``gcs_filesystem()``). There is no checkpoint format,
  no manifest, no checksum, no per-array work: the ceiling for that library on that server.
  Each way of moving the bytes is a *variant*; the report takes the best as the baseline.
- ``orbax``: Orbax's synchronous ``Checkpointer`` with ``StandardCheckpointHandler`` (its
  defaults: OCDBT through tensorstore), at a ``gs://`` or ``s3://`` path. See ``_orbax_s3``.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import numpy as np

from benchmarks import states
from benchmarks.bucket_plan import METHODS, MiB, file_size_bytes
from benchmarks.methods.base import Method
from benchmarks.methods.stepsafe import Stepsafe


def bucket_fs(server: str) -> Any:
    """The fsspec filesystem stepsafe itself would use for ``server``, from the environment."""
    if server == "s3":
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


class OneObject(Method):
    """The state's bytes as one object. ``make`` lays every leaf into one buffer (untimed),
    so that the leaves are views of exactly the bytes that go up; restore returns views of the
    bytes that came down, so the round-trip fingerprint checks them like any other method's."""

    def __init__(self, server: str, variant: str) -> None:
        self.server = server
        self.variant = variant
        self.fs = bucket_fs(server)
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


class StepsafeBucket(Stepsafe):
    """``benchmarks.methods.stepsafe.Stepsafe`` with its bucket client made before the clock.

    stepsafe makes one client per process on first use and keeps it (storage.dispatch), as a
    training run that saves repeatedly would; the one-object cases likewise make their client
    untimed. Without this, the first save of each process would also time importing
    s3fs/aiobotocore (or gcsfs) and building the client. ``variant`` ``files-<N>M`` saves
    with ``data_file_size_bytes=N MiB``; None, stepsafe's defaults.
    """

    def __init__(self, variant: str | None = None) -> None:
        self.file_size = file_size_bytes(variant) if variant else None

    def save(self, path: str, tree: Any) -> None:
        import stepsafe

        if self.file_size is None:
            stepsafe.save(path, tree)
        else:
            stepsafe.save(path, tree, data_file_size_bytes=self.file_size)

    def prepare(self, url: str, op: str) -> None:
        from stepsafe.storage.dispatch import remote_storage

        warm_up(remote_storage(url.split("://", 1)[0]).fs, url)


# -- Orbax -----------------------------------------------------------------------------------


def _orbax_s3() -> None:
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


class OrbaxBucket(Method):
    """Orbax's synchronous Checkpointer with its defaults, at a bucket URL.

    The commit: on ``gs://`` Orbax itself picks ``CommitFileTemporaryPath`` (files written in
    place, a ``commit_success.txt`` last); on ``s3://`` its default, a rename of the temporary
    directory, fails in epath/s3fs (``FileNotFoundError`` copying the directory's key), so
    the same commit-file scheme it uses on GCS is asked for explicitly.
    """

    def __init__(self, server: str) -> None:
        import logging

        import jax
        import orbax.checkpoint as ocp
        from orbax.checkpoint._src.path import atomicity

        logging.getLogger("absl").setLevel(logging.WARNING)
        self.jax, self.ocp = jax, ocp
        kwargs: dict[str, Any] = {}
        if server == "s3":
            _orbax_s3()
            kwargs["temporary_path_class"] = atomicity.CommitFileTemporaryPath
        self.ckptr = ocp.Checkpointer(ocp.StandardCheckpointHandler(), **kwargs)

    def make(self, state: str) -> Any:
        jax = self.jax
        return states.build(state, lambda a: jax.block_until_ready(jax.device_put(a)))

    def save(self, path: str, tree: Any) -> None:
        self.ckptr.save(path, args=self.ocp.args.StandardSave(tree))

    def restore(self, path: str, state: str) -> Any:
        from benchmarks.methods.orbax import abstract

        tree = self.ckptr.restore(path, args=self.ocp.args.StandardRestore(abstract(state)))
        return self.jax.block_until_ready(tree)

    def leaf(self, tree: Any, key: states.Key) -> np.ndarray:
        return np.asarray(super().leaf(tree, key))

    def close(self) -> None:
        self.ckptr.close()


def load(method: str, server: str, variant: str | None) -> Method:
    """An instance of ``method`` for ``server``; imports its libraries (before any clock)."""
    if method == "stepsafe":
        return StepsafeBucket(variant)
    if method == "one-object":
        if variant is None:
            raise ValueError("one-object needs a variant")
        return OneObject(server, variant)
    if method == "orbax":
        return OrbaxBucket(server)
    raise ValueError(f"unknown method {method!r} ({', '.join(METHODS)})")
