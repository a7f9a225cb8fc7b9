"""A bucket run -> ``RESULTS-buckets.md``: per-server tables and issue #5's targets.

Every cell is the median over the repeats with the minimum beside it; MB/s is the state's
bytes (1 MB = 10^6 bytes) over the median time. The one-object baseline is, per server and
per direction, the variant with the best median. Re-render a stored run with
``python -m benchmarks.report benchmarks/out/buckets-<stamp>.json``.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from benchmarks import states
from benchmarks.methods import REGISTRY
from benchmarks.plan import VARIANTS
from benchmarks.report.runs import Runs
from benchmarks.storages import NAMES as SERVER_NAMES

TARGETS = {"one-object": 0.8, "orbax": 1.0}  # stepsafe MB/s over the peer's, at least
PHASES = ("save", "restore")
BORDERLINE = 0.1  # about the spread between whole runs here: closer verdicts may flip
LABELS = {
    "stepsafe": REGISTRY["stepsafe"].label,
    "orbax": "Orbax (sync Checkpointer, OCDBT via tensorstore)",
}


class BucketRuns(Runs):
    """Cells by (server, method, phase, variant); disturbed cases are left out (``Runs``)."""

    def __init__(self, run: dict[str, Any]) -> None:
        super().__init__(run, skip_disturbed=True)

    def seconds(
        self, server: str, method: str, phase: str, variant: str | None, field: str = "seconds"
    ) -> list[float]:
        return self.values(field, storage=server, method=method, phase=phase, variant=variant)

    def cpu(self, server: str, method: str, variant: str | None) -> str:
        """Median CPU seconds, client / server, of each direction measured: who is busy."""
        parts = []
        for phase in PHASES:
            mine = self.seconds(server, method, phase, variant, "cpu_s")
            theirs = self.seconds(server, method, phase, variant, "server_cpu_s")
            if mine and theirs:
                parts.append(
                    f"{phase} {statistics.median(mine):.1f} / {statistics.median(theirs):.1f}"
                )
        return "; ".join(parts) or "—"

    def cell_median(
        self, server: str, method: str, phase: str, variant: str | None
    ) -> float | None:
        vals = self.seconds(server, method, phase, variant)
        return statistics.median(vals) if vals else None

    def best_variant(self, server: str, phase: str) -> str | None:
        """The one-object variant with the smallest median time, or None."""
        timed = [
            (t, v.name)
            for v in VARIANTS
            if v.op == phase
            and (t := self.cell_median(server, "one-object", phase, v.name)) is not None
        ]
        return min(timed)[1] if timed else None

    def stepsafe_variants(self, server: str) -> list[str]:
        """The non-default stepsafe configurations measured on ``server`` (files-<N>M)."""
        found = {
            r["variant"]
            for r in self.records
            if r["storage"] == server and r["method"] == "stepsafe" and r.get("variant")
        }
        return sorted(found)

    def roundtrip(self, server: str, method: str, variant: str | None) -> str:
        rs = [
            r
            for r in self.records
            if (r["storage"], r["method"], r["phase"], r.get("variant"))
            == (server, method, "restore", variant)
        ]
        if not rs:
            return "—"
        ok = sum(1 for r in rs if r.get("roundtrip_ok"))
        return f"{ok}/{len(rs)} ok"


def _rate(nbytes: int, seconds: float) -> str:
    """MB/s with three significant digits (a tiny state moves well under 1 MB/s)."""
    return f"{nbytes / seconds / 1e6:.3g}"


def _cell(vals: list[float], nbytes: int) -> str:
    if not vals:
        return "—"
    med = statistics.median(vals)
    extra = f", min {min(vals):.3g} s" if len(vals) > 1 else ""
    return f"**{_rate(nbytes, med)} MB/s** ({med:.3g} s{extra})"


def _server_table(runs: BucketRuns, server: str, nbytes: int) -> list[str]:
    cpu = any("cpu_s" in r for r in runs.records)  # runs before it was recorded have none
    lines = [
        f"### {SERVER_NAMES[server]}",
        "",
        "| method | save | restore | round trip |" + (" CPU s, client / server |" if cpu else ""),
        "|---|---|---|---|" + ("---|" if cpu else ""),
    ]
    best = {ph: runs.best_variant(server, ph) for ph in PHASES}
    rows = [("stepsafe", None, LABELS["stepsafe"])]
    rows += [
        ("stepsafe", v, f"stepsafe, `data_file_size_bytes` = {v.removeprefix('files-')}iB")
        for v in runs.stepsafe_variants(server)
    ]
    rows.append(("orbax", None, LABELS["orbax"]))
    for method, variant, label in rows:
        cells = [_cell(runs.seconds(server, method, ph, variant), nbytes) for ph in PHASES]
        cells.append(runs.roundtrip(server, method, variant))
        cells += [runs.cpu(server, method, variant)] if cpu else []
        lines.append(f"| {label} | {' | '.join(cells)} |")
    for v in VARIANTS:
        if server not in v.storages:
            continue
        vals = runs.seconds(server, "one-object", v.op, v.name)
        cell = _cell(vals, nbytes) + (" ← best" if best[v.op] == v.name else "")
        cells = [cell, "", "—"] if v.op == "save" else ["", cell]
        if v.op == "restore":
            cells.append(runs.roundtrip(server, "one-object", v.name))
        cells += [runs.cpu(server, "one-object", v.name)] if cpu else []
        lines.append(f"| one object `{v.name}`: {v.doc} | {' | '.join(cells)} |")
    return [*lines, ""]


def _targets(runs: BucketRuns, servers: list[str], nbytes: int) -> tuple[list[str], bool]:
    lines = [
        "| server | direction | stepsafe | peer | peer MB/s | stepsafe / peer | target | |",
        "|---|---|---|---|---|---|---|---|",
    ]
    all_pass = True
    for server in servers:
        for phase in PHASES:
            mine = runs.cell_median(server, "stepsafe", phase, None)
            for peer, need in TARGETS.items():
                variant = runs.best_variant(server, phase) if peer == "one-object" else None
                theirs = runs.cell_median(server, peer, phase, variant)
                name = f"one object (`{variant}`)" if peer == "one-object" else "Orbax"
                if mine is None or theirs is None:
                    verdict, ratio, rate = "no data", "—", "—"
                    all_pass = False
                else:
                    r = theirs / mine  # MB/s ratio = inverse time ratio
                    ok = r >= need
                    all_pass &= ok
                    verdict = "PASS" if ok else "**FAIL**"
                    if abs(r - need) < BORDERLINE * need:
                        verdict += " (borderline)"
                    ratio, rate = f"{r:.2f}x", _rate(nbytes, theirs)
                mine_s = "—" if mine is None else f"{_rate(nbytes, mine)} MB/s"
                lines.append(
                    f"| {server} | {phase} | {mine_s} | {name} | {rate} | {ratio} "
                    f"| ≥ {need:.1f}x | {verdict} |"
                )
    return [*lines, ""], all_pass


NOTES = """\
## How the servers and peers behave (read in their code at the versions above)

- **moto 5.2.5 (S3)**: every GET, ranged or not, materialises the whole object
  (`FakeKey.value` reads and copies it) and then slices out the range: a ranged GET costs the
  size of the *object*, not of the range. Reading a big object in many small ranges therefore
  costs (number of requests) x (object size); few large requests win by far.
  `CompleteMultipartUpload` reads every part back and concatenates them into a new object;
  one `PutObject` does not. Objects past ~5 MiB live in temporary files (page cache).
- **fake-gcs-server v1.54.0 (GCS)**: each piece of a resumable upload is appended to the object
  and CRC32C and MD5 are recomputed over *everything received so far*
  (`fakestorage/upload.go`, `uploadFileContent`): n pieces cost O(n^2) hashing; a
  one-request (multipart) upload hashes once. Ranged GETs are cheap.
- Real S3 and GCS do neither, but the shapes that lose here also cost there: every request is
  a round trip, and a resumable upload's pieces go one after the other.
- **Orbax on `gs://`**: out of the box, via `TENSORSTORE_GCS_HTTP_URL` (tensorstore) and
  `STORAGE_EMULATOR_HOST` (gcsfs, for Orbax's own metadata files through etils.epath); the
  Google token comes from `GOOGLE_AUTH_TOKEN_FOR_TESTING` (tensorstore's test hook), so no
  credential search. Orbax picks its commit-file scheme on GCS (no rename).
- **Orbax on `s3://`**: Orbax 0.12.8 cannot write arrays to `s3://`: its path normalisation
  (`os.path.normpath`) turns `s3://b/k` into `s3:/b/k`, which it then refuses as "not
  absolute", after creating a local directory named `s3:`. The benchmark patches three private
  functions for `s3://` paths only (keep the `//`, take the remote-driver branch `gs://` takes,
  tensorstore's `s3` kvstore with the loopback `endpoint`), and asks for the commit-file scheme
  Orbax uses on GCS, because its default on S3, renaming the temporary directory through
  epath/s3fs, fails with `FileNotFoundError`. Everything else is Orbax's code and defaults
  (`benchmarks/methods/orbax_s3.py`).
"""


def render(run: dict[str, Any], json_path: Path | str) -> str:
    runs = BucketRuns(run)
    state = run["states"][0]
    nbytes = states.nbytes(state)
    m, v = run["machine"], run["versions"]
    src = run["stepsafe_source"]
    targets, all_pass = _targets(runs, run["storages"], nbytes)
    out = [
        "# Bucket benchmark: stepsafe vs one large object vs Orbax (issue #5)",
        "",
        f"State `{state}`: {nbytes / 1e9:.3f} GB float32 in {len(states.specs(state))} arrays "
        f"+ step. {run['repeats']} repeat(s); every case a fresh process; a fresh server "
        "(a child process on 127.0.0.1; fake-gcs-server's memory backend, moto's spooled "
        "temporary files) for each method and repeat. "
        "Written by `benchmarks/run-buckets`; method in `benchmarks/README.md`.",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram']} RAM, kernel {m['kernel']}. "
        "Servers and clients share the cores: these are ratios on this machine, not a "
        "real bucket's speed.",
        "",
        "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
        "",
        f"stepsafe: {src.get('commit', '?')} (code hash {src.get('hash', '?')})"
        + (
            " — **its code changed during the run: results mix versions**"
            if "stepsafe_source_at_end" in run
            else ""
        ),
        "",
        "## Targets",
        "",
        "stepsafe's MB/s over the peer's (medians): ≥ 0.8x the best one-object variant of the "
        "same client library, ≥ 1x Orbax, for save and restore, on each server. "
        '"borderline": within 10% of the target, where repeated runs on this 2-core '
        "machine have given either verdict.",
        "",
        *targets,
        f"**Overall: {'PASS' if all_pass else 'FAIL'}**",
        "",
        "## Per server",
        "",
        "Median MB/s (median seconds, min seconds). CPU: median CPU seconds of the benchmark "
        "process (all threads) and of the server process during the case.",
        "",
    ]
    for server in run["storages"]:
        out += _server_table(runs, server, nbytes)
    disturbed = runs.disturbed()
    if disturbed:
        out += [
            "## Disturbed cases",
            "",
            "Other processes (or the hypervisor: steal) took more than 10% of the cores during "
            "these cases: their times are suspect and left out of the medians above (unless "
            "every repeat of a cell was disturbed).",
            "",
        ]
        for r in disturbed:
            name = f"{r['storage']} {r['method']} {r.get('variant') or ''} {r['phase']}"
            steal = f", {r['steal_s']:.1f} s stolen" if "steal_s" in r else ""
            out.append(
                f"- {name} #{r['repeat'] + 1}: {r['other_cpu_s']:.1f} CPU s of other "
                f"processes{steal}, in {r['case_wall_s']:.1f} s"
            )
        out.append("")
    out.append(NOTES)
    problems = runs.problems()
    if problems:
        out += ["## Errors and mismatches", ""]
        for r in problems:
            what = r.get("error", "restored values differ from the saved ones")
            name = f"{r['storage']} {r['method']} {r.get('variant') or ''} {r['phase']}"
            out.append(f"- {name} #{r['repeat'] + 1}: {what[:300]}")
        out.append("")
    elapsed = run.get("elapsed_s", 0)
    out += [f"Raw records: `{json_path}` (git-ignored), {elapsed:.0f} s in all.", ""]
    return "\n".join(out)
