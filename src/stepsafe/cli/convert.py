"""``stepsafe convert``: write a checkpoint as another kind (MaxText's): param-only (inference:
``params`` only, as step 0, optionally cast, e.g. to bfloat16), and stacked (scanned) <->
unstacked (``layers_0`` ..) layers; or a Hugging Face safetensors model directory, out of a
checkpoint's parameters (``--to safetensors``) or into a param-only checkpoint
(``--from safetensors``), through a conversion function (``module:function``; the demo
model's: ``stepsafe.convert.hf_demo:to_hf`` / ``:from_hf``; Llama's and Mistral's:
``stepsafe.convert.hf_llama:to_hf`` / ``:from_hf``); or an Orbax checkpoint in MaxText's layout
(``--to orbax``: ``DST/<step>/items``, written by orbax-checkpoint). SRC may be a checkpoint
Orbax wrote (MaxText's), read through orbax-checkpoint (``stepsafe[orbax]``). LoRA adapters:
``--merge-lora ADAPTER`` merges one into SRC's weights; ``--from peft`` imports a Hugging Face
PEFT adapter as one (MaxText's layout). One array at a time (but ``--to orbax``, which holds
the tree while Orbax writes it): the memory it needs is about the largest array, whatever the
model's size; the output appears whole or not at all."""

from __future__ import annotations

import argparse

from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

from stepsafe.cli import common
from stepsafe.cli.common import ExitCode
from stepsafe.convert.hf import (
    conversion_function,
    export_safetensors,
    import_safetensors,
    read_config,
)
from stepsafe.convert.kinds import convert_checkpoint
from stepsafe.convert.lora_merge import merge_lora
from stepsafe.convert.orbax_out import export_orbax
from stepsafe.convert.peft import import_peft
from stepsafe.convert.safetensors_files import HF_SHARD_BYTES
from stepsafe.errors import ConfigError

HELP = "write a checkpoint as another kind: param-only, unstacked or stacked layers"
EXAMPLE = (
    "stepsafe convert outputs/demo/checkpoints/300 outputs/demo-params/checkpoints/0 "
    "--param-only --dtype bfloat16 --unstack --scan-axis 0"
)
HINT = (
    "SRC is a committed step (or a run: its latest); DST a new step directory, e.g. "
    "<base_output_directory>/<run_name>/checkpoints/0"
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", metavar="SRC", help="a committed step, or a run (its latest step)")
    p.add_argument("dst", metavar="DST", help="the new step directory (must not exist)")
    p.add_argument(
        "--param-only", action="store_true",
        help="keep only the parameters (the state's 'params'), saved as step 0",
    )  # fmt: skip
    p.add_argument("--params-key", default="params", help="the parameters' top key")
    p.add_argument("--dtype", help="cast floating arrays, e.g. bfloat16 (MaxText's param-only)")
    layers = p.add_mutually_exclusive_group()
    layers.add_argument(
        "--unstack", action="store_true",
        help="stacked layers -> layers_0 .. layers_{L-1} (MaxText's force_unroll)",
    )  # fmt: skip
    layers.add_argument("--stack", action="store_true", help="layers_0 .. -> stacked layers")
    p.add_argument(
        "--scan-axis", type=int, default=None,
        help="the layer axis of stacked arrays (MaxText's param_scan_axis: 1; the demo's: 0)",
    )  # fmt: skip
    p.add_argument("--layers-key", default=None, help="the stacked layers' key ('layers')")
    hf = p.add_mutually_exclusive_group()
    hf.add_argument(
        "--to", choices=["safetensors", "orbax"],
        help="write DST as a Hugging Face model directory (safetensors: needs --conversion-fn), "
        "or as Orbax's DST/<step>/items, MaxText's layout (orbax: DST is the checkpoints "
        "directory)",
    )  # fmt: skip
    hf.add_argument(
        "--from", dest="source", choices=["safetensors", "peft"],
        help="SRC is a Hugging Face model directory, or a PEFT LoRA adapter (then DST is the "
        "adapter's new directory, <lora_input_adapters_path>/<lora_id>); needs "
        "--conversion-fn",
    )  # fmt: skip
    hf.add_argument(
        "--merge-lora", metavar="ADAPTER",
        help="merge the LoRA adapter ADAPTER (<lora_input_adapters_path>/<lora_id>) into "
        "SRC's weights: W + A·B·alpha/r",
    )  # fmt: skip
    p.add_argument(
        "--conversion-fn", metavar="MODULE:FUNCTION",
        help="Hugging Face names <-> the model's tree, e.g. stepsafe.convert.hf_demo:to_hf "
        "(PEFT: stepsafe.convert.peft_demo:from_peft)",
    )  # fmt: skip
    p.add_argument(
        "--max-shard-bytes", type=int, default=None,
        help="split safetensors files at this size (Hugging Face's 5 GB by default)",
    )  # fmt: skip
    p.add_argument(
        "--hf-config", metavar="PATH",
        help="--to safetensors: the model's config.json (or its directory), checked against "
        "the weights and written beside them; --from peft: the base model's, for head counts",
    )  # fmt: skip
    p.add_argument(
        "--step", type=int, default=None,
        help="--to orbax: the step to write (the source's; 0 with --param-only)",
    )  # fmt: skip
    p.add_argument(
        "--no-ocdbt", action="store_true",
        help="--to orbax: one zarr array per leaf, without OCDBT (MaxText's "
        "checkpoint_storage_use_ocdbt=false)",
    )  # fmt: skip
    p.add_argument(
        "--zstd", action="store_true",
        help="--to orbax: compress every chunk with zstd, as Orbax does by default (smaller "
        "files, several times the CPU); without it chunks are stored raw, which Orbax and "
        "MaxText read alike",
    )  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def run(args: argparse.Namespace) -> int:
    progress = Progress(
        TextColumn("convert"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
        console=common.err(), transient=True, disable=args.no_progress or args.json,
    )  # fmt: skip
    _refuse_unread(args)
    if args.to == "orbax":
        return _orbax(args, progress)
    if args.merge_lora or args.source == "peft":
        return _lora(args, progress)
    if args.to or args.source:
        return _hugging_face(args, progress)
    with progress:
        task = progress.add_task("convert", total=None)
        done = convert_checkpoint(
            args.src, args.dst, param_only=args.param_only, params_key=args.params_key,
            dtype=args.dtype, unstack=args.unstack, stack=args.stack,
            scan_axis=1 if args.scan_axis is None else args.scan_axis,
            layers_key=args.layers_key or "layers", on_bytes=lambda n: progress.advance(task, n),
        )  # fmt: skip
    if args.json:
        common.print_json(done)
        return ExitCode.OK
    what = "param-only" if args.param_only else "full state"
    layers = ", unstacked" if args.unstack else ", stacked" if args.stack else ""
    sets = f" ({done.layer_sets} layer set(s))" if done.layer_sets else ""
    common.out().print(
        f"Wrote {escape(done.path)}: step {done.step}, {what}{layers}{sets}, "
        f"{common.human_bytes(done.nbytes)} of arrays"
    )
    return ExitCode.OK


def _orbax(args: argparse.Namespace, progress: Progress) -> int:
    with progress:
        task = progress.add_task("convert", total=None)
        done = export_orbax(
            args.src, args.dst, step=args.step, param_only=args.param_only,
            params_key=args.params_key, dtype=args.dtype, unstack=args.unstack,
            stack=args.stack, scan_axis=1 if args.scan_axis is None else args.scan_axis,
            layers_key=args.layers_key or "layers", use_ocdbt=not args.no_ocdbt,
            use_compression=args.zstd, on_bytes=lambda n: progress.advance(task, n),
        )  # fmt: skip
    if args.json:
        common.print_json(done)
        return ExitCode.OK
    what = "param-only" if args.param_only else "full state"
    layers = ", unstacked" if args.unstack else ", stacked" if args.stack else ""
    common.out().print(
        f"Wrote {escape(done.item)}: Orbax, step {done.step}, {what}{layers}, "
        f"{common.human_bytes(done.nbytes)} of arrays"
    )
    return ExitCode.OK


def _hugging_face(args: argparse.Namespace, progress: Progress) -> int:
    if not args.conversion_fn:
        raise ConfigError(
            "--to/--from safetensors needs --conversion-fn module:function (the demo model's: "
            "stepsafe.convert.hf_demo:to_hf and :from_hf)"
        )
    fn = conversion_function(args.conversion_fn)
    with progress:
        task = progress.add_task("convert", total=None)
        if args.to:
            config = read_config(args.hf_config, required=True) if args.hf_config else None
            files = export_safetensors(
                args.src, args.dst, fn, config=config, params_key=args.params_key,
                max_shard_bytes=args.max_shard_bytes or HF_SHARD_BYTES,
                on_bytes=lambda n: progress.advance(task, n),
            )  # fmt: skip
            what = f"{len(files)} file(s): {', '.join(files[:3])}{' ...' * (len(files) > 3)}"
        else:
            nbytes = import_safetensors(args.src, args.dst, fn, params_key=args.params_key)
            what = f"step 0, param-only, {common.human_bytes(nbytes)} of arrays"
    if args.json:
        common.print_json({"path": args.dst, "written": what})
    else:
        common.out().print(f"Wrote {escape(args.dst)}: {escape(what)}")
    return ExitCode.OK


def _lora(args: argparse.Namespace, progress: Progress) -> int:
    with progress:
        task = progress.add_task("convert", total=None)
        on_bytes = lambda n: progress.advance(task, n)  # noqa: E731
        if args.merge_lora:
            done = merge_lora(
                args.src, args.merge_lora, args.dst, params_key=args.params_key,
                scan_axis=args.scan_axis, param_only=args.param_only, on_bytes=on_bytes,
            )  # fmt: skip
            what = (
                f"step {done.step}, {len(done.modules)} module(s) merged, "
                f"{common.human_bytes(done.nbytes)} of arrays"
            )
            result: object = done
        else:
            if not args.conversion_fn:
                raise ConfigError(
                    "--from peft needs --conversion-fn module:function (the demo model's: "
                    "stepsafe.convert.peft_demo:from_peft)"
                )
            base = read_config(args.hf_config, required=True) if args.hf_config else None
            config = import_peft(
                args.src, args.dst, conversion_function(args.conversion_fn),
                scan_axis=args.scan_axis, base_config=base, on_bytes=on_bytes,
            )  # fmt: skip
            what = f"LoRA adapter, r={config.r}, lora_alpha={config.lora_alpha:g}"
            result = {"path": args.dst, "written": what}
    if args.json:
        common.print_json(result)
    else:
        common.out().print(f"Wrote {escape(args.dst)}: {escape(what)}")
    return ExitCode.OK


# Which conversion reads which flag: any other given is an error, never ignored.
_READS = {
    "--param-only": {"kind", "orbax", "safetensors-out", "safetensors-in", "merge"},
    "--params-key": {"kind", "orbax", "safetensors-out", "safetensors-in", "merge"},
    "--dtype": {"kind", "orbax"},
    "--unstack": {"kind", "orbax"},
    "--stack": {"kind", "orbax"},
    "--layers-key": {"kind", "orbax"},
    "--scan-axis": {"kind", "orbax", "merge", "peft"},
    "--conversion-fn": {"safetensors-out", "safetensors-in", "peft"},
    "--max-shard-bytes": {"safetensors-out"},
    "--hf-config": {"safetensors-out", "peft"},
    "--step": {"orbax"},
    "--no-ocdbt": {"orbax"},
    "--zstd": {"orbax"},
}
_NAMES = {
    "kind": "a conversion between stepsafe kinds", "orbax": "--to orbax",
    "safetensors-out": "--to safetensors", "safetensors-in": "--from safetensors",
    "merge": "--merge-lora", "peft": "--from peft",
}  # fmt: skip
_OPS = {"--dtype", "--unstack", "--stack", "--scan-axis", "--layers-key"}


def _refuse_unread(args: argparse.Namespace) -> None:
    """A flag the chosen conversion would not read is an error, never ignored."""
    mode = (
        "orbax" if args.to == "orbax"
        else "safetensors-out" if args.to
        else "merge" if args.merge_lora
        else "peft" if args.source == "peft"
        else "safetensors-in" if args.source
        else "kind"
    )  # fmt: skip
    given = {
        "--param-only": args.param_only, "--params-key": args.params_key != "params",
        "--dtype": args.dtype, "--unstack": args.unstack, "--stack": args.stack,
        "--layers-key": args.layers_key, "--scan-axis": args.scan_axis is not None,
        "--conversion-fn": args.conversion_fn, "--max-shard-bytes": args.max_shard_bytes,
        "--hf-config": args.hf_config, "--step": args.step is not None,
        "--no-ocdbt": args.no_ocdbt, "--zstd": args.zstd,
    }  # fmt: skip
    unread = [flag for flag, value in given.items() if value and mode not in _READS[flag]]
    if unread:
        readers = [_NAMES[m] for m in _NAMES if any(m in _READS[flag] for flag in unread)]
        why = f"read by {', '.join(readers)} only"
        if mode.startswith("safetensors") and _OPS & set(unread):
            why += (
                "; a Hugging Face conversion casts, stacks or unstacks in its conversion "
                "function (with stepsafe.convert.ops)"
            )
        raise ConfigError(f"{', '.join(unread)} not read by this conversion: {why}")
