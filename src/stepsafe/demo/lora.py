"""LoRA fine-tuning of the demo model: an adapter on its attention projections (the fused
``qkv`` and the ``out`` kernels), the base parameters frozen.

Which adapter (``lora_input_adapters_path``, MaxText's parent directory of ``<lora_id>/``):
    - ``lora_id`` set: ``<path>/<lora_id>``, loaded when it is there, else a new one;
    - unset: the only adapter under ``<path>``, or a new one named ``default`` when there is
      none (several: set ``lora_id``).
A new adapter needs ``lora_rank``; ``lora_alpha`` defaults to the rank (scale 1, the LoRA
paper's choice); its ``A`` is uniform in +-1/sqrt(in) and its ``B`` zero (PEFT's init), so
training starts from the base model exactly. A loaded adapter keeps its own rank and alpha:
``lora_rank`` / ``lora_alpha``, when set, must agree.

The run's state is ``{"step", "params" (the base, never updated), "lora_params",
"opt_state" (of lora_params only)}``: the run's checkpoints hold everything, so a resume is
exact. When the run ends (finished or stopped), the adapter is written in MaxText's layout to
``<base_output_directory>/<run_name>/lora/<step>/<lora_id>/`` (``adapter_config.json`` and
``0/items``); ``<run>/lora/<step>`` is itself a ``lora_input_adapters_path`` to go on from.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from stepsafe.config import Config
from stepsafe.convert.lora import (
    CONFIG_FILE,
    LORA_A,
    LORA_B,
    AdapterConfig,
    list_adapters,
    load_adapter,
    read_adapter_config,
    save_adapter,
)
from stepsafe.convert.peft_demo import SCAN_AXIS, TARGETS
from stepsafe.errors import ConfigError
from stepsafe.storage import storage_for

log = logging.getLogger("stepsafe")
NEW_ID = "default"  # PEFT's name for an adapter nobody named
LORA_DIR = "lora"  # <run>/lora/<step>/<lora_id>: the trained adapters


@dataclass(frozen=True)
class LoraPlan:
    """The adapter a run trains: its config, its id, and where it is read from (None: new)."""

    config: AdapterConfig
    lora_id: str
    source: str | None


def plan_lora(config: Config) -> LoraPlan | None:
    """The adapter ``config`` asks for (see the module's docstring); None without one.

    Raises:
        ConfigError: the directory is missing; an adapter directory without
            ``adapter_config.json``; several adapters and no ``lora_id``; a target module the
            demo model lacks; ``lora_rank`` / ``lora_alpha`` that differ from the adapter's;
            a new adapter without ``lora_rank``.
    """
    parent = config.lora_input_adapters_path
    if not parent:
        return None
    storage, root = storage_for(parent)
    ids = list_adapters(parent)  # refuses a missing directory
    lora_id = config.lora_id
    if not lora_id:
        if storage.exists(storage.join(root, CONFIG_FILE)):
            raise ConfigError(
                f"{parent} is an adapter itself; lora_input_adapters_path is its parent "
                f"directory: lora_input_adapters_path={os.path.dirname(parent.rstrip('/'))} "
                f"lora_id={os.path.basename(parent.rstrip('/'))}"
            )
        if len(ids) > 1:
            raise ConfigError(
                f"{parent} holds {len(ids)} adapters ({', '.join(ids)}): set lora_id to one"
            )
        lacking = [n for n in storage.list_dir(root) if storage.is_dir(storage.join(root, n))]
        if not ids and lacking:
            raise ConfigError(
                f"{storage.join(root, lacking[0])} has no {CONFIG_FILE}: a LoRA adapter is "
                f"<lora_id>/{CONFIG_FILE} plus <lora_id>/0/items"
            )
        lora_id = ids[0] if ids else NEW_ID
    adapter_dir = storage.join(root, lora_id)
    if storage.is_dir(adapter_dir):
        adapter = read_adapter_config(adapter_dir)  # refuses a missing adapter_config.json
        _check_agrees(config, adapter, adapter_dir)
        return LoraPlan(adapter, lora_id, adapter_dir)
    if config.lora_rank < 1:
        raise ConfigError(
            f"{parent} holds no adapter {lora_id!r}: set lora_rank (and lora_alpha) to start "
            f"a new one, or lora_id to one of {ids or 'its adapters'}"
        )
    alpha = config.lora_alpha or float(config.lora_rank)
    new = AdapterConfig(config.lora_rank, alpha, tuple(TARGETS), {"peft_type": "LORA"})
    return LoraPlan(new, lora_id, None)


def _check_agrees(config: Config, adapter: AdapterConfig, where: str) -> None:
    unknown = [t for t in adapter.target_modules if t not in TARGETS]
    if unknown:
        raise ConfigError(
            f"{where}: target module {unknown[0]!r} is not in the demo model (its adaptable "
            f"modules: {', '.join(TARGETS)})"
        )
    if config.lora_rank and config.lora_rank != adapter.r:
        raise ConfigError(
            f"lora_rank={config.lora_rank}, but the adapter {where} has rank r={adapter.r}: "
            "leave lora_rank unset to train it as it is"
        )
    if config.lora_alpha and config.lora_alpha != adapter.lora_alpha:
        raise ConfigError(
            f"lora_alpha={config.lora_alpha}, but the adapter {where} has lora_alpha="
            f"{adapter.lora_alpha}: leave lora_alpha unset"
        )


def _module(params: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        params = params[key]
    return params


def init_adapter(plan: LoraPlan, params: Any, key: jax.Array) -> dict[str, Any]:
    """A new adapter for ``params`` (the base, stacked along axis 0): for each target's
    kernel ``[L, in, out]``, ``A [L, in, r]`` uniform in +-1/sqrt(in) and ``B [L, r, out]``
    zero."""
    out: dict[str, Any] = {}
    keys = iter(jax.random.split(key, len(plan.config.target_modules)))
    for name in plan.config.target_modules:
        path = TARGETS[name]
        layers, fan_in, fan_out = _module(params, path)["kernel"].shape
        r = plan.config.r
        bound = 1.0 / jnp.sqrt(fan_in)
        a = jax.random.uniform(next(keys), (layers, fan_in, r), jnp.float32, -bound, bound)
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = {LORA_A: a, LORA_B: jnp.zeros((layers, r, fan_out), jnp.float32)}
    return out


def merged(params: Any, lora: Any, scale: float) -> Any:
    """``params`` with each adapted kernel ``W + A @ B * scale`` (per layer), for the forward
    pass: gradients reach ``A`` and ``B`` through it, the base is not changed."""
    out = jax.tree.map(lambda x: x, params)  # new containers, same arrays
    for path in TARGETS.values():
        try:
            pair = _module(lora, path)
        except (KeyError, TypeError):
            continue
        node = _module(out, path)
        delta = jnp.einsum("lir,lro->lio", pair[LORA_A], pair[LORA_B]) * scale
        node["kernel"] = node["kernel"] + delta.astype(node["kernel"].dtype)
    return out


def load_plan_adapter(plan: LoraPlan, target: Any) -> Any:
    """The adapter ``plan`` reads, onto ``target`` (shapes, dtypes, shardings).

    Raises:
        ConfigError, TargetMismatchError: its modules or shapes are not the plan's.
    """
    assert plan.source is not None
    _, params = load_adapter(plan.source, target)
    log.info("Loaded LoRA adapter %s (r=%d)", plan.source, plan.config.r)
    return params


def adapter_out_dir(config: Config, step: int, lora_id: str) -> str:
    """``<base_output_directory>/<run_name>/lora/<step>/<lora_id>``."""
    storage, base = storage_for(config.base_output_directory)
    return storage.join(base, config.run_name, LORA_DIR, str(step), lora_id)


def save_trained(config: Config, plan: LoraPlan, lora: Any, step: int) -> str | None:
    """Write the trained adapter at ``adapter_out_dir``; None when one is there already
    (a run resumed at its end saves nothing twice)."""
    where = adapter_out_dir(config, step, plan.lora_id)
    storage, path = storage_for(where)
    if storage.exists(storage.join(path, CONFIG_FILE)):
        log.info("LoRA adapter of step %d is at %s already", step, where)
        return None
    save_adapter(where, lora, plan.config, scan_axis=SCAN_AXIS)
    log.info("Saved LoRA adapter %r of step %d at %s", plan.lora_id, step, where)
    return where
