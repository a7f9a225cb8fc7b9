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

import json
import os
import struct
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from stepsafe.convert.lazy_leaf import OutLeaf, grouped
from stepsafe.errors import ConfigError, CorruptCheckpointError, ManifestError, StepsafeError
from stepsafe.format.manifest import Box
from stepsafe.storage import storage_for

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
HF_SHARD_BYTES = 5 * 10**9  # Hugging Face's "5GB" (huggingface_hub's and transformers 4's)

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
) -> list[str]:
    """Write ``tensors`` (name, array to make) as a Hugging Face safetensors directory; the
    files written.

    Raises:
        ConfigError: ``directory`` is a bucket URL (write locally, then upload), a name is
            repeated, a dtype safetensors cannot hold, or ``max_shard_bytes`` < 1.
        CheckpointExistsError: ``directory`` exists.
    """
    if "://" in str(directory):
        raise ConfigError(
            f"safetensors are written to a local directory, not {directory}: write locally, "
            "then upload the directory"
        )
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
    storage, path = storage_for(os.path.abspath(str(directory)))
    with storage.transaction(path) as txn:
        for file, group in zip(files, groups):
            txn.write_file(file, _file_bytes(group, on_bytes))
        if len(files) > 1:
            index = {
                "metadata": {"total_size": sum(leaf.nbytes for _, leaf in tensors)},
                "weight_map": {n: f for f, g in zip(files, groups) for n, _ in g},
            }
            txn.write_file(INDEX, [json.dumps(index, indent=2).encode()])
        txn.commit()
    return files + ([INDEX] if len(files) > 1 else [])


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


def read_safetensors(directory: str) -> list[tuple[str, OutLeaf]]:
    """The tensors of a Hugging Face model directory (``model.safetensors``, or the files its
    ``model.safetensors.index.json`` names, each holding the tensors it says), each read only
    when made.

    Raises:
        CheckpointNotFoundError: neither file is there.
        CorruptCheckpointError: the index or a file's header is unreadable, a file lacks a
            tensor the index puts there, a tensor is in two files, or a dtype not read here.
        StepsafeError: the safetensors library is not installed.
    """
    import ml_dtypes  # noqa: F401  (numpy reads bfloat16 once ml_dtypes is loaded)

    try:
        from safetensors import safe_open
    except ImportError as e:
        raise StepsafeError(
            "reading safetensors needs the safetensors package: pip install 'stepsafe[safetensors]'"
        ) from e
    from stepsafe.errors import CheckpointNotFoundError

    wanted = _files_of(str(directory), CheckpointNotFoundError)
    out: list[tuple[str, OutLeaf]] = []
    seen: set[str] = set()
    for file, names in wanted.items():
        path = os.path.join(str(directory), file)
        try:
            with safe_open(path, framework="numpy") as f:
                held = list(f.keys())
                for name in held if names is None else names:
                    if name not in held:
                        raise CorruptCheckpointError(
                            f"{directory}/{INDEX} puts tensor {name!r} in {file}, which lacks it"
                        )
                    if name in seen:
                        raise CorruptCheckpointError(
                            f"tensor {name!r} is in two files of {directory}"
                        )
                    seen.add(name)
                    s = f.get_slice(name)
                    dtype = _numpy_dtype(name, s.get_dtype())
                    shape = tuple(int(n) for n in s.get_shape())
                    read = _reader(path, name)
                    out.append((name, OutLeaf(shape, dtype, read, box=read)))
        except StepsafeError:
            raise
        except Exception as e:  # safetensors' SafetensorError is a bare Exception
            raise CorruptCheckpointError(f"{path} is not a readable safetensors file: {e}") from e
    return out


def _files_of(directory: str, missing: type[Exception]) -> dict[str, list[str] | None]:
    """Each file to read and the tensors in it (None: all it holds)."""
    index = os.path.join(directory, INDEX)
    if os.path.exists(index):
        try:
            with open(index, "rb") as f:
                weight_map = json.loads(f.read(1 << 28))["weight_map"]
            files: dict[str, list[str] | None] = {}
            for name, file in weight_map.items():
                files.setdefault(str(file), []).append(str(name))  # type: ignore[union-attr]
            return files
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CorruptCheckpointError(f"{index} is not a valid index: {e}") from e
    if os.path.exists(os.path.join(directory, SINGLE)):
        return {SINGLE: None}
    raise missing(f"{directory} holds neither {SINGLE} nor {INDEX}: not a Hugging Face model")


def _numpy_dtype(name: str, st: str) -> np.dtype:
    import ml_dtypes

    for np_name, st_name in _DTYPES.items():
        if st_name == st:
            return np.dtype(getattr(ml_dtypes, np_name, np_name))
    raise CorruptCheckpointError(f"tensor {name!r} has safetensors dtype {st}, not read here")


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
