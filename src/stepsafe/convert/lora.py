"""LoRA adapters on disk, in MaxText's layout, saved and loaded with stepsafe's checkpoints.

    <lora_input_adapters_path>/           a parent directory: one adapter per subdirectory
        <lora_id>/
            adapter_config.json           PEFT's keys: r, lora_alpha, target_modules (others kept)
            0/                            a checkpoint at step 0 (MaxText's is Orbax's)
                _CHECKPOINT_METADATA
                items/                    the tree {"params": adapter params}

``adapter_config.json`` is written last: a directory without it is no adapter (MaxText skips
such directories; stepsafe says so).

The adapter's params mirror the base model's (``lora_utils.get_lora_abstract_state`` in
MaxText): every adapted module, a dict that holds ``kernel`` in the base params, holds
``{"lora_a.kernel": A, "lora_b.kernel": B}`` in the adapter, at the same key path. ``A`` has
the kernel's shape with its output axes replaced by the rank ``r``, ``B`` with its input axes
replaced by ``r``; stacked layers keep their layer axis where the kernel has it. Without the
layer axis, ``A`` is ``[in.., r]`` and ``B`` is ``[r, out..]``, and the kernel becomes
``kernel + (A ·r B) * lora_alpha / r`` (``lora_merge.py``). In PEFT's terms ``A = lora_A.T``
and ``B = lora_B.T``: kernels are ``[in, out]``, torch weights ``[out, in]``.
MaxText's tree also carries None at every other leaf of the base params; stepsafe writes only
the adapted modules and reads either (None leaves are passed by).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stepsafe.checkpoint import restore, save
from stepsafe.distributed import process_index
from stepsafe.errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    ConfigError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
)
from stepsafe.storage import storage_for

CONFIG_FILE = "adapter_config.json"
WEIGHTS_STEP = "0"  # the adapter's checkpoint: <lora_id>/0 (its items/ inside)
LORA_A, LORA_B = "lora_a.kernel", "lora_b.kernel"  # MaxText's names in an adapted module
_CONFIG_MAX_BYTES = 1 << 20


@dataclass(frozen=True)
class AdapterConfig:
    """An adapter's ``adapter_config.json``: rank ``r``, ``lora_alpha``, the PEFT names of the
    adapted modules, and every other key as found (kept when written back)."""

    r: int
    lora_alpha: float
    target_modules: tuple[str, ...]
    other: dict[str, Any] = field(default_factory=dict)

    @property
    def scale(self) -> float:
        """What ``A ·r B`` is multiplied by: ``lora_alpha / r`` (PEFT's ``scaling``)."""
        return self.lora_alpha / self.r

    def to_json(self) -> dict[str, Any]:
        return {
            **self.other,
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "target_modules": list(self.target_modules),
        }


def adapter_config(doc: Any, where: str) -> AdapterConfig:
    """``doc`` (a parsed ``adapter_config.json``) checked.

    Raises:
        ConfigError: not a mapping, ``r`` not a positive int, ``lora_alpha`` not a positive
            number, ``target_modules`` not a non-empty list of names, or a PEFT option that
            changes the arithmetic here (``use_rslora``, ``use_dora``, ``rank_pattern``,
            ``alpha_pattern``, ``fan_in_fan_out``, ``bias`` other than ``"none"``,
            ``layers_to_transform``: some layers only).
    """
    if not isinstance(doc, dict):
        raise ConfigError(f"{where} must hold a JSON object with r, lora_alpha, target_modules")
    r, alpha, targets = doc.get("r"), doc.get("lora_alpha"), doc.get("target_modules")
    if type(r) is not int or r < 1:
        raise ConfigError(f"{where}: r must be an integer >= 1, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not alpha > 0:
        raise ConfigError(f"{where}: lora_alpha must be a number > 0, got {alpha!r}")
    if alpha > 1e300 or not math.isfinite(alpha):  # a huge int is no float (OverflowError)
        raise ConfigError(f"{where}: lora_alpha must be finite, got {alpha!r}")
    if (
        not isinstance(targets, list)
        or not targets
        or not all(isinstance(t, str) and t for t in targets)
    ):
        raise ConfigError(
            f"{where}: target_modules must be a non-empty list of module names (a regex "
            f"string is not read here), got {targets!r}"
        )
    unsupported = {
        "use_rslora": lambda v: bool(v),
        "use_dora": lambda v: bool(v),
        "fan_in_fan_out": lambda v: bool(v),
        "rank_pattern": lambda v: bool(v),
        "alpha_pattern": lambda v: bool(v),
        "modules_to_save": lambda v: bool(v),
        "bias": lambda v: v not in (None, "none"),
        "lora_bias": lambda v: bool(v),
        "layer_replication": lambda v: bool(v),
        "layers_to_transform": lambda v: v is not None and v != [],
        "layers_pattern": lambda v: bool(v),
        "target_parameters": lambda v: bool(v),
        "trainable_token_indices": lambda v: bool(v),
        "alora_invocation_tokens": lambda v: bool(v),
        "use_qalora": lambda v: bool(v),
        "use_bdlora": lambda v: bool(v),
    }
    for key, bad in unsupported.items():
        if key in doc and bad(doc[key]):
            raise ConfigError(
                f"{where}: {key}={doc[key]!r} is not supported: stepsafe's adapters are "
                "plain LoRA (W + B·A·lora_alpha/r, one r and lora_alpha, no biases)"
            )
    other = {k: v for k, v in doc.items() if k not in ("r", "lora_alpha", "target_modules")}
    return AdapterConfig(r, alpha, tuple(targets), other)


def read_adapter_config(adapter_dir: str) -> AdapterConfig:
    """The ``adapter_config.json`` of the adapter at ``adapter_dir`` (``<parent>/<lora_id>``).

    Raises:
        ConfigError: the file is missing, not JSON, or not a valid config (``adapter_config``).
    """
    storage, path = storage_for(str(adapter_dir))
    file = storage.join(path, CONFIG_FILE)
    if not storage.exists(file):
        raise ConfigError(
            f"{adapter_dir} has no {CONFIG_FILE}: a LoRA adapter is <lora_id>/{CONFIG_FILE} "
            f"plus <lora_id>/{WEIGHTS_STEP}/items"
        )
    try:
        doc = json.loads(storage.read_bytes(file, limit=_CONFIG_MAX_BYTES))
    except (OSError, ValueError, CorruptCheckpointError) as e:
        raise ConfigError(f"{file} is not valid JSON: {e}") from e
    return adapter_config(doc, file)


def list_adapters(parent: str) -> list[str]:
    """The ``lora_id`` s under ``parent`` (subdirectories holding ``adapter_config.json``),
    sorted.

    Raises:
        ConfigError: ``parent`` is not a directory.
    """
    storage, path = storage_for(str(parent))
    if not storage.is_dir(path):
        raise ConfigError(f"LoRA adapters directory {parent} does not exist")
    return sorted(
        name
        for name in storage.list_dir(path)
        if storage.exists(storage.join(path, name, CONFIG_FILE))
    )


def load_adapters(parent: str) -> dict[str, tuple[AdapterConfig, Any]]:
    """Every adapter under ``parent`` (MaxText's ``lora_input_adapters_path``): lora_id ->
    (config, params as numpy arrays), read one after another.

    Raises:
        ConfigError, CheckpointNotFoundError, CorruptCheckpointError: as ``load_adapter``;
            ``parent`` is not a directory.
    """
    storage, path = storage_for(str(parent))
    return {i: load_adapter(storage.join(path, i)) for i in list_adapters(parent)}


def adapter_modules(params: Any, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], dict]:
    """Every adapted module of an adapter's ``params``: key path -> ``{lora_a.kernel,
    lora_b.kernel}``. None leaves are passed by (MaxText writes them).

    Raises:
        CorruptCheckpointError: a module with one of the pair, or one that is not an array,
            or a leaf that is no part of one (MaxText: "unexpected non-lora specific weights").
    """
    found: dict[tuple[str, ...], dict] = {}
    if not isinstance(params, dict):
        return found
    keys = set(params)
    if LORA_A in keys or LORA_B in keys:
        if not {LORA_A, LORA_B} <= keys:
            raise CorruptCheckpointError(
                f"adapter module {'/'.join(prefix)!r} holds one of {LORA_A}, {LORA_B}, not both"
            )
        for name in (LORA_A, LORA_B):
            if not hasattr(params[name], "shape") or not hasattr(params[name], "dtype"):
                raise CorruptCheckpointError(
                    f"adapter module {'/'.join(prefix)!r} holds a {type(params[name]).__name__} "
                    f"as {name}, not an array: is this an adapter?"
                )
        found[prefix] = {LORA_A: params[LORA_A], LORA_B: params[LORA_B]}
        keys -= {LORA_A, LORA_B}
    for key in sorted(keys, key=str):
        child = params[key]
        if isinstance(child, dict):
            found.update(adapter_modules(child, (*prefix, str(key))))
        elif child is not None:
            raise CorruptCheckpointError(
                f"adapter leaf {'/'.join((*prefix, str(key)))!r} is not a LoRA weight "
                f"({LORA_A} / {LORA_B}): is this an adapter?"
            )
    return found


def check_ranks(modules: dict[tuple[str, ...], dict], config: AdapterConfig, where: str) -> None:
    """Every module's ``A`` ends with the rank and ``B`` has it in its first two axes (the
    first, or the second behind a leading layer axis).

    Raises:
        ConfigError: a rank that is not ``config.r``.
    """
    for path, pair in modules.items():
        a, b = tuple(pair[LORA_A].shape), tuple(pair[LORA_B].shape)
        if len(a) < 2 or len(b) < 2 or a[-1] != config.r or config.r not in b[:2]:
            raise ConfigError(
                f"{where}: module {'/'.join(path)!r} has {LORA_A} {a} and {LORA_B} {b}, not of "
                f"rank r={config.r} as {CONFIG_FILE} says"
            )


def save_adapter(
    adapter_dir: str, params: Any, config: AdapterConfig, *, scan_axis: int | None = None
) -> None:
    """Write an adapter at ``adapter_dir`` (``<parent>/<lora_id>``): its params as the
    checkpoint ``0`` (``{"params": params}``), then ``adapter_config.json``.

    Under several JAX processes every process calls it alike (``stepsafe.save``); process 0
    writes the config.

    Args:
        adapter_dir (`str`): the adapter's directory (must not hold one yet).
        params (`Any`): the adapter's params (numpy or JAX arrays), see the module's docstring.
        config (`AdapterConfig`): rank, alpha, target modules.
        scan_axis (`int`, *optional*): the layer axis of stacked modules, recorded in the
            checkpoint's metadata (``lora_scan_axis``) for merges.

    Raises:
        CheckpointExistsError: an adapter (its config) is there already, or a checkpoint of
            other weights (one of these weights, left by a save stopped before its config
            was written, is kept and the config written).
        ConfigError: ``config`` is not valid (``adapter_config``); the params' ranks are
            not ``config.r``.
        CorruptCheckpointError: ``params`` is not an adapter tree.
    """
    storage, path = storage_for(str(adapter_dir))
    config_file = storage.join(path, CONFIG_FILE)
    if storage.exists(config_file):
        raise CheckpointExistsError(f"{adapter_dir} holds an adapter already ({CONFIG_FILE})")
    config = adapter_config(config.to_json(), "the adapter config to save")
    modules = adapter_modules(params)
    if not modules:
        raise ConfigError(f"no {LORA_A} / {LORA_B} pair in the adapter params to save")
    check_ranks(modules, config, str(adapter_dir))
    custom = {"lora": True} if scan_axis is None else {"lora": True, "lora_scan_axis": scan_axis}
    weights = storage.join(path, WEIGHTS_STEP)
    if not _saved_already(weights, params):  # else a save cut before its config: finish it
        save(weights, {"params": params}, custom_metadata=custom)
    if process_index() == 0:
        body = json.dumps(config.to_json(), indent=2, sort_keys=True).encode() + b"\n"
        try:
            storage.create_exclusive(config_file, body)
        except FileExistsError as e:
            raise CheckpointExistsError(f"{config_file} appeared while saving: left as is") from e


def holds_weights(weights: str, params: Any) -> bool | None:
    """Whether the committed checkpoint ``weights`` (an adapter's ``<lora_id>/0``) holds the
    adapter ``params`` bit for bit; None when there is no committed checkpoint there.

    Arrays spread over several processes are not compared (False).
    """
    try:
        saved = adapter_modules(restore(weights, select="params"))
    except (CheckpointNotFoundError, IncompleteCheckpointError):
        return None  # none, or a cut save (stepsafe.save refuses to write over it)
    except CorruptCheckpointError:
        return False
    modules = adapter_modules(params)

    def same(x: Any, y: Any) -> bool:
        try:
            x, y = np.asarray(x), np.asarray(y)
        except RuntimeError:  # an array spread over processes
            return False
        return x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()

    return saved.keys() == modules.keys() and all(
        same(saved[m][k], modules[m][k]) for m in modules for k in (LORA_A, LORA_B)
    )


def _saved_already(weights: str, params: Any) -> bool:
    """Whether a save stopped between its checkpoint and its config left these ``params`` at
    ``weights``; False when there is no checkpoint there.

    Raises:
        CheckpointExistsError: it holds other weights.
    """
    held = holds_weights(weights, params)
    if held is False:
        raise CheckpointExistsError(
            f"{weights} holds other weights, and no {CONFIG_FILE} beside it: save the adapter "
            "to another directory, or move that one away"
        )
    return bool(held)


def load_adapter(adapter_dir: str, target: Any = None) -> tuple[AdapterConfig, Any]:
    """The config and params of the adapter at ``adapter_dir``, read with ``stepsafe.restore``
    of ``<adapter_dir>/0`` (a stepsafe checkpoint, or MaxText's Orbax one where restore reads
    those).

    Args:
        adapter_dir (`str`): ``<parent>/<lora_id>``.
        target (`Any`, *optional*): the params' tree as wanted (shapes, dtypes, shardings);
            None: numpy arrays as saved.

    Raises:
        ConfigError: no or a bad ``adapter_config.json``; no adapted module; ranks that are
            not ``r``.
        CheckpointNotFoundError, CorruptCheckpointError, TargetMismatchError: as
            ``stepsafe.restore`` raises them.
    """
    config = read_adapter_config(adapter_dir)
    storage, path = storage_for(str(adapter_dir))
    weights = storage.join(path, WEIGHTS_STEP)
    if target is None:
        params = restore(weights, select="params")
    else:
        params = restore(weights, target, select="params")
    modules = adapter_modules(params)
    if not modules:
        raise ConfigError(f"{weights} holds no {LORA_A} / {LORA_B} pair: not a LoRA adapter")
    check_ranks(modules, config, str(adapter_dir))
    return config, params
