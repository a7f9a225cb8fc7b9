"""Where stepsafe's time goes: cProfile of one save and one cold restore, each in a fresh process.

``.venv-bench/bin/python -m benchmarks.profile m95`` prints the top functions by own time and by
cumulative time, and keeps the stats under ``benchmarks/out/``. cProfile sees Python frames
only: time inside ``os.write``/``preadv``/xxhash shows as those calls, which is what we want.
"""

from __future__ import annotations

import argparse
import io
import os
import pstats
import sys

from benchmarks import fsutil, states
from benchmarks.run import OUT, SCRATCH, child


def top(stats_file: str, limit: int) -> str:
    out = io.StringIO()
    st = pstats.Stats(stats_file, stream=out)
    st.sort_stats("tottime").print_stats(limit)
    st.sort_stats("cumulative").print_stats(limit)
    return out.getvalue()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("state", choices=states.STATES, nargs="?", default="m95")
    p.add_argument("--method", default="stepsafe")
    p.add_argument("--top", type=int, default=15)
    a = p.parse_args()
    SCRATCH.mkdir(parents=True, exist_ok=True)
    path = str(SCRATCH / f"profile-{a.state}-{a.method}")
    fsutil.remove(path)
    os.sync()
    cold = fsutil.cold_method()
    with open(OUT / f"profile-{a.state}.log", "w") as log:
        for op in ("save", "restore"):
            stats = str(OUT / f"profile-{a.state}-{a.method}-{op}.pstats")
            if op == "restore":
                fsutil.evict(path, cold)
            rec = child(["--profile", stats, a.method, a.state, op, path], log, 900)
            if "error" in rec:
                sys.exit(f"{op} failed: {rec['error']}")
            print(f"==== {a.method} {op} {a.state}: {rec['seconds']:.3f} s ====")
            print(top(stats, a.top))
    fsutil.remove(path)


if __name__ == "__main__":
    main()
