"""Merge a LoRA adapter into base weights: ``kernel + (A ·r B) * lora_alpha / r``, in the
kernel's own orientation (``[in.., out..]``; PEFT's ``W + B @ A * scaling`` on ``[out, in]``
weights is the same sum transposed), one array at a time.

The output checkpoint is the base one with each adapted ``kernel`` replaced by a lazy array
(``OutLeaf``) that reads the kernel and its pair of LoRA weights only when the writer reaches
it: the peak memory is about one kernel (and its float32 copy when it is narrower), whatever
the model's size. The arithmetic is float32 (float64 for a float64 kernel): ``A ·r B`` by
``np.tensordot`` (one matrix product per layer of stacked kernels), times ``lora_alpha / r``
as that float, added to the kernel, then cast back to the kernel's dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from stepsafe import knobs
from stepsafe.convert.lazy_leaf import OutLeaf
from stepsafe.convert.lora import (
    LORA_A,
    LORA_B,
    WEIGHTS_STEP,
    adapter_modules,
    check_ranks,
    read_adapter_config,
)
from stepsafe.convert.source import (
    open_source,
    source_custom_metadata,
    source_extra_files,
    source_step,
    source_tree,
)
from stepsafe.convert.write_tree import write_tree
from stepsafe.errors import ConfigError
from stepsafe.storage import storage_for

DEFAULT_SCAN_AXIS = 1  # MaxText's param_scan_axis


@dataclass
class Merged:
    """What ``merge_lora`` wrote: where, which step, the array bytes, the modules merged."""

    path: str
    step: int | None
    nbytes: int
    modules: list[str]


def _compute_dtype(dtype: np.dtype) -> np.dtype:
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def layer_axis(
    w: tuple[int, ...], a: tuple[int, ...], b: tuple[int, ...], scan_axis: int
) -> int | None:
    """Where the layer axis of a kernel of shape ``w`` is, given its LoRA pair's shapes:
    None when it is not stacked.

    Raises:
        ConfigError: the shapes do not fit together (kernel ``[in.., out..]``, ``A [in.., r]``
            and ``B [r, out..]``, each with the layer axis at ``scan_axis`` when stacked).
    """
    stacked = len(a) + len(b) - 2 == len(w) + 1
    axis = scan_axis % len(w) if stacked and -len(w) <= scan_axis < len(w) else None
    if stacked and axis is not None:
        w_l, a_l, b_l = (tuple(s[:axis] + s[axis + 1 :]) for s in (w, a, b))
        ok = (w[axis] == a[axis] == b[axis]) and (a_l[:-1] + b_l[1:] == w_l) and a_l[-1] == b_l[0]
    else:
        ok = not stacked and a[:-1] + b[1:] == w and a[-1] == b[0]
    if not ok:
        raise ConfigError(
            f"LoRA weights {LORA_A} {a} and {LORA_B} {b} do not fit a kernel {w} (A is the "
            f"kernel's shape with its output axes replaced by r, B with its input axes; "
            f"stacked layers along scan_axis={scan_axis}: is that the model's layer axis?)"
        )
    return axis if stacked else None


def merged_kernel(
    w: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    scale: float,
    axis: int | None,
    *,
    in_place: bool = False,
) -> np.ndarray:
    """``w + (a ·r b) * scale`` in ``w``'s dtype, computed in float32 (float64 for float64),
    one layer at a time when ``axis`` (the layer axis) is given.

    ``w`` is left as it is unless ``in_place`` (the merge's own freshly read kernel: no copy
    of it is made when it is float32 already)."""
    ct = _compute_dtype(w.dtype)
    mine = in_place and w.dtype == ct and w.flags.writeable
    acc = w if mine else np.array(w, dtype=ct)
    a, b, s = a.astype(ct, copy=False), b.astype(ct, copy=False), ct.type(scale)
    if axis is None:
        acc += np.tensordot(a, b, axes=1) * s
    else:
        for i in range(w.shape[axis]):
            at = (slice(None),) * axis + (i,)
            acc[at] += np.tensordot(a[at], b[at], axes=1) * s
    return acc if acc.dtype == w.dtype else acc.astype(w.dtype)


def merge_lora(
    base_src: str,
    adapter_dir: str,
    dst: str,
    *,
    params_key: str = "params",
    scan_axis: int | None = None,
    param_only: bool = False,
    data_file_size_bytes: int | None = None,
    on_bytes: Callable[[int], None] | None = None,
) -> Merged:
    """Write checkpoint ``base_src`` with the adapter at ``adapter_dir`` merged into its
    parameters, as a new checkpoint at ``dst``.

    Args:
        base_src (`str`): a committed checkpoint (a step, or a run: its latest step), whole
            state or param-only.
        adapter_dir (`str`): ``<lora_input_adapters_path>/<lora_id>`` (``adapter_config.json``
            and ``0/items``).
        dst (`str`): where the merged checkpoint goes (must not exist), local or a bucket URL.
        params_key (`str`): the parameters' key at the top of the base state (the whole tree
            when it has none).
        scan_axis (`int`, *optional*): the layer axis of stacked kernels; None: the one the
            adapter recorded (``lora_scan_axis``), else MaxText's 1 (stepsafe's demo: 0).
        param_only (`bool`): write ``{params_key: merged params}`` only, as step 0.
        data_file_size_bytes (`int`, *optional*): where data files split; None: the default.
        on_bytes (`Callable[[int], None]`, *optional*): called with each run of bytes written.

    Returns:
        `Merged`: where and what was written.

    Raises:
        ConfigError: a bad ``adapter_config.json``; an adapted module the base params lack,
            or that holds no ``kernel``; shapes that do not fit; ranks that are not ``r``;
            ``scan_axis`` other than the one the adapter recorded.
        CheckpointNotFoundError, CorruptCheckpointError: as reading either source raises them.
        CheckpointExistsError: ``dst`` holds a committed checkpoint already.
    """
    config = read_adapter_config(adapter_dir)
    storage, apath = storage_for(str(adapter_dir))
    adapter = open_source(storage.join(apath, WEIGHTS_STEP))
    recorded = source_custom_metadata(adapter).get("lora_scan_axis")
    if recorded is not None and type(recorded) is not int:
        raise ConfigError(
            f"{adapter_dir} records lora_scan_axis={recorded!r}, not an integer: pass scan_axis"
        )
    if scan_axis is not None and recorded is not None and scan_axis != recorded:
        raise ConfigError(
            f"scan_axis={scan_axis}, but the adapter {adapter_dir} was saved with its layers "
            f"along axis {recorded}: leave scan_axis unset"
        )
    axis_hint = scan_axis if scan_axis is not None else recorded
    axis_hint = DEFAULT_SCAN_AXIS if axis_hint is None else int(axis_hint)
    atree = source_tree(adapter)
    modules = adapter_modules(atree.get("params") if isinstance(atree, dict) else None)
    if not modules:
        raise ConfigError(f"{adapter.path} holds no {LORA_A} / {LORA_B} pair: not an adapter")
    check_ranks(modules, config, str(adapter_dir))

    reader = open_source(base_src)
    tree = source_tree(reader)
    has_key = isinstance(tree, dict) and params_key in tree
    params = tree[params_key] if has_key else tree
    for path, pair in modules.items():
        _replace_kernel(params, path, pair, config.scale, axis_hint)
    step = source_step(reader)
    extras: dict[str, bytes] = {}
    if param_only:
        tree, step = {params_key: params}, 0
    elif has_key:
        tree = {**tree, params_key: params}
        extras = source_extra_files(reader)
    else:
        tree = params
    custom = source_custom_metadata(reader)
    custom["lora_merged"] = str(adapter_dir)
    out_storage, out_path = storage_for(str(dst))
    if data_file_size_bytes is None and "://" in str(dst):
        data_file_size_bytes = int(knobs.CONVERT_BUCKET_FILE_BYTES)
    nbytes = write_tree(
        out_storage, out_path, tree, step=step, custom_metadata=custom, extra_files=extras,
        file_size=data_file_size_bytes, on_bytes=on_bytes,
    )  # fmt: skip
    return Merged(out_path, step, nbytes, ["/".join(p) for p in modules])


def _replace_kernel(
    params: Any, path: tuple[str, ...], pair: dict, scale: float, scan_axis: int
) -> None:
    """Put a lazy merged kernel in place of ``params``'s kernel at ``path``."""
    node = params
    for key in path:
        if not isinstance(node, dict) or key not in node:
            raise ConfigError(
                f"the adapter adapts module {'/'.join(path)!r}, which the base params lack: "
                "is it this model's adapter?"
            )
        node = node[key]
    w = node.get("kernel") if isinstance(node, dict) else None
    if not isinstance(w, OutLeaf):
        raise ConfigError(f"base module {'/'.join(path)!r} holds no kernel array to merge into")
    if not (np.issubdtype(w.dtype, np.floating) or w.dtype.kind == "V" or "float" in str(w.dtype)):
        raise ConfigError(f"base kernel {'/'.join(path)!r} is {w.dtype}, not floating")
    a, b = pair[LORA_A], pair[LORA_B]
    axis = layer_axis(w.shape, tuple(a.shape), tuple(b.shape), scan_axis)

    def make(w: OutLeaf = w, a: Any = a, b: Any = b) -> np.ndarray:
        kernel = np.asarray(w.make())  # read for this merge alone: summed into in place
        return merged_kernel(
            kernel, np.asarray(a.make()), np.asarray(b.make()), scale, axis, in_place=True
        )

    node["kernel"] = OutLeaf(w.shape, w.dtype, make)
