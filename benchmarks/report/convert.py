"""A conversion run (``benchmarks/convert.py``) -> ``RESULTS-convert.md``; re-render a stored one
with ``python -m benchmarks.report.convert benchmarks/out/convert-<stamp>.json [OUT.md]``.

Cells are medians over the repeats, the minimum beside them. Speeds are bytes of array data
written per second (a conversion reads as many as it writes); the copy baseline is the faster
median of the two copies, over every byte of the source's files.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

RERUN = ".venv/bin/python benchmarks/convert.py --snapshot"
MIB = 2**20
LABEL = {
    "copy-user": "copy: `readinto` + `write` (16 MiB buffer) + fsync, every file",
    "copy-kernel": "copy: `sendfile` + fsync, every file",
    "param-only": "`convert_checkpoint(param_only=True, unstack=True, scan_axis=1)`",
    "unstack": "`convert_checkpoint(unstack=True, scan_axis=1)` (whole state)",
    "param-only-stacked": "diagnosis: `convert_checkpoint(param_only=True)`, nothing unstacked",
    "to-safetensors": "`export_safetensors(src, hf_dir, to_hf)`: params, unstacked, to "
    "Hugging Face safetensors",
    "from-safetensors": "`import_safetensors(hf_dir, dst, from_hf)`: stacked back, param-only "
    "checkpoint",
    "safetensors-load+save": "peer: `safetensors.numpy.load_file` of every file + `np.stack` + "
    "`stepsafe.save` (holds it all)",
    "param-only-blocks": "diagnosis: `convert_checkpoint(param_only=True)`, "
    "`STEPSAFE_CONVERT_BLOCK_BYTES` = 64 MiB",
    "to-orbax": "`export_orbax(src, dst, param_only=True)`: params to Orbax (`DST/0/items`, "
    "OCDBT + zarr3, chunks of rows written through its own type handler, raw)",
    "from-orbax": "`convert_checkpoint(orbax_step, dst)`: Orbax (saved from numpy: one zstd "
    "chunk per array) to a stepsafe checkpoint, through tensorstore",
    "from-orbax-sharded": "`convert_checkpoint(orbax_step, dst)`: Orbax saved from 8 devices, "
    "axis 0 sharded (a chunk per shard, as an FSDP job saves), through tensorstore",
    "orbax-restore": "peer, half: orbax-checkpoint's `CheckpointManager.restore`, numpy (holds "
    "it all)",
    "orbax-peer": "peer: orbax-checkpoint's `CheckpointManager.restore` + `.save` (sync) to "
    "a new directory",
    "orbax-largest": "diagnosis: orbax-checkpoint's partial restore of the largest array "
    "alone (`PLACEHOLDER` elsewhere)",
}
PEER = "safetensors-load+save"  # the safetensors import's peer
PEERS = (PEER, "orbax-restore", "orbax-peer", "orbax-largest")  # not held to the targets


def _ok(recs: list[dict[str, Any]], case: str) -> list[dict[str, Any]]:
    return [r for r in recs if r["case"] == case and "error" not in r]


def _med(vals: list[float]) -> float:
    return statistics.median(vals) if vals else float("nan")


def _rate(r: dict[str, Any]) -> float:
    return r["bytes"] / r["seconds"] / 1e9


def baseline(run: dict[str, Any]) -> tuple[str, float]:
    """The faster copy (by median GB/s) and its GB/s."""
    rates = {c: _med([_rate(r) for r in _ok(run["records"], c)]) for c in LABEL if "copy" in c}
    rates = {c: v for c, v in rates.items() if v == v}
    if not rates:
        return "", float("nan")
    best = max(rates, key=lambda c: rates[c])
    return best, rates[best]


def _others(recs: list[dict[str, Any]], cores: int) -> float:
    """The median share of the machine's CPU that other processes took during a case."""
    return 100 * _med([r["other_cpu_s"] / (cores * r["case_wall_s"]) for r in recs])


def _table(run: dict[str, Any]) -> list[str]:
    src, cores = run["source"], int(run["machine"]["cores"])
    target_rss = src["largest_bytes"] + 256 * MIB
    best, base = baseline(run)
    lines = [
        "| case | bytes | time (median, min) | GB/s | vs copy (target ≥ 0.8x) | peak RSS rise "
        f"(target ≤ {target_rss / MIB:.0f} MiB) | CPU s | load (1 min) | others' CPU |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for case, label in LABEL.items():
        recs = _ok(run["records"], case)
        if not recs:
            continue
        secs = [r["seconds"] for r in recs]
        rate = _med([_rate(r) for r in recs])
        peak = _med([r["peak_rise"] for r in recs])
        if "copy" in case or case in PEERS:
            vs = "**baseline**" if case == best else f"{rate / base:.2f}x"
            rss = f"{peak / MIB:.0f} MiB"
        else:
            ratio = rate / base
            vs = f"**{ratio:.2f}x** {'pass' if ratio >= 0.8 else 'FAIL'}"
            rss = f"**{peak / MIB:.0f} MiB** {'pass' if peak <= target_rss else 'FAIL'}"
        lines.append(
            f"| {label} | {_med([r['bytes'] for r in recs]) / 1e9:.2f} GB | "
            f"**{_med(secs):.2f} s** (min {min(secs):.2f} s) | {rate:.2f} | {vs} | {rss} | "
            f"{_med([r['cpu_s'] for r in recs]):.1f} | {_med([r['load1'] for r in recs]):.1f} | "
            f"{_others(recs, cores):.0f}% |"
        )
    return lines


def _checks(run: dict[str, Any]) -> list[str]:
    out = []
    for r in run["records"]:
        if "error" in r:
            out.append(f"- r{r['repeat']} {r['case']}: **error** `{r['error'][-300:]}`")
        elif "slice_bit_exact" in r and r["case"] == "to-safetensors":
            out.append(
                f"- {r['case']}: {r['arrays_out']} tensors in {r['files']} file(s) "
                f"(`{', '.join(r.get('files_written', []))}`); `{r['checked']}` (read back by "
                "`safetensors.safe_open`) equals the source's slice 3 on axis 1 bit for bit: "
                f"{r['slice_bit_exact']}"
            )
        elif "slice_bit_exact" in r:
            whole = r["checked"].count("/layers/") > 0
            what = "stacked array" if whole else "slice 3 on axis 1"
            what = "array" if r["case"] == "orbax-largest" else what
            by = (
                " (restored by orbax-checkpoint as numpy: " + str(r["numpy_out"]) + ")"
                if "numpy_out" in r
                else ""
            )
            out.append(
                f"- {r['case']}{by}: {r['arrays_out']} arrays out, {r['layers_left']} under "
                f"`layers/`, {r['opt_state_out']} under `opt_state`, step {r['step_out']}; "
                f"`{r['checked']}` equals the source's "
                f"{what} bit for "
                f"bit: {r['slice_bit_exact']}"
            )
    return out


def _med_of(run: dict[str, Any], case: str, field: str) -> float:
    return _med([r[field] for r in _ok(run["records"], case)])


def _hf_notes(run: dict[str, Any]) -> list[str]:
    """The import against its peer, and whether 64 MiB blocks took the peak below an array."""
    src, out = run["source"], []
    if _ok(run["records"], "from-safetensors") and _ok(run["records"], PEER):
        t, tp = (_med_of(run, c, "seconds") for c in ("from-safetensors", PEER))
        m, mp = (_med_of(run, c, "peak_rise") for c in ("from-safetensors", PEER))
        out += [
            f"Import against its peer: `import_safetensors` takes {t:.2f} s, "
            f"{t / tp:.2f}x the peer's {tp:.2f} s, at a peak rise of {m / MIB:.0f} MiB against "
            f"the peer's {mp / MIB:.0f} MiB ({m / mp:.2f}x, the peer's "
            f"{mp / src['params_bytes']:.1f}x the params): the peer holds every tensor it read, "
            "and while reading also the file's pages (`load_file` reads through `safe_open`'s "
            'memory map, resident until the file is closed; its `backend="pread"` would not).',
            "",
        ]
    if hf := run.get("hf"):
        out += [
            f"The Hugging Face directory the import cases read was written once, untimed, by "
            f"`export_safetensors` ({hf['on_disk'] / 1e9:.2f} GB in {hf['file_count']} "
            f"file(s), {hf['seconds']:.1f} s warm). Names: the tree's keys joined by dots, "
            "layers unstacked (`model.decoder.layers.3.attn.q.kernel`; `benchmarks/"
            "convert_fns.py`), no renames or transposes: the rows measure the exporter and "
            "importer, not one architecture's mapping.",
            "",
        ]
    if recs := _ok(run["records"], "param-only-blocks"):
        peak = _med([r["peak_rise"] for r in recs])
        below = peak < src["largest_bytes"]
        regions = any(r.get("source_regions") for r in recs)
        out += [
            f"64 MiB blocks (`param-only-blocks`): peak rise {peak / MIB:.0f} MiB, "
            f"{'below' if below else 'not below'} the largest array "
            f"({src['largest_bytes'] / MIB:.0f} MiB). Blocks take effect only where the source "
            "reads regions of an array (`convert/source.py` giving its leaves an `OutLeaf.box`)"
            + (
                ", as the code measured does."
                if regions
                else "; the code measured does not yet (its source leaves have no `box`), so "
                "this row is the diagnosis row again."
            ),
            "",
        ]
    return out


def _largest_note(run: dict[str, Any], peak: float) -> list[str]:
    """Where the import of one-chunk arrays peaks: any read of such an array (Orbax's own
    included) holds its compressed chunk and its decoding at once."""
    if not _ok(run["records"], "orbax-largest"):
        return []
    src = run["source"]
    floor = _med_of(run, "orbax-largest", "peak_rise")
    target = src["largest_bytes"] + 256 * MIB
    sharded = _med_of(run, "from-orbax-sharded", "peak_rise")
    return [
        f"- Its peak against the target ({target / MIB:.0f} MiB): orbax-checkpoint's partial "
        f"restore of the largest array alone (`orbax-largest`, {src['largest_bytes'] / MIB:.0f} "
        f"MiB) peaks at {floor / MIB:.0f} MiB ({floor / src['largest_bytes']:.1f}x the array), "
        f"{'above' if floor > target else 'within'} the target by itself: Orbax stored each "
        "array of this checkpoint (saved from numpy) as one zstd chunk, which tensorstore "
        "decodes whole, holding the compressed chunk beside the array, whoever reads it; the "
        f"import's {peak / MIB:.0f} MiB is that. The same params saved from 8 devices "
        f"(`from-orbax-sharded`, a chunk per shard, as a MaxText job saves) import at "
        f"{sharded / MIB:.0f} MiB: read in pieces of whole chunks (`ORBAX_PIECE_BYTES`)."
    ]


def _orbax_notes(run: dict[str, Any]) -> list[str]:
    """The Orbax rows against orbax-checkpoint's own restore + save of the same params."""
    src, recs = run["source"], run["records"]
    cases = ("to-orbax", "from-orbax", "orbax-restore", "orbax-peer")
    if not all(_ok(recs, c) for c in cases):
        return []
    t = {c: _med_of(run, c, "seconds") for c in cases}
    m = {c: _med_of(run, c, "peak_rise") for c in cases}
    _, base = baseline(run)
    rate = src["params_bytes"] / t["orbax-restore"] / 1e9
    made = src.get("orbax", {})
    params = src["params_bytes"]
    return [
        "Orbax against its peer (orbax-checkpoint driven as MaxText drives it: one "
        "`CheckpointManager`, item `items`, OCDBT + zarr3, synchronous saves: MaxText's "
        "default, async, was no faster on these params in a side test; "
        "`benchmarks/convert_fns.py`). The Orbax checkpoint the import cases read holds the same "
        f"params ({params / 1e9:.2f} GB of arrays), written once by that peer's save "
        f"({made.get('on_disk', 0) / 1e9:.2f} GB on disk in {made.get('file_count', 0)} "
        f"files: Orbax compresses each zarr3 chunk with zstd level 3; {made.get('seconds', 0):.1f} "
        "s from memory). Orbax rows start their clock with orbax-checkpoint imported and JAX's CPU "
        f"backend up (about {_med_of(run, 'to-orbax', 'jax_ready_s'):.1f} s, not counted), "
        "as in a MaxText process.",
        "",
        f"- Export: `export_orbax` takes {t['to-orbax']:.2f} s at a peak rise of "
        f"{m['to-orbax'] / MIB:.0f} MiB, against the peer's restore + save "
        f"{t['orbax-peer']:.2f} s ({t['to-orbax'] / t['orbax-peer']:.2f}x) at "
        f"{m['orbax-peer'] / MIB:.0f} MiB ({m['to-orbax'] / m['orbax-peer']:.2f}x); the "
        f"peer's save alone takes {_med_of(run, 'orbax-peer', 'save_s'):.2f} s (the export "
        f"{t['to-orbax'] / _med_of(run, 'orbax-peer', 'save_s'):.2f}x that; its restore "
        f"{_med_of(run, 'orbax-peer', 'restore_s'):.2f} s, peaking at "
        f"{_med_of(run, 'orbax-peer', 'restore_peak_rise') / MIB:.0f} MiB). The export writes "
        "each array a chunk of rows at a time (`ORBAX_CHUNK_BYTES`, 64 MiB) through a type "
        "handler of its own registered with orbax-checkpoint (Orbax writes the metadata, OCDBT "
        "and the commit), chunks raw (`--zstd` for Orbax's compression, several times the CPU): "
        f"{_med_of(run, 'to-orbax', 'cpu_s'):.1f} CPU s, a peak of "
        f"{m['to-orbax'] / params:.2f}x the params.",
        f"- Import: `convert_checkpoint` of the Orbax step takes {t['from-orbax']:.2f} s at a "
        f"peak rise of {m['from-orbax'] / MIB:.0f} MiB, against the peer's restore alone "
        f"{t['orbax-restore']:.2f} s at {m['orbax-restore'] / MIB:.0f} MiB "
        f"({m['orbax-restore'] / params:.1f}x the params) and its restore + save "
        f"{t['orbax-peer']:.2f} s: it reads one array at a time through tensorstore, opened "
        "as orbax-checkpoint opens it, and writes it as it goes.",
        *_largest_note(run, m["from-orbax"]),
        f"- Speed: Orbax's own restore reads {rate:.2f} GB/s of arrays "
        f"({rate / base:.2f}x the copy; {_med_of(run, 'orbax-restore', 'cpu_s'):.1f} CPU s "
        f"in {t['orbax-restore']:.2f} s): both Orbax rows read or write through orbax-"
        "checkpoint and tensorstore (zstd on every chunk), so their ratios against the copy "
        "measure Orbax's reader and writer as much as stepsafe.",
        "",
    ]


def render(run: dict[str, Any]) -> str:
    src, m, v = run["source"], run["machine"], run["versions"]
    best, base = baseline(run)
    cores = int(m["cores"])
    shapes = ", ".join(
        f"`{k.split('/layers/')[1]}` {tuple(s)}" for k, s in list(src["layers_shapes"].items())[:3]
    )
    lines = [
        "# Conversions: param-only, unstacked, Hugging Face safetensors and Orbax, against "
        "the disk's copy speed and the libraries' own load + save",
        "",
        f"Run {run['stamp']}, {run['repeats']} repeats, {run['wall_s'] / 60:.1f} min; "
        f"`{run['command']}`; raw JSON: `benchmarks/out/convert-{run['stamp']}.json` "
        "(git-ignored). Rerun: `" + RERUN + f"` (~{run['wall_s'] / 60 / run['repeats'] * 3:.0f} "
        "min for 3 repeats on 2 cores; `--state m95` for a look: "
        "results then go under `out/`).",
        "",
        f"- Machine: {m['cpu']}, {m['cores']} cores, {m['ram']} RAM, kernel {m['kernel']}; "
        f"disk {m['disk']}. A bursty virtual disk: compare within one run, as ratios.",
        "- Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()) + "; stepsafe "
        f"{run['stepsafe_source'].get('commit', '?')}.",
        f"- Load: 1-min load average {run['load_at_start'][0]:.2f} at the start, "
        f"{run['load_at_end'][0]:.2f} at the end, on {cores} cores (other sessions' tests and "
        "benchmarks run beside this one); per case in the table.",
        f"- Cold page cache before every case ({run['cold']}); every case in a fresh process, "
        "timed after its imports, to committed (fsync included); peak RSS rise = peak over "
        "the process after imports (Linux's peak reset, `/proc/self/clear_refs`).",
        f"- Source: a training checkpoint of `{run['state']}`'s leaves "
        f"({src['array_bytes'] / 1e9:.2f} GB of float32 in {src['arrays']} arrays, "
        f"{src['on_disk'] / 1e9:.2f} GB on disk in {src['files']} files; params "
        f"{src['params_bytes'] / 1e9:.2f} GB, the rest Adam's mu and nu), saved by "
        "`stepsafe.save`. `states.py`'s states keep `layer_00` .. apart (nothing to unstack), "
        "so the benchmark stacks the same leaves MaxText's way: `params/decoder/layers/..` "
        f"(and `opt_state/{{mu,nu}}/decoder/layers/..`) with the layer axis at 1, e.g. "
        f"{shapes}. The largest array: `{src['largest'][0]}` {tuple(src['largest'][1])}, "
        f"{src['largest_bytes'] / MIB:.0f} MiB; the RSS target is it + 256 MiB.",
        f"- Copy baseline: the faster of the two copies ({best}, {base:.2f} GB/s over every "
        "byte of the source's files), i.e. reading plus writing the bytes once. A conversion's "
        "GB/s are its array bytes written (as many read) per second, so the param-only case "
        "(a third of the bytes) is compared by speed, not time.",
        "- Not measured here: conversions to and from buckets, LoRA merges and PEFT imports, "
        "dtype casts (bf16), Orbax checkpoints without OCDBT or written by several processes; "
        "one model's naming only (no renames or transposes).",
        "",
        "## Results (median of the repeats)",
        "",
        *_table(run),
        "",
        "Others' CPU: the share of the machine's CPU (all cores) that processes other than the "
        "case took while it ran (`clocks.py`); conversions are CPU-bound in part (checksums, "
        "slicing along axis 1), the kernel copy hardly, so a loaded machine lowers their ratio.",
        "",
        "The diagnosis row (a param-only copy without unstacking) tells the reader and writer's "
        "cost from the unstacking's; its peak is "
        f"{_med_of(run, 'param-only-stacked', 'peak_rise') / src['largest_bytes']:.2f}x the "
        f"largest array ({src['largest_bytes'] / MIB:.0f} MiB)."
        if _ok(run["records"], "param-only-stacked")
        else "",
        "",
        *_hf_notes(run),
        *_orbax_notes(run),
        "## Checks (first repeat)",
        "",
        *_checks(run),
        "",
    ]
    if run.get("stepsafe_source_at_end"):
        lines.insert(2, "**WARNING: stepsafe's code changed during the run; results mix "
                        "versions.**\n")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    run = json.loads(Path(argv[0]).read_text())
    text = render(run)
    if len(argv) > 1:
        Path(argv[1]).write_text(text)
    else:
        print(text)


if __name__ == "__main__":
    main(sys.argv[1:])
