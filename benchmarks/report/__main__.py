"""``python -m benchmarks.report RUN.json [OUT.md]``: re-render a stored run."""

import json
import sys
from pathlib import Path

from benchmarks.report import default_results, render

path = Path(sys.argv[1])
run = json.loads(path.read_text())
out = Path(sys.argv[2]) if len(sys.argv) > 2 else default_results(run)
out.write_text(render(run, path))
print(out)
