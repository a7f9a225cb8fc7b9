"""The demo trainer: the whole checkpointing life of a run, in one loop.

Start-up follows the loading priority (resume this run > load_parameters_path /
load_full_state_path > scratch); every ``checkpoint_period`` steps an async save; Ctrl+C,
SIGTERM or the wall-clock limit save at the current step and stop; the end saves once more.
With ``lora_input_adapters_path`` only a LoRA adapter on the attention projections trains, the
base parameters frozen, and the adapter is written in MaxText's layout when the run ends
(``demo.lora``).
The step stored in the state is the source of truth for where training resumes.

Under ``jax.distributed`` (``demo.distributed``) every process runs this same loop on a
(data, model) mesh over all devices (``demo.sharding``); a stop asked on any one process stops
all of them at the same step (``StopRequest.check``), and they save it together.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec
from rich.console import Console

from stepsafe.checkpoint import info
from stepsafe.config import Config
from stepsafe.convert import load_parameters
from stepsafe.convert.hf import conversion_function, load_safetensors_parameters
from stepsafe.demo.data import SyntheticData
from stepsafe.demo.distributed import start_distributed
from stepsafe.demo.lora import (
    LoraPlan,
    check_fresh_start,
    check_resume,
    init_adapter,
    load_plan_adapter,
    merged,
    plan_lora,
    run_record,
    save_trained,
)
from stepsafe.demo.model import SCAN_AXIS, init_params, loss_fn
from stepsafe.demo.sharding import (
    batch_sharding,
    global_batch,
    make_mesh,
    state_shardings,
    with_shardings,
)
from stepsafe.errors import StepsafeError
from stepsafe.manager import (
    CheckpointManager,
    ManagerOptions,
    StopRequest,
    load_initial_state,
    run_checkpoint_dir,
)

log = logging.getLogger("stepsafe")


def local_tier_options(config: Config) -> dict[str, Any]:
    """``ManagerOptions`` fields of the local tier, for either mode (none without one): this
    process's directory is ``<local_checkpoint_directory>/<run_name>``, and under several
    processes ``.../<run_name>/process_<p>``, so that processes sharing a host never share a
    directory."""
    if not (config.enable_emergency_checkpoint or config.enable_multi_tier_checkpointing):
        return {}
    directory = os.path.join(config.local_checkpoint_directory, config.run_name)
    if jax.process_count() > 1:
        directory = os.path.join(directory, f"process_{jax.process_index()}")
    return {
        "local_directory": directory,
        "local_save_interval_steps": config.local_checkpoint_period,
        "local_max_to_keep": config.local_checkpoint_max_to_keep,
        "multi_tier": config.enable_multi_tier_checkpointing,
        "backup_interval_minutes": config.multi_tier_checkpointing_backup_interval_minutes,
        "backup_interval_steps": config.multi_tier_checkpointing_backup_interval_steps,
    }


def parameters_loader(config: Config) -> Callable[[str, Any], Any]:
    """How ``load_parameters_path`` is read: a checkpoint of either kind (layers stacked along
    the model's axis, or unstacked), or a Hugging Face model through the conversion function."""
    if config.source_checkpoint_layout == "safetensors":
        assert config.checkpoint_conversion_fn is not None  # checked with the flags
        fn = conversion_function(config.checkpoint_conversion_fn)
        return lambda path, target: load_safetensors_parameters(path, target, fn)
    return partial(load_parameters, scan_axis=SCAN_AXIS)


def learning_rate_schedule(config: Config) -> optax.Schedule:
    """Linear warmup from 0 to the peak, then cosine decay to 0 at ``steps``."""
    return optax.warmup_cosine_decay_schedule(
        0.0, config.learning_rate, config.warmup_steps, max(config.steps, config.warmup_steps + 1)
    )


def make_optimizer(config: Config) -> optax.GradientTransformation:
    return optax.adamw(learning_rate_schedule(config), weight_decay=config.adam_weight_decay)


def init_state(config: Config, key: jax.Array, plan: LoraPlan | None = None) -> dict[str, Any]:
    params = init_params(config, key)
    if plan is None:
        return state_from_params(config, params)
    return lora_state(config, params, init_adapter(plan, params, jax.random.fold_in(key, 1)))


def state_from_params(config: Config, params: Any) -> dict[str, Any]:
    return {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "opt_state": make_optimizer(config).init(params),
    }


def lora_state(config: Config, params: Any, lora: Any) -> dict[str, Any]:
    """A LoRA run's state: the base ``params`` (frozen), the adapter, and the optimizer's
    state of the adapter only."""
    return {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "lora_params": lora,
        "opt_state": make_optimizer(config).init(lora),
    }


def train_step(
    config: Config, state: dict[str, Any], batch: jax.Array, scale: float | None = None
) -> tuple[dict, jax.Array]:
    if scale is not None:  # LoRA: only the adapter is trained
        return lora_train_step(config, scale, state, batch)
    loss, grads = jax.value_and_grad(partial(loss_fn, config))(state["params"], batch)
    updates, opt_state = make_optimizer(config).update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, loss


def lora_train_step(
    config: Config, scale: float, state: dict[str, Any], batch: jax.Array
) -> tuple[dict, jax.Array]:
    """One step of the adapter: the loss of the merged kernels, its gradient with respect to
    the adapter only; the base parameters pass through unchanged."""
    base = state["params"]

    def loss_of(lora: Any) -> jax.Array:
        return loss_fn(config, merged(base, lora, scale), batch)

    loss, grads = jax.value_and_grad(loss_of)(state["lora_params"])
    updates, opt_state = make_optimizer(config).update(
        grads, state["opt_state"], state["lora_params"]
    )
    lora = optax.apply_updates(state["lora_params"], updates)
    new = {"step": state["step"] + 1, "params": base, "lora_params": lora, "opt_state": opt_state}
    return new, loss


@dataclass
class TrainResult:
    state: dict[str, Any]
    start_step: int
    end_step: int
    source: str
    stopped_by: str | None
    losses: list[float]


def train(config: Config, *, console: Console | None = None) -> TrainResult:
    """Train ``config.steps`` steps, resuming or loading as the loading priority says.

    Args:
        config: the run's flags.
        console: draw a progress bar with the loss there (log through the same console, e.g.
            ``rich.logging.RichHandler``, so log lines print above it); None: a log line per
            ``log_period`` steps.

    Returns ``stopped_by`` None only when the run reached ``steps``; otherwise it holds
    ``StopRequest.reason`` and the checkpoint at ``end_step`` has committed.
    """
    plan = plan_lora(config)  # refuses a bad adapter before anything starts
    start_distributed(config)
    mesh = make_mesh()
    if jax.process_count() > 1:
        log.info(
            "Process %d of %d (pid %d): %d of %d devices, mesh %s",
            jax.process_index(), jax.process_count(), os.getpid(), jax.local_device_count(),
            jax.device_count(), dict(mesh.shape),
        )  # fmt: skip
    manager = CheckpointManager(
        run_checkpoint_dir(config.base_output_directory, config.run_name),
        ManagerOptions(
            enable_checkpointing=config.enable_checkpointing,
            async_save=config.async_checkpointing,
            save_interval_steps=config.checkpoint_period,
            max_to_keep=config.max_num_checkpoints_to_keep or 0,
            data_file_size_bytes=config.checkpoint_storage_target_data_file_size_bytes,
            concurrent_bytes=config.checkpoint_storage_concurrent_gb * 10**9,
            enable_single_replica_ckpt_restoring=config.enable_single_replica_ckpt_restoring,
            replica_axis_index=config.replica_axis_index,
            **local_tier_options(config),
        ),
    )
    try:  # until the run's loop holds the manager: a failed start must release its lease
        data = SyntheticData(  # the global batch; each process places its own devices' rows
            config.seed,
            config.per_device_batch_size * jax.device_count(),
            config.max_target_length,
            config.vocab_size,
        )
        key = jax.random.key(config.seed)
        abstract = jax.eval_shape(partial(init_state, config, plan=plan), key)
        shardings = state_shardings(abstract, mesh)
        rows = batch_sharding(mesh)
        scale = None if plan is None else plan.config.scale
        step_fn = jax.jit(
            partial(train_step, config, scale=scale),
            in_shardings=(shardings, rows),
            out_shardings=(shardings, NamedSharding(mesh, PartitionSpec())),
            donate_argnums=0,
        )
        lora_record = run_record(plan)  # kept with every checkpoint: a resume must agree
        _check_lora_resume(manager, plan)
        loaded = load_initial_state(
            manager,
            with_shardings(abstract, shardings),
            load_parameters_path=config.load_parameters_path,
            load_full_state_path=config.load_full_state_path,
            data_iterator=data,
            load_parameters=parameters_loader(config),
        )
        if loaded.source in ("resume", "full_state"):
            state = loaded.state
        elif plan is not None:
            check_fresh_start(config, plan)  # before any training: its adapter must fit in
            state = _lora_start(config, plan, key, loaded, abstract, shardings)
        elif loaded.source == "parameters":
            state = jax.jit(partial(state_from_params, config), out_shardings=shardings)(
                loaded.state
            )
        else:
            state = jax.jit(partial(init_state, config), out_shardings=shardings)(key)
        start = int(state["step"])
        data.position = data.position if loaded.source == "resume" else start
        log.info(
            "Starting at step %d (%s%s)",
            start,
            loaded.source,
            f": {loaded.path}" * bool(loaded.path),
        )
    except BaseException:
        manager.close()
        raise

    losses: list[float] = []
    stopped_by = None
    step = start
    # the stop request outlives the manager's final wait: a repeated SIGTERM does not cut it
    with (
        StopRequest(config.wall_clock_limit_seconds) as stop,
        manager,
        _Progress(console, start, config.steps) as bar,
    ):
        while step < config.steps:
            state, loss = step_fn(state, global_batch(next(data), rows))
            step = int(state["step"])
            if step % config.log_period == 0 or step == config.steps:
                losses.append(float(loss))
                bar.update(step, float(loss))
            manager.save(step, state, data_iterator=data, custom_metadata=lora_record)
            stopped_by = stop.check(step, final=step >= config.steps)
            if stopped_by:
                log.warning(
                    "Training interrupted at step %d (%s). Saving checkpoint...", step, stopped_by
                )
                manager.save(
                    step, state, data_iterator=data, force=True, custom_metadata=lora_record
                )
                break
        else:
            if config.save_checkpoint_on_completion:
                manager.save(
                    step, state, data_iterator=data, force=True, custom_metadata=lora_record
                )
    if plan is not None:
        save_trained(config, plan, state["lora_params"], step)
    return TrainResult(state, start, step, loaded.source, stopped_by, losses)


def _check_lora_resume(manager: CheckpointManager, plan: LoraPlan | None) -> None:
    """Refuse a resume whose LoRA flags are not those of the run's newest checkpoint."""
    latest = manager.latest_step()
    if latest is None:
        return
    where = manager.step_path(latest)
    try:
        recorded = info(where).custom_metadata
    except StepsafeError:  # a local-tier or damaged step: the restore judges it
        return
    check_resume(plan, recorded, where)


def _lora_start(
    config: Config, plan: LoraPlan, key: jax.Array, loaded: Any, abstract: Any, shardings: Any
) -> dict[str, Any]:
    """A LoRA run's first state: the base from ``load_parameters_path`` (or initialised), the
    adapter from ``plan`` (read, or new)."""
    if loaded.source == "parameters":
        params = loaded.state
    else:
        params = jax.jit(partial(init_params, config), out_shardings=shardings["params"])(key)
    if plan.source is not None:
        lora = load_plan_adapter(
            plan, with_shardings(abstract["lora_params"], shardings["lora_params"])
        )
    else:
        lora = jax.jit(
            lambda p: init_adapter(plan, p, jax.random.fold_in(key, 1)),
            out_shardings=shardings["lora_params"],
        )(params)
    return jax.jit(partial(lora_state, config), out_shardings=shardings)(params, lora)


class _Progress:
    """A rich progress bar with the loss on ``console``, or plain log lines without one."""

    def __init__(self, console: Console | None, start: int, total: int) -> None:
        self.console, self.start, self.total = console, start, total
        self._bar: Any = None

    def __enter__(self) -> _Progress:
        if self.console is not None:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )

            self._bar = Progress(
                TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                TextColumn("loss {task.fields[loss]}"), console=self.console,
            )  # fmt: skip
            self._bar.__enter__()
            self._task = self._bar.add_task(
                "train", total=self.total, completed=self.start, loss="-"
            )
        return self

    def update(self, step: int, loss: float) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=step, loss=f"{loss:.4f}")
        else:
            log.info("step %d loss %.4f", step, loss)

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
