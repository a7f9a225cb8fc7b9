"""Hugging Face PEFT LoRA adapters imported into MaxText's adapter layout (``lora.py``).

A PEFT adapter directory (``save_pretrained``) holds ``adapter_config.json`` (``r``,
``lora_alpha``, ``target_modules``, ...) and ``adapter_model.safetensors``, whose tensors are
named ``base_model.model.<module>.lora_A.weight`` (``[r, in]``) and ``...lora_B.weight``
(``[out, r]``). A conversion function (a dotted ``module:function`` path, as for
``checkpoint_conversion_fn``) turns the flat dict name -> weight into the adapter's params
tree (``lora_a.kernel = lora_A.T``, ``lora_b.kernel = lora_B.T``, stacked across layers as the
model stacks its kernels); with ``convert.ops`` nothing is read until it is written, one array
at a time. Tensors the function never looked at are an error listing them, as is one it wanted
that the file lacks. ``stepsafe.convert.peft_demo:from_peft`` maps the demo model's attention
projections; ``adapter_model.bin`` (a pickle) is refused: loading never runs code.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from stepsafe.convert.hf import map_weights, read_config, takes_config
from stepsafe.convert.lazy_leaf import OutLeaf
from stepsafe.convert.lora import (
    CONFIG_FILE,
    WEIGHTS_STEP,
    AdapterConfig,
    adapter_config,
    adapter_modules,
    check_ranks,
)
from stepsafe.convert.safetensors_files import read_safetensors
from stepsafe.convert.write_tree import write_tree
from stepsafe.errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    ConfigError,
    CorruptCheckpointError,
)
from stepsafe.storage import storage_for

PEFT_WEIGHTS = "adapter_model.safetensors"


def adapted_modules(names: Iterable[str]) -> list[str]:
    """PEFT's short names of the modules whose ``lora_A`` / ``lora_B`` weights are ``names``
    (``...self_attn.q_proj.lora_A.weight`` -> ``q_proj``), sorted."""
    found = set()
    for name in names:
        parts = name.split(".")
        if len(parts) >= 3 and parts[-2] in ("lora_A", "lora_B") and parts[-1] == "weight":
            found.add(parts[-3])
    return sorted(found)


def read_peft_config(
    peft_dir: str, module_names: Callable[[], list[str]] | None = None
) -> AdapterConfig:
    """The checked ``adapter_config.json`` of a PEFT adapter directory.

    Args:
        peft_dir (`str`): the PEFT adapter directory.
        module_names (`Callable`, *optional*): the modules the weights adapt; called when
            ``target_modules`` is a regex string (PEFT's other form), whose place it takes.

    Raises:
        ConfigError: missing, not JSON, or not plain LoRA (see ``lora.adapter_config``).
    """
    file = f"{str(peft_dir).rstrip('/')}/{CONFIG_FILE}"
    try:
        doc = read_config(file, required=True)
    except CheckpointNotFoundError:
        raise ConfigError(f"{peft_dir} has no {CONFIG_FILE}: not a PEFT adapter") from None
    except CorruptCheckpointError as e:
        raise ConfigError(f"cannot read {file}: {e}") from e
    if isinstance(doc, dict) and doc.get("peft_type", "LORA") != "LORA":
        raise ConfigError(f"{file}: peft_type {doc['peft_type']!r} is not LORA")
    if isinstance(doc, dict) and isinstance(doc.get("target_modules"), str) and module_names:
        doc = {**doc, "target_modules": module_names() or doc["target_modules"]}
    if isinstance(doc, dict) and isinstance(doc.get("target_modules"), list):
        doc = {**doc, "target_modules": sorted(doc["target_modules"])}  # PEFT saves a set
    return adapter_config(doc, file)


def read_peft_tensors(peft_dir: str) -> list[tuple[str, OutLeaf]]:
    """The tensors of ``adapter_model.safetensors``, each read only when made.

    Raises:
        CheckpointNotFoundError: no ``adapter_model.safetensors`` (``adapter_model.bin`` is
            a pickle: refused).
        CorruptCheckpointError: an unreadable file or a dtype not read here.
    """
    url = str(peft_dir)
    storage, path = storage_for(url if "://" in url else os.path.abspath(url))
    if not storage.exists(storage.join(path, PEFT_WEIGHTS)):
        pickle = storage.exists(storage.join(path, "adapter_model.bin"))
        why = " (adapter_model.bin is a pickle, never loaded: save it with safetensors)"
        raise CheckpointNotFoundError(f"{peft_dir} has no {PEFT_WEIGHTS}{why * pickle}")
    return read_safetensors(url, single=PEFT_WEIGHTS)


def import_peft(
    peft_dir: str,
    dst_adapter_dir: str,
    conversion_fn: Callable[[Any], Any],
    *,
    scan_axis: int | None = None,
    base_config: Mapping[str, Any] | None = None,
    on_bytes: Callable[[int], None] | None = None,
) -> AdapterConfig:
    """Write the PEFT adapter in ``peft_dir`` as a stepsafe adapter at ``dst_adapter_dir``
    (``<parent>/<lora_id>``: ``0/items``, then ``adapter_config.json`` with PEFT's keys).

    Args:
        peft_dir (`str`): a PEFT adapter directory (local or a bucket) (``adapter_config.json``,
            ``adapter_model.safetensors``).
        dst_adapter_dir (`str`): where the adapter goes (must not hold one), local or a bucket.
        conversion_fn (`Callable`): PEFT tensor name -> weight dict -> adapter params tree
            (``stepsafe.convert.peft_demo:from_peft`` for the demo model; a name resolves
            with ``stepsafe.convert.hf.conversion_function``).
        scan_axis (`int`, *optional*): the layer axis the function stacks along, recorded for
            merges (``lora_scan_axis``); None: the function's own ``scan_axis`` attribute
            when it has one (``peft_demo.from_peft``'s is 0), else nothing is recorded.
        base_config (`Mapping`, *optional*): the base model's Hugging Face ``config.json``
            (``hf.read_config``), given to a function that takes a ``config``: head counts
            are not in an adapter's weights (``stepsafe.convert.peft_llama:from_peft``).
        on_bytes (`Callable[[int], None]`, *optional*): called with each run of bytes written.

    Returns:
        `AdapterConfig`: the config written.

    Raises:
        ConfigError: no or an unsupported ``adapter_config.json`` (a regex string as
            ``target_modules`` is written as the list of modules the weights adapt); the
            function failed, wanted
            a tensor the file lacks, left tensors unmapped, or made ranks other than ``r``.
        CheckpointNotFoundError, CorruptCheckpointError: no or a bad safetensors file.
        CheckpointExistsError: ``dst_adapter_dir`` holds an adapter already.
    """
    tensors: list[tuple[str, OutLeaf]] = []

    def module_names() -> list[str]:
        tensors.extend(read_peft_tensors(peft_dir))
        return adapted_modules(name for name, _ in tensors)

    config = read_peft_config(peft_dir, module_names)
    storage, path = storage_for(str(dst_adapter_dir))
    config_file = storage.join(path, CONFIG_FILE)
    if storage.exists(config_file):
        raise CheckpointExistsError(f"{dst_adapter_dir} holds an adapter already ({CONFIG_FILE})")
    extra = {"config": dict(base_config) if base_config is not None else None}
    params = map_weights(
        tensors or read_peft_tensors(peft_dir), conversion_fn, str(peft_dir),
        **(extra if takes_config(conversion_fn) else {}),
    )  # fmt: skip
    modules = adapter_modules(params)
    if not modules:
        raise ConfigError(f"the conversion function made no lora pair of {peft_dir}")
    check_ranks(modules, config, str(peft_dir))
    custom: dict[str, Any] = {"lora": True, "peft_import": str(peft_dir)}
    if scan_axis is None:
        scan_axis = getattr(conversion_fn, "scan_axis", None)
    if scan_axis is not None:
        custom["lora_scan_axis"] = scan_axis
    write_tree(
        storage, storage.join(path, WEIGHTS_STEP), {"params": params}, step=0,
        custom_metadata=custom, on_bytes=on_bytes,
    )  # fmt: skip
    body = json.dumps(config.to_json(), indent=2, sort_keys=True).encode() + b"\n"
    storage.create_exclusive(config_file, body)
    return config
