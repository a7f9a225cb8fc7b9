"""The layers import only downward: a layer uses only the layers before it in this order, so
that the format never learns of runs and the manager never touches bytes. Imports inside
functions count too (they are how optional extras are imported, not a way around the order)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "stepsafe"
BASE = {"errors", "knobs"}  # every layer may use these; they use nothing of stepsafe but errors
ORDER = [
    "tree", "storage", "format", "distributed", "arrays", "checkpoint", "manager", "convert",
    "config", "cli", "demo",
]  # fmt: skip
PEERS = {"cli": {"demo"}, "demo": {"cli"}}  # the two faces may use each other


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "stepsafe" else None


def _imports(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "stepsafe":
                out += [(node.lineno, f"stepsafe.{a.name}") for a in node.names]
            else:
                out.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
    return out


def test_every_import_points_down():
    wrong = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC)
        if len(rel.parts) == 1:  # __init__, errors, knobs: checked below
            continue
        mine = rel.parts[0]
        assert mine in ORDER, f"{rel}: a folder that is no layer"
        for line, module in _imports(path):
            other = _layer(module)
            if other is None or other == mine or other in BASE or other in PEERS.get(mine, ()):
                continue
            if other not in ORDER or ORDER.index(other) > ORDER.index(mine):
                wrong.append(f"{rel}:{line} ({mine}) imports {module} ({other})")
    assert not wrong, "\n".join(wrong)


def test_the_base_modules_import_no_layer():
    for name in BASE:
        for line, module in _imports(SRC / f"{name}.py"):
            assert _layer(module) in (None, "errors"), f"{name}.py:{line} imports {module}"
