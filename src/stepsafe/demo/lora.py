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
The run's checkpoints record the adapter's id, rank, alpha and modules (``run_record``): a
resume with other LoRA flags is refused, as is a fresh start where the run's adapters are.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils

from stepsafe.checkpoint import metadata
from stepsafe.config import Config
from stepsafe.convert.lora import (
    CONFIG_FILE,
    LORA_A,
    LORA_B,
    WEIGHTS_STEP,
    AdapterConfig,
    adapter_modules,
    holds_weights,
    list_adapters,
    load_adapter,
    read_adapter_config,
    save_adapter,
)
from stepsafe.convert.peft_demo import SCAN_AXIS, TARGETS
from stepsafe.errors import CheckpointExistsError, ConfigError, StepsafeError
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
        _check_modules(adapter, adapter_dir)
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


def _check_modules(adapter: AdapterConfig, adapter_dir: str) -> None:
    """The adapter's weights adapt the modules its ``target_modules`` name, no more, no less
    (read from its checkpoint's metadata: no array is read)."""
    storage, path = storage_for(adapter_dir)
    try:
        tree = metadata(storage.join(path, WEIGHTS_STEP), select="params")
    except StepsafeError:  # no or a bad checkpoint: loading it says so
        return
    have = sorted("/".join(p) for p in adapter_modules(tree))
    want = sorted("/".join(TARGETS[t]) for t in set(adapter.target_modules))
    if have != want:
        raise ConfigError(
            f"{adapter_dir}: its {CONFIG_FILE} names target_modules "
            f"{list(adapter.target_modules)}, but its weights adapt {have or 'nothing'}: "
            f"correct its target_modules"
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


def check_fresh_start(config: Config, plan: LoraPlan) -> None:
    """A run that starts afresh (no checkpoint of its own) must not find adapters it would
    save beside: ``<run>/lora/<step>/<lora_id>`` of an earlier run is never replaced, and the
    new one would have nowhere to go.

    Raises:
        ConfigError: ``<run>/lora`` holds an adapter ``lora_id`` already.
    """
    storage, base = storage_for(config.base_output_directory)
    lora_dir = storage.join(base, config.run_name, LORA_DIR)
    if not storage.is_dir(lora_dir):
        return
    for step in storage.list_dir(lora_dir):
        if storage.exists(storage.join(lora_dir, step, plan.lora_id, CONFIG_FILE)):
            where = storage.join(lora_dir, step)
            raise ConfigError(
                f"{where} holds the adapter {plan.lora_id!r} of an earlier run, and this one "
                f"starts afresh: set another run_name (lora_input_adapters_path={where} goes "
                "on from that adapter)"
            )


def save_trained(config: Config, plan: LoraPlan, lora: Any, step: int) -> str | None:
    """Write the trained adapter at ``adapter_out_dir``; None when it is there already (a run
    resumed at its end saves nothing twice).

    Raises:
        CheckpointExistsError: another adapter is there (never replaced).
    """
    where = adapter_out_dir(config, step, plan.lora_id)
    storage, path = storage_for(where)
    if storage.exists(storage.join(path, CONFIG_FILE)):
        if jax.process_count() > 1:  # every process compares the whole adapter (it is small)
            lora = multihost_utils.process_allgather(lora, tiled=True)
        if holds_weights(storage.join(path, WEIGHTS_STEP), lora):
            log.info("LoRA adapter of step %d is at %s already", step, where)
            return None
        raise CheckpointExistsError(
            f"{where} holds another adapter, left as is: the one trained is in the run's "
            f"checkpoint of step {step}; set another run_name to save it"
        )
    save_adapter(where, lora, plan.config, scan_axis=SCAN_AXIS)
    log.info("Saved LoRA adapter %r of step %d at %s", plan.lora_id, step, where)
    return where


def run_record(plan: LoraPlan | None) -> dict[str, Any] | None:
    """What a LoRA run's checkpoints record of the adapter it trains (their custom metadata's
    ``lora``): its id, rank, alpha and modules, none of which the state's arrays all show;
    None without an adapter."""
    if plan is None:
        return None
    c = plan.config
    modules = sorted(c.target_modules)
    return {"lora": {"lora_id": plan.lora_id, "r": c.r, "lora_alpha": c.lora_alpha,
                     "target_modules": modules}}  # fmt: skip


def check_resume(plan: LoraPlan | None, custom_metadata: dict[str, Any], where: str) -> None:
    """A resume goes on with the adapter the run's checkpoint at ``where`` was training (its
    ``custom_metadata``), or without one as it was: another rank, alpha, id or modules would
    change the model silently (alpha, id) or fail on its arrays.

    Raises:
        ConfigError: the LoRA flags name another adapter than the checkpoint's, or one where
            it had none, or none where it had one.
    """
    was = custom_metadata.get("lora")
    now = (run_record(plan) or {}).get("lora")
    if was == now:
        return
    if not isinstance(was, dict):
        raise ConfigError(
            f"{where} was saved by a run without a LoRA adapter: resume it without "
            "lora_input_adapters_path, or set another run_name for the LoRA run"
        )
    flags = " ".join(f"{k}={was.get(k)}" for k in ("lora_id", "r", "lora_alpha"))
    flags = flags.replace(" r=", " lora_rank=")
    if now is None:
        raise ConfigError(
            f"{where} was saved training the LoRA adapter {flags} (target_modules "
            f"{was.get('target_modules')}): resume it with lora_input_adapters_path and "
            "those flags, or set another run_name"
        )
    mine = " ".join(f"{k}={now[k]}" for k in ("lora_id", "r", "lora_alpha"))
    raise ConfigError(
        f"{where} was saved training the LoRA adapter {flags} (target_modules "
        f"{was.get('target_modules')}), not {mine.replace(' r=', ' lora_rank=')} (target_modules "
        f"{now['target_modules']}): resume with the run's adapter, or set another run_name"
    )
