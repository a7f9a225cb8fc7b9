"""Every flag stepsafe knows: MaxText's checkpoint flags plus the demo trainer's own.

Defaults follow MaxText's docs, with two documented choices:
``enable_checkpointing`` defaults to True (one table in MaxText's docs says False, its base.yml
and its checkpointing guide say True; losing a run's work is the worse surprise), and
``checkpoint_storage_target_data_file_size_bytes`` defaults to the storage's choice: MaxText's
2 GiB on a local disk, 128 MiB on buckets, where each file goes up in one request and many at
once (benchmarks/RESULTS-buckets.md: 2 GiB files save at half the speed or less). A value set
in a config is always honoured.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Config:
    # where checkpoints live
    base_output_directory: str = "outputs"
    run_name: str = "demo"
    # checkpointing (MaxText's checkpoint flags)
    enable_checkpointing: bool = True
    async_checkpointing: bool = True
    checkpoint_period: int = 10000
    save_checkpoint_on_completion: bool = True
    max_num_checkpoints_to_keep: int = 0  # 0 or null: keep all
    # under several processes, only replica 0 (along the first mesh axis, MaxText's data axis)
    # reads a restore's data; the others receive it over a JAX collective
    enable_single_replica_ckpt_restoring: bool = False
    replica_axis_index: int = 0  # stepsafe's own: the data-parallel mesh axis (MaxText's is 0)
    load_parameters_path: str = ""
    load_full_state_path: str = ""
    # LoRA (demo/lora.py): the parent directory of <lora_id>/{adapter_config.json, 0/items}
    # (MaxText's); the rest are stepsafe's own: which adapter, and the rank and alpha of a new
    # one (0: the adapter's own; a new one needs lora_rank, its lora_alpha defaults to the rank)
    lora_input_adapters_path: str = ""
    lora_id: str = ""
    lora_rank: int = 0
    lora_alpha: float = 0.0
    force_unroll: bool = False
    # storage and format (MaxText's checkpoint flags)
    # null: MaxText's 2 GiB on a local disk, 128 MiB on buckets (one upload request per file)
    checkpoint_storage_target_data_file_size_bytes: int | None = None
    checkpoint_storage_use_ocdbt: bool = True
    checkpoint_storage_use_zarr3: bool = True
    checkpoint_storage_concurrent_gb: int = 96
    enable_orbax_v1: bool = False
    source_checkpoint_layout: str = "orbax"
    checkpoint_conversion_fn: str | None = None
    # emergency (local-tier) and multi-tier checkpointing (MaxText's checkpoint docs): frequent
    # saves on each host's own disk under <local_checkpoint_directory>/<run_name>, beside the
    # persistent ones (emergency), or promoted to them in the background (multi-tier)
    enable_emergency_checkpoint: bool = False
    local_checkpoint_directory: str = ""
    local_checkpoint_period: int = 0
    local_checkpoint_max_to_keep: int = 2  # stepsafe's own: committed local steps per process
    enable_multi_tier_checkpointing: bool = False
    multi_tier_checkpointing_backup_interval_minutes: float | None = None
    multi_tier_checkpointing_backup_interval_steps: int | None = None
    # interruption (a scheduler's time limit): save and stop after this many seconds; 0 = off
    wall_clock_limit_seconds: float = 0.0
    # many hosts: the demo starts jax.distributed when a coordinator is named (this flag, else
    # JAX's JAX_COORDINATOR_ADDRESS); the process count and this process's index come from
    # these flags, else from JAX's cluster detection (Slurm, Open MPI, ...)
    jax_coordinator_address: str = ""
    jax_num_processes: int | None = None
    jax_process_id: int | None = None
    jax_distributed_initialization_timeout: int = 300  # seconds; MaxText's name and default
    # the demo trainer
    steps: int = 200
    seed: int = 0
    per_device_batch_size: int = 16
    max_target_length: int = 32
    vocab_size: int = 128
    emb_dim: int = 64
    num_heads: int = 4
    mlp_dim: int = 256
    num_decoder_layers: int = 2
    learning_rate: float = 3e-3
    warmup_steps: int = 20
    adam_weight_decay: float = 0.01
    log_period: int = 10
