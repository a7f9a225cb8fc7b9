"""Hugging Face safetensors files, written and read one tensor at a time.

    model.safetensors                                  one file, or
    model-00001-of-0000N.safetensors ...               several, split at a size limit, with
    model.safetensors.index.json                       {"metadata": {"total_size"}, "weight_map"}

A file is an 8-byte little-endian header length, a JSON header (each tensor's dtype, shape and
byte range; ``__metadata__`` ``{"format": "pt"}``, which transformers expects) padded with
spaces to 8 bytes, then the tensors' bytes in C order. The safetensors library's writer takes
every tensor of a file in memory at once; this one writes the format itself, streaming each
tensor (an ``OutLeaf``, made when its turn comes and dropped after), so a model of any size
needs about its largest tensor in memory. Files are split as Hugging Face does: in order, a
new file when the next tensor would pass the limit, a tensor bigger than the limit alone. The
directory appears whole or not at all (a local transaction: a temporary renamed into place).

Reading goes through the safetensors library (``safe_open``, lazy: only the tensor asked for
is read), each tensor an ``OutLeaf``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import struct
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from stepsafe.convert.lazy_leaf import OutLeaf, grouped
from stepsafe.errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    ConfigError,
    CorruptCheckpointError,
    ManifestError,
    StepsafeError,
)
from stepsafe.format.manifest import Box
from stepsafe.storage import Storage, storage_for
from stepsafe.storage.local import LocalStorage

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
HF_SHARD_BYTES = 5 * 10**9  # Hugging Face's "5GB" (huggingface_hub's and transformers 4's)

_MAX_HEADER = 100 << 20  # the safetensors library's limit on a header

_DTYPES = {
    "bool": "BOOL", "uint8": "U8", "int8": "I8", "int16": "I16", "uint16": "U16",
    "float16": "F16", "bfloat16": "BF16", "int32": "I32", "uint32": "U32", "float32": "F32",
    "float64": "F64", "int64": "I64", "uint64": "U64", "complex64": "C64",
}  # fmt: skip
# float8 (F8_E4M3, F8_E5M2) is left out: safetensors' numpy reader cannot read it back


def shard_names(count: int) -> list[str]:
    """The files of a model split in ``count``: Hugging Face's names."""
    if count == 1:
        return [SINGLE]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def write_safetensors(
    directory: str,
    tensors: list[tuple[str, OutLeaf]],
    *,
    max_shard_bytes: int = HF_SHARD_BYTES,
    on_bytes: Callable[[int], None] | None = None,
    extra_files: Mapping[str, bytes] | None = None,
) -> list[str]:
    """Write ``tensors`` (name, array to make) as a Hugging Face safetensors directory; the
    files written. ``extra_files`` (e.g. ``config.json``) are written with them, in the same
    all-or-nothing write.

    Raises:
        ConfigError: a name is repeated, a dtype safetensors cannot hold, or
            ``max_shard_bytes`` < 1.
        CheckpointExistsError: ``directory`` exists (in a bucket: holds a file of the model).
        StorageError: as the storage raised it; nothing is left that a reader would take.
    """
    if max_shard_bytes < 1:
        raise ConfigError(f"max_shard_bytes must be >= 1, got {max_shard_bytes}")
    names = [n for n, _ in tensors]
    for name in names:
        if name == "__metadata__" or not _is_text(name):
            why = "reserved by the format" if name == "__metadata__" else "not Unicode text"
            raise ConfigError(f"tensor name {name!r} cannot be written: {why}")
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ConfigError(f"tensor name {dup!r} is given twice: each name must be unique")
    for name, leaf in tensors:
        _dtype_name(name, leaf.dtype)
    groups = _split(grouped(tensors), max_shard_bytes)  # the index says where each one is
    files = shard_names(len(groups))
    for name in extra_files or {}:
        if name in files or name == INDEX or "/" in name or name in ("", ".", ".."):
            raise ConfigError(f"extra file {name!r} cannot be written beside the weights")
    contents = [(file, _file_bytes(group, on_bytes)) for file, group in zip(files, groups)]
    extras = [(name, iter([bytes(body)])) for name, body in (extra_files or {}).items()]
    if len(files) > 1:  # the index last: readers look for it first
        index = {
            "metadata": {"total_size": sum(leaf.nbytes for _, leaf in tensors)},
            "weight_map": {n: f for f, g in zip(files, groups) for n, _ in g},
        }
        contents += [*extras, (INDEX, iter([json.dumps(index, indent=2).encode()]))]
    else:  # the one file last
        contents = [*extras, *contents]
    url = str(directory)
    storage, path = storage_for(url if "://" in url else os.path.abspath(url))
    if isinstance(storage, LocalStorage):
        with storage.transaction(path) as txn:
            for file, chunks in contents:
                txn.write_file(file, chunks)
            txn.commit()
    else:
        _upload(storage, path, contents, exclusive_last=len(files) > 1)
    return [file for file, _ in contents]


def _upload(
    storage: Any, path: str, contents: list[tuple[str, Iterator[Any]]], *, exclusive_last: bool
) -> None:
    """A model directory in a bucket, which has no rename: every file is uploaded under its
    final name (an object appears whole or not at all), the one readers look for first last:
    the index, or the single file. Nothing is overwritten; a failure deletes only what this
    upload wrote, so an interrupted one leaves no model a reader would take."""
    targets = [storage.join(path, file) for file, _ in contents]
    there = storage.list_dir(path) if storage.exists(path) else []
    if there:  # as a local directory that exists: a model, or something else, is there
        raise CheckpointExistsError(
            f"{path} already holds {', '.join(sorted(there)[:3])}: stepsafe never writes into "
            "an existing model; write to a new directory"
        )
    written: list[str] = []
    try:
        for target, (_, chunks) in zip(targets, contents):
            if target == targets[-1] and exclusive_last:  # the index: created exclusively
                try:
                    storage.create_exclusive(target, b"".join(bytes(c) for c in chunks))
                except FileExistsError as e:
                    raise CheckpointExistsError(
                        f"{target} was written by another writer meanwhile: this one is undone"
                    ) from e
            else:
                written.append(target)  # before: a failed upload may leave an object
                storage.upload(target, chunks)
    except BaseException:
        for target in written:
            with contextlib.suppress(Exception):
                storage.delete_file(target)
        raise


def _is_text(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _split(tensors: list[tuple[str, OutLeaf]], limit: int) -> list[list[tuple[str, OutLeaf]]]:
    groups: list[list[tuple[str, OutLeaf]]] = [[]]
    size = 0
    for item in tensors:
        n = item[1].nbytes
        if groups[-1] and size + n > limit:
            groups.append([])
            size = 0
        groups[-1].append(item)
        size += n
    return groups


def _dtype_name(name: str, dtype: Any) -> str:
    found = _DTYPES.get(np.dtype(dtype).name)
    if found is None:
        raise ConfigError(
            f"tensor {name!r} has dtype {np.dtype(dtype)}, which safetensors cannot hold"
        )
    return found


def _file_bytes(
    group: list[tuple[str, OutLeaf]], on_bytes: Callable[[int], None] | None
) -> Iterator[bytes | memoryview]:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    pos = 0
    for name, leaf in group:
        header[name] = {
            "dtype": _dtype_name(name, leaf.dtype),
            "shape": list(leaf.shape),
            "data_offsets": [pos, pos + leaf.nbytes],
        }
        pos += leaf.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    yield struct.pack("<Q", len(raw)) + raw
    for name, leaf in group:
        try:
            for a in leaf.blocks():  # the tensor whole, or block by block when it is big
                if a.dtype.byteorder == ">":
                    a = a.astype(a.dtype.newbyteorder("<"))
                yield memoryview(a.reshape(-1).view(np.uint8))
                if on_bytes is not None:
                    on_bytes(a.nbytes)
        except ManifestError as e:
            raise StepsafeError(f"tensor {name!r}: {e}: nothing was written") from e


def read_safetensors(directory: str, *, single: str = SINGLE) -> list[tuple[str, OutLeaf]]:
    """The tensors of a Hugging Face model directory (``model.safetensors``, or the files its
    ``model.safetensors.index.json`` names, each holding the tensors it says), each read only
    when made. ``single``: the one file's name where it is another (a PEFT adapter's
    ``adapter_model.safetensors``; such a directory has no index).

    Raises:
        CheckpointNotFoundError: neither file is there.
        CorruptCheckpointError: the index or a file's header is unreadable, a file lacks a
            tensor the index puts there, a tensor is in two files, or a dtype not read here.
        StepsafeError: the safetensors library is not installed.
    """
    import ml_dtypes  # noqa: F401  (numpy reads bfloat16 once ml_dtypes is loaded)

    url = str(directory)
    storage, root = storage_for(url if "://" in url else os.path.abspath(url))
    local = isinstance(storage, LocalStorage)
    out: list[tuple[str, OutLeaf]] = []
    seen: set[str] = set()
    for file, names in _files_of(storage, root, single).items():
        path = storage.join(root, file)
        held = _local_header(path) if local else _bucket_header(storage, path)
        for name in held if names is None else names:
            if name not in held:
                raise CorruptCheckpointError(
                    f"{directory}/{INDEX} puts tensor {name!r} in {file}, which lacks it"
                )
            if name in seen:
                raise CorruptCheckpointError(f"tensor {name!r} is in two files of {directory}")
            seen.add(name)
            shape, dtype, start = held[name]
            read = (
                _reader(path, name) if local else _bucket_reader(storage, path, start, shape, dtype)
            )
            out.append((name, OutLeaf(shape, dtype, read, box=read)))
    return out


Header = dict[str, tuple[tuple[int, ...], np.dtype, int]]  # name -> shape, dtype, data start


def _local_header(path: str) -> Header:
    """A local file's tensors, through the safetensors library (which checks the header)."""
    try:
        from safetensors import safe_open
    except ImportError as e:
        raise StepsafeError(
            "reading safetensors needs the safetensors package: pip install 'stepsafe[safetensors]'"
        ) from e
    try:
        with safe_open(path, framework="numpy") as f:
            held: Header = {}
            for name in f.keys():  # noqa: SIM118  (safe_open is no mapping)
                s = f.get_slice(name)
                shape = tuple(int(n) for n in s.get_shape())
                held[name] = (shape, _numpy_dtype(name, s.get_dtype()), 0)
            return held
    except StepsafeError:
        raise
    except Exception as e:  # safetensors' SafetensorError is a bare Exception
        raise CorruptCheckpointError(f"{path} is not a readable safetensors file: {e}") from e


def _bucket_header(storage: Storage, path: str) -> Header:
    """A bucket file's tensors, from its header (the library reads local files only), checked
    as the library checks it: tensors tile the data after the header exactly, in order."""
    size = storage.size(path)
    bad = f"{path} is not a readable safetensors file"
    if size < 8:
        raise CorruptCheckpointError(f"{bad}: {size} bytes")
    buf = bytearray(8)
    storage.read_into(path, 0, memoryview(buf))
    (n,) = struct.unpack("<Q", buf)
    if n > min(size - 8, _MAX_HEADER):
        raise CorruptCheckpointError(f"{bad}: a header of {n} bytes in a file of {size}")
    raw = bytearray(n)
    storage.read_into(path, 8, memoryview(raw))
    try:
        doc = json.loads(raw)
        entries = sorted(
            ((k, v) for k, v in doc.items() if k != "__metadata__"),
            key=lambda kv: tuple(kv[1]["data_offsets"]),
        )
        held: Header = {}
        end = 0
        for name, v in entries:
            a, b = (int(x) for x in v["data_offsets"])
            shape = tuple(int(x) for x in v["shape"])
            dtype = _numpy_dtype(name, v["dtype"])
            if a != end or b - a != math.prod(shape) * dtype.itemsize or min(shape, default=0) < 0:
                raise ValueError(f"tensor {name!r}: bytes {a}..{b} for {shape} {dtype}")
            held[name], end = (shape, dtype, 8 + n + a), b
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CorruptCheckpointError(f"{bad}: {e}") from e
    if 8 + n + end != size:
        raise CorruptCheckpointError(f"{bad}: its tensors end at {8 + n + end}, the file at {size}")
    return held


def _files_of(storage: Storage, directory: str, single: str) -> dict[str, list[str] | None]:
    """Each file to read and the tensors in it (None: all it holds)."""
    index = storage.join(directory, INDEX)
    if single == SINGLE and storage.exists(index):
        try:
            weight_map = json.loads(storage.read_bytes(index, 1 << 28))["weight_map"]
            files: dict[str, list[str] | None] = {}
            for name, file in weight_map.items():
                files.setdefault(str(file), []).append(str(name))  # type: ignore[union-attr]
            return files
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CorruptCheckpointError(f"{index} is not a valid index: {e}") from e
    if storage.exists(storage.join(directory, single)):
        return {single: None}
    what = f"neither {SINGLE} nor {INDEX}" if single == SINGLE else f"no {single}"
    raise CheckpointNotFoundError(f"{directory} holds {what}: not a Hugging Face model")


def _numpy_dtype(name: str, st: str) -> np.dtype:
    import ml_dtypes

    for np_name, st_name in _DTYPES.items():
        if st_name == st:
            return np.dtype(getattr(ml_dtypes, np_name, np_name))
    raise CorruptCheckpointError(f"tensor {name!r} has safetensors dtype {st}, not read here")


def _bucket_reader(
    storage: Storage, path: str, start: int, shape: tuple[int, ...], dtype: np.dtype
) -> Callable[..., np.ndarray]:
    """Reads a tensor at byte ``start`` of a bucket file: whole, or the rows a region ``box``
    spans on its first axis (one ranged read), cut to the region."""

    def read(box: Box | None = None) -> np.ndarray:
        if not shape:  # a scalar
            out = np.empty((), dtype)
            storage.read_into(path, start, memoryview(out.reshape(1).view(np.uint8)))
            return out
        box = box or tuple((0, n) for n in shape)
        (r0, r1), rest = box[0], box[1:]
        out = np.empty((r1 - r0, *shape[1:]), dtype)
        if out.nbytes:
            at = start + r0 * math.prod(shape[1:]) * dtype.itemsize
            storage.read_into(path, at, memoryview(out.reshape(-1).view(np.uint8)))
        return np.ascontiguousarray(out[(slice(None), *(slice(a, b) for a, b in rest))])

    return read


def _reader(path: str, name: str) -> Callable[..., np.ndarray]:
    """Reads tensor ``name`` of the file at ``path``: whole, or the region ``box`` (safetensors
    reads only the rows a region spans)."""

    def read(box: Box | None = None) -> np.ndarray:
        from safetensors import safe_open

        try:
            with safe_open(path, framework="numpy") as f:
                if box is None:
                    return f.get_tensor(name)
                return np.asarray(f.get_slice(name)[tuple(slice(a, b) for a, b in box)])
        except Exception as e:  # safetensors' SafetensorError is a bare Exception
            raise CorruptCheckpointError(f"tensor {name!r} of {path} cannot be read: {e}") from e

    return read
