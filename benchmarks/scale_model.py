"""Scale model of a many-process checkpoint's metadata (issue #13): P processes x A arrays, each
array of shape (P*64, 1024) float32 split by rows over all P processes (one 256 KiB shard, one
chunk, per process per array; data files of 128 MiB), built synthetically.

For today's format (one JSON manifest listing every shard) and for the grid prototype
(``benchmarks.scale_grid``) it measures the commit-time merge on process 0, one process's
restore planning (what it reads and parses, then ``regions.plan_array_read`` for its box of
every array) and the metadata bytes that process reads. Every phase runs in a fresh child
process, so its peak RSS (Linux's peak reset) is its own; files go to a temporary directory.

    .venv/bin/python -m benchmarks.scale_model                  # default scales, ~5 min
    .venv/bin/python -m benchmarks.scale_model --scales 10x1000 --results /tmp/r.md

The tables go to stdout and, with ``--results``, to that file (``RESULTS-scale.md`` quotes
them). Scales too big for today's format on this machine are extrapolated from the largest one
measured, linearly in the number of shards, and marked so.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import memory, scale_grid
from stepsafe.format.manifest import MANIFEST_MAX_BYTES, Chunk, Manifest, Shard
from stepsafe.format.merge import merge_parts
from stepsafe.format.plan import HostArray
from stepsafe.format.regions import plan_array_read
from stepsafe.format.written import WrittenPart

ROWS, COLS, ITEM = 64, 1024, 4
SHARD = ROWS * COLS * ITEM
FILE_SIZE = 128 << 20
SAVE_ID = "0123456789ab"
TODAY_MAX_SHARDS = 1_000_000  # beyond this today's format does not fit this machine's budget
GRID_ALL_PARTS = 1_000_000  # beyond this only the parts a measured restore reads are built
DEFAULT_SCALES = "10x1000,100x1000,1000x1000,100x10000,1000x10000"


def key(a: int) -> str:
    return f"params/layer_{a:05d}/kernel"


def written_part(p: int, processes: int, arrays: int) -> WrittenPart:
    """What process ``p`` wrote: row block ``p`` of every array, packed into 128 MiB files."""
    part = WrittenPart()
    per_file = FILE_SIZE // SHARD
    for a in range(arrays):
        name = f"process_{p}.{a // per_file:05d}.{SAVE_ID}.data"
        offset = (a % per_file) * SHARD
        part.files[name] = offset + SHARD
        digest = f"{(p * arrays + a) * 0x9E3779B97F4A7C15 % (1 << 64):016x}"
        part.shards[key(a)] = [
            Shard(((p * ROWS, (p + 1) * ROWS), (0, COLS)), (Chunk(name, offset, SHARD, digest),))
        ]
    return part


def structure(arrays: int) -> list:
    return [
        "dict",
        ["params"],
        [
            [
                "dict",
                [f"layer_{a:05d}" for a in range(arrays)],
                [["dict", ["kernel"], [["leaf"]]]] * arrays,
            ]
        ],
    ]


def box(p: int, ratio: int = 1) -> tuple[tuple[int, int], ...]:
    """Process ``p``'s box of every array in a job of P/ratio processes."""
    return ((p * ratio * ROWS, (p + 1) * ratio * ROWS), (0, COLS))


def clock(out: dict, name: str, fn: Callable[[], Any]) -> Any:
    t0 = time.perf_counter()
    result = fn()
    out[name] = round(time.perf_counter() - t0, 4)
    return result


# -- the phases, each in its own child process ------------------------------------------------


def today_merge(processes: int, arrays: int, d: Path) -> dict:
    """Every process's part as JSON (what travels to process 0), then process 0's merge."""
    out: dict = {}
    sent = [written_part(p, processes, arrays).to_json() for p in range(processes)]
    out["parts_bytes"] = sum(map(len, sent))
    memory.reset_peak()
    parts = clock(out, "parts_parse_s", lambda: [WrittenPart.from_json(r, "p") for r in sent])
    sent.clear()  # process 0 lets go of what it received
    hosts = [
        HostArray(key(a), np.dtype("float32"), (processes * ROWS, COLS), []) for a in range(arrays)
    ]
    m = clock(out, "merge_s", lambda: merge_parts(structure(arrays), hosts, {}, parts, SAVE_ID))
    raw = clock(out, "to_json_s", m.to_json)
    out["manifest_bytes"] = len(raw)
    (d / "manifest.json").write_bytes(raw)
    out["peak_rss"] = memory.peak()
    return out


def today_restore(processes: int, arrays: int, d: Path) -> dict:
    """One process (the middle one) restores onto the same topology: it reads the manifest."""
    out: dict = {"base_rss": memory.rss()}
    memory.reset_peak()
    raw = clock(out, "read_s", (d / "manifest.json").read_bytes)
    out["read_bytes"] = len(raw)
    m = clock(out, "parse_s", lambda: Manifest.from_json(raw, "manifest"))
    p = processes // 2
    clock(out, "plan_s", lambda: [plan_array_read(k, e, [box(p)]) for k, e in m.arrays.items()])
    out["peak_rss"] = memory.peak()
    return out


def _grid_arrays(processes: int, arrays: int) -> dict[str, dict]:
    return {
        key(a): {"dtype": np.dtype("float32"), "shape": (processes * ROWS, COLS), "layout": 0}
        for a in range(arrays)
    }


def grid_merge(processes: int, arrays: int, d: Path) -> dict:
    """Every process writes its part (timed for one; the sum is the job's CPU, in parallel in
    a real job); process 0 merges only their summaries into the top manifest."""
    out: dict = {}
    described = _grid_arrays(processes, arrays)
    order = {k: n for n, k in enumerate(described)}
    ordered = list(described.values())
    layouts = [scale_grid.layout_of_row_sharding(processes)]
    summaries, spent = [], 0.0
    real = (
        range(processes)
        if processes * arrays <= GRID_ALL_PARTS
        else (range(processes // 2, processes // 2 + 2))
    )
    for p in range(processes):
        if p not in real:  # a summary only: the merge never looks inside a part
            want = scale_grid.layout_of_row_sharding(processes).counts(processes)[p] * arrays
            summaries.append((f"part_{p}.{SAVE_ID}.json", 0, "0" * 16, int(want)))
            continue
        wp = written_part(p, processes, arrays)
        t0 = time.perf_counter()
        raw, cells = scale_grid.build_part(p, wp, order, ordered, layouts)
        name = f"part_{p}.{SAVE_ID}.json"
        summaries.append((name, len(raw), scale_grid.checksum(raw), cells))
        spent += time.perf_counter() - t0
        (d / name).write_bytes(raw)
        if p == processes // 2:
            out["part_build_s"] = round(time.perf_counter() - t0, 4)
            out["part_bytes"] = len(raw)
    out["parts_total_s"] = round(spent, 2)
    out["parts_bytes"] = sum(s[1] for s in summaries)
    out["parts_built"] = len(real)
    summaries = [(n, size or out["part_bytes"], c, k) for n, size, c, k in summaries]
    memory.reset_peak()
    top = clock(
        out,
        "merge_s",
        lambda: scale_grid.merge_top(structure(arrays), described, layouts, summaries, {}),
    )
    out["manifest_bytes"] = len(top)
    (d / "manifest.json").write_bytes(top)
    out["peak_rss"] = memory.peak()
    return out


def grid_restore(processes: int, arrays: int, d: Path, ratio: int) -> dict:
    """The middle process of a job of P/ratio processes restores: it reads the top manifest
    and the parts of the writers of its rows."""
    out: dict = {"base_rss": memory.rss()}
    memory.reset_peak()
    t0 = time.perf_counter()
    raw = (d / "manifest.json").read_bytes()
    top = clock(out, "parse_s", lambda: scale_grid.parse_top(raw))
    read = [len(raw)]

    def read_part(p: int) -> bytes:
        part = (d / top.parts[p][0]).read_bytes()
        read.append(len(part))
        return part

    p = processes // ratio // 2
    _, parts = clock(
        out, "plan_s", lambda: scale_grid.plan_restore(top, read_part, lambda n: box(p, ratio))
    )
    out["total_s"] = round(time.perf_counter() - t0, 4)
    out.update(read_bytes=sum(read), parts_read=len(parts), peak_rss=memory.peak())
    return out


def agree(processes: int = 6, arrays: int = 20) -> None:
    """Both formats plan the same reads (shard boxes and chunks) for every restoring process,
    on the same topology and onto half as many processes; raises if not."""
    parts = [written_part(p, processes, arrays) for p in range(processes)]
    hosts = [
        HostArray(key(a), np.dtype("float32"), (processes * ROWS, COLS), []) for a in range(arrays)
    ]
    merged = merge_parts(structure(arrays), hosts, {}, parts, SAVE_ID)
    today = Manifest.from_json(merged.to_json(), "m")
    described = _grid_arrays(processes, arrays)
    layouts = [scale_grid.layout_of_row_sharding(processes)]
    order = {k: n for n, k in enumerate(described)}
    raws = [
        scale_grid.build_part(p, wp, order, list(described.values()), layouts)
        for p, wp in enumerate(parts)
    ]
    summaries = [(f"part_{p}", len(r), scale_grid.checksum(r), n) for p, (r, n) in enumerate(raws)]
    top = scale_grid.parse_top(
        scale_grid.merge_top(structure(arrays), described, layouts, summaries, {})
    )
    for ratio in (1, 2):
        for p in range(processes // ratio):
            mine = box(p, ratio)
            plans, _ = scale_grid.plan_restore(top, lambda w: raws[w][0], lambda n, b=mine: b)
            for plan in plans:
                want = plan_array_read(plan.key, today.arrays[plan.key], [mine])
                if [s for s, _ in plan.reads] != [s for s, _ in want.reads]:
                    raise AssertionError(f"plans differ: {plan.key}, process {p}, ratio {ratio}")


PHASES = {
    "today-merge": today_merge,
    "today-restore": today_restore,
    "grid-merge": grid_merge,
    "grid-restore": grid_restore,
}


# -- the orchestrator ---------------------------------------------------------------------------


def child(phase: str, processes: int, arrays: int, d: Path, *extra: str) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.scale_model",
        "--child",
        phase,
        str(processes),
        str(arrays),
        str(d),
        *extra,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode:
        return {"error": done.stderr.strip().splitlines()[-1]}
    return json.loads(done.stdout)


def mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB" if n >= 1e5 else f"{n / 1e3:,.1f} kB"


def extrapolate(measured: list[tuple[int, dict, dict]], shards: int) -> tuple[dict, dict]:
    """Today's figures at ``shards``, on the line through the two largest measured scales of
    different sizes (each phase is linear in the shards: every one is listed, parsed, planned)."""
    s2, m2, r2 = measured[-1]
    s1, m1, r1 = next(x for x in reversed(measured) if x[0] < s2)

    def line(a: dict, b: dict) -> dict:
        return {k: b[k] + (b[k] - a[k]) / (s2 - s1) * (shards - s2) for k in b}

    return line(m1, m2), line(r1, r2)


def slopes(measured: list[tuple[int, dict, dict]]) -> str:
    """Cost per shard of each phase of today's format, between the two largest scales."""
    s2, m2, r2 = measured[-1]
    s1, m1, r1 = next(x for x in reversed(measured) if x[0] < s2)
    d = s2 - s1
    pairs = ((m1, m2), (r1, r2))
    us = {k: (b[k] - a[k]) / d * 1e6 for a, b in pairs for k in b if k.endswith("_s")}
    per = ", ".join(f"{k[:-2]} {v:.1f} us" for k, v in us.items())
    return (
        f"Slope of today's format per shard (between {s1:,} and {s2:,} shards): {per}; "
        f"manifest {(m2['manifest_bytes'] - m1['manifest_bytes']) / d:.0f} bytes; peak RSS "
        f"of the merge {(m2['peak_rss'] - m1['peak_rss']) / d:.0f} bytes, of one restoring "
        f"process {(r2['peak_rss'] - r1['peak_rss']) / d:.0f} bytes.\n"
    )


def run(scales: list[tuple[int, int]]) -> str:
    rows_today, rows_grid = [], []
    measured: list[tuple[int, dict, dict]] = []
    for processes, arrays in scales:
        shards = processes * arrays
        print(f"{processes}x{arrays} ...", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory(prefix="scale-") as tmp:
            d = Path(tmp)
            if shards <= TODAY_MAX_SHARDS:
                m = child("today-merge", processes, arrays, d)
                r = child("today-restore", processes, arrays, d) if "error" not in m else m
                if "error" not in r:
                    measured = sorted([*measured, (shards, m, r)], key=lambda x: x[0])
                rows_today.append(_today_row(processes, arrays, m, r, ""))
            elif len({x[0] for x in measured}) > 1:
                m, r = extrapolate(measured, shards)
                over = (
                    ", over the 1 GiB limit: refused"
                    if (m["manifest_bytes"] > MANIFEST_MAX_BYTES)
                    else ""
                )
                rows_today.append(_today_row(processes, arrays, m, r, f" *extrapolated{over}*"))
        with tempfile.TemporaryDirectory(prefix="scale-") as tmp:
            d = Path(tmp)
            g = child("grid-merge", processes, arrays, d)
            same = child("grid-restore", processes, arrays, d, "1")
            half = child("grid-restore", processes, arrays, d, "2") if processes > 1 else same
            rows_grid.append(_grid_row(processes, arrays, g, same, half))
    return "\n".join(
        [
            "### Today: one JSON manifest listing every shard\n",
            "| P x A | shards | merge on process 0: parse parts / merge / to_json | peak RSS | "
            "manifest | restore of 1 process: parse / plan | peak RSS | bytes read |",
            "|---|---|---|---|---|---|---|---|",
            *rows_today,
            "",
            slopes(measured) if len({x[0] for x in measured}) > 1 else "",
            "### Prototype: grid per array + per-process parts\n",
            "| P x A | shards | part of 1 process: build / bytes | merge on process 0 | "
            "top manifest | restore, same topology: parse / plan (parts read) | bytes read | "
            "peak RSS | onto P/2 processes: time, parts, bytes read |",
            "|---|---|---|---|---|---|---|---|---|",
            *rows_grid,
            "",
        ]
    )


def _today_row(processes: int, arrays: int, m: dict, r: dict, note: str) -> str:
    if "error" in m or "error" in r:
        return f"| {processes}x{arrays} | | {m.get('error') or r.get('error')} |||||"
    return (
        f"| {processes}x{arrays}{note} | {processes * arrays:,} | "
        f"{m['parts_parse_s']:.2f} / {m['merge_s']:.2f} / {m['to_json_s']:.2f} s | "
        f"{mb(m['peak_rss'])} | {mb(m['manifest_bytes'])} | "
        f"{r['parse_s']:.2f} / {r['plan_s']:.2f} s | {mb(r['peak_rss'])} | "
        f"{mb(r['read_bytes'])} |"
    )


def _grid_row(processes: int, arrays: int, g: dict, s: dict, h: dict) -> str:
    for x in (g, s, h):
        if "error" in x:
            return f"| {processes}x{arrays} | | {x['error']} |||||||"
    note = "" if g["parts_built"] == processes else f" ({g['parts_built']} parts built)"
    return (
        f"| {processes}x{arrays}{note} | {processes * arrays:,} | "
        f"{g['part_build_s']:.3f} s / {mb(g['part_bytes'])} | {g['merge_s']:.3f} s | "
        f"{mb(g['manifest_bytes'])} | {s['parse_s']:.3f} / {s['plan_s']:.3f} s "
        f"({s['parts_read']}) | {mb(s['read_bytes'])} | {mb(s['peak_rss'])} | "
        f"{h['total_s']:.3f} s, {h['parts_read']}, {mb(h['read_bytes'])} |"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scales", default=DEFAULT_SCALES, help="PxA,PxA,... (processes x arrays)")
    ap.add_argument("--results", help="also write the tables to this file")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        phase, processes, arrays, d, *extra = args.child
        fn = PHASES[phase]
        out = fn(int(processes), int(arrays), Path(d), *map(int, extra))
        print(json.dumps(out))
        return
    scales = [tuple(int(x) for x in s.split("x")) for s in args.scales.split(",")]
    t0 = time.perf_counter()
    agree()
    print("both formats plan the same reads (6 processes x 20 arrays)", file=sys.stderr)
    text = run(scales)  # type: ignore[arg-type]
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    text += f"\n(run took {time.perf_counter() - t0:.0f} s; load average at its end {load})\n"
    print(text)
    if args.results:
        Path(args.results).write_text(text)


if __name__ == "__main__":
    main()
