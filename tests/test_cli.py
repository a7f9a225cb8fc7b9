"""The ``stepsafe`` command line: printed content, JSON and exit codes on runs built here."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from cli_runs import build_base, flip_byte, state_at

import stepsafe
from stepsafe.cli.main import COMMANDS, main


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")


@pytest.fixture
def base(tmp_path):
    return build_base(tmp_path / "out")


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def line_with(text: str, start: str) -> list[str]:
    """The whitespace-split cells of the first output line starting with ``start``."""
    for line in text.splitlines():
        if line.strip().startswith(start):
            return line.split()
    raise AssertionError(f"no line starting with {start!r} in:\n{text}")


def test_ls_table_totals_and_latest(base, capsys):
    code, out, _ = run(capsys, "ls", base)
    assert code == 0
    assert "Run: run1" in out and "Run: run2" in out
    assert line_with(out, "Step")[:5] == ["Step", "Size", "(MB)", "Files", "Status"]
    inv = json.loads(run(capsys, "ls", base, "--json")[1])
    sizes = {c["name"]: c for c in inv["runs"][0]["checkpoints"]}
    row = line_with(out, "20 ")
    assert row[:4] == ["20", f"{sizes['20']['size_bytes'] / 1e6:.2f}", "3", "Complete"]
    assert line_with(out, "15 ")[3] == "Incomplete"
    assert line_with(out, "40 (tmp)")[4] == "Incomplete"
    assert "Run total: 6 checkpoint(s) (3 incomplete)" in out
    run1 = out.split("Run: run2")[0]
    assert "Latest checkpoint: Step 30" in run1
    assert f"  Size: {sizes['30']['size_bytes'] / 1e6:.2f} MB" in run1
    assert "  Files: 3" in run1
    total = sum(r["size_bytes"] for r in inv["runs"])
    assert f"Grand Total: 2 run(s), 7 checkpoint(s), {total / 1e6:.2f} MB" in out


def test_ls_json(base, capsys):
    code, out, _ = run(capsys, "ls", base, "--run-name", "run1", "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["num_runs"] == 1 and doc["runs"][0]["name"] == "run1"
    r = doc["runs"][0]
    assert r["latest_step"] == 30 and r["num_complete"] == 3 and r["num_checkpoints"] == 6
    by_name = {c["name"]: c for c in r["checkpoints"]}
    assert by_name["15"]["status"] == "Incomplete" and by_name["10"]["status"] == "Complete"
    assert by_name["10"]["files"] == 3 and by_name["10"]["created"].startswith("20")
    assert r["size_bytes"] == sum(c["size_bytes"] for c in r["checkpoints"])


def test_ls_errors(tmp_path, capsys):
    code, out, err = run(capsys, "ls", tmp_path / "missing")
    assert code == 4 and out == ""  # not found
    assert err.startswith("stepsafe: error: ") and "does not exist" in err
    assert "hint: " in err and "Traceback" not in err
    tmp_path.joinpath("empty").mkdir()
    code, out, _ = run(capsys, "ls", tmp_path / "empty")
    assert code == 0 and "No runs found" in out and "Grand Total: 0 run(s)" in out
    code, _, err = run(capsys, "ls", tmp_path / "empty", "--run-name", "x")
    assert code == 4 and "no run 'x'" in err


def test_usage_errors_exit_2(capsys):
    assert run(capsys, "ls")[0] == 2
    assert run(capsys, "nosuchcommand")[0] == 2
    code, _, err = run(capsys, "gc", "somewhere", "--keep", "0")
    assert code == 2 and "--keep must be >= 1" in err


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_help_with_example(command, capsys):
    code, out, _ = run(capsys, command, "--help")
    assert code == 0
    assert "example:" in out and f"stepsafe {command}" in out.split("example:")[1]


def test_inspect(base, capsys):
    code, out, _ = run(capsys, "inspect", base / "run1/checkpoints/20")
    assert code == 0
    assert "Step: 20" in out
    assert "Kind: Stacked Training Checkpoint" in out
    assert "params/layers/* share leading axis 2" in out
    assert "Format version: 1" in out
    assert 'User metadata: {"loss": 2.0}' in out
    assert line_with(out, "kernel")[1:] == ["float32", "(2,", "8,", "16)", "1.02", "kB"]
    assert line_with(out, "opt_state ")[:2] == ["opt_state", "1"]
    assert re.search(r"^\s*step\s+int\s+= 20\s", out, re.M)  # an inline value, in the tree
    folded = run(capsys, "inspect", base / "run1", "--depth", "2")[1]
    assert "Step: 30" in folded  # a run: its latest step
    assert line_with(folded, "layers/")[1:4] == ["2", "arrays,", "folded"]
    assert "kernel" not in folded


def test_inspect_json_and_param_only(tmp_path, capsys):
    params = {
        "params": {
            "layers_0": {"w": np.ones((4, 4), np.float32)},
            "layers_1": {"w": np.ones((4, 4), np.float32)},
        }
    }
    stepsafe.save(tmp_path / "p", params, custom_metadata={"note": "export"})
    code, out, _ = run(capsys, "inspect", tmp_path / "p", "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["kind"]["label"] == "Unstacked Param-only (Inference) Checkpoint"
    assert doc["custom_metadata"] == {"note": "export"}
    assert doc["num_arrays"] == 2 and doc["nbytes"] == 128
    assert [a["key"] for a in doc["arrays"]] == ["params/layers_0/w", "params/layers_1/w"]
    assert doc["groups"] == [{"name": "params", "num_arrays": 2, "nbytes": 128}]


def test_inspect_incomplete_or_missing(base, capsys):
    code, _, err = run(capsys, "inspect", base / "run1/checkpoints/15")
    assert code == 5 and ("never committed" in err or "not a committed" in err)
    assert "Traceback" not in err and "hint:" in err
    code, _, err = run(capsys, "inspect", base / "nope")
    assert code == 4 and "does not exist" in err


def test_verify_ok_and_flipped_byte(base, capsys):
    code, out, _ = run(capsys, "verify", base / "run1/checkpoints/20", "--no-progress")
    assert code == 0 and out.startswith("OK") and "every checksum matches" in out
    path, offset = flip_byte(base / "run1/checkpoints/20", "params/layers/mlp/kernel")
    code, out, err = run(capsys, "verify", base / "run1", "--no-progress")
    assert code == 1
    assert out.count("OK ") == 2 and "FAILED" in out
    row = line_with(out, "checksum")
    assert row[1:4] == ["params/layers/mlp/kernel", str(path), str(offset)]
    assert "1 of 3 checkpoint(s) failed verification" in err
    doc = json.loads(run(capsys, "verify", base / "run1/checkpoints/20", "--json")[1])
    assert doc["ok"] is False
    (problem,) = doc["checkpoints"][0]["problems"]
    assert (problem["key"], problem["file"], problem["offset"]) == (
        "params/layers/mlp/kernel", str(path), offset
    )  # fmt: skip


def test_verify_missing_data_file(base, capsys):
    for f in (base / "run2/checkpoints/7/items").glob("*.data"):
        f.unlink()
    code, out, _ = run(capsys, "verify", base / "run2", "--no-progress")
    assert code == 1
    assert line_with(out, "missing")[1] == "-"  # the file itself
    assert "params/embed" in out


def test_gc_dry_run_then_delete(base, capsys):
    d = base / "run1/checkpoints"
    before = sorted(p.name for p in d.iterdir())
    code, out, _ = run(capsys, "gc", base / "run1", "--keep", "1", "--dry-run")
    assert code == 0 and sorted(p.name for p in d.iterdir()) == before
    assert line_with(out, "20 ")[1:3] == ["would", "delete"]
    assert line_with(out, "30 ")[1] == "keep"
    assert line_with(out, "40 (tmp)")[2] == "keep"
    assert "Would delete 4 checkpoint(s)" in out and "dry run" in out
    code, out, _ = run(capsys, "gc", base / "run1", "--keep", "1", "--json")
    doc = json.loads(out)
    assert code == 0 and doc["deleted"] is True and doc["bytes_freed"] > 0
    assert sorted(x["step"] for x in doc["delete"]) == [5, 10, 15, 20]
    assert sorted(p.name for p in d.iterdir()) == ["30", "40.stepsafe-tmp-elsewhere-2-ef01"]
    code, out, _ = run(capsys, "gc", base / "run1", "--keep", "1")
    assert code == 0 and "Deleted 0 checkpoint(s)" in out
    assert sorted(p.name for p in d.iterdir()) == ["30", "40.stepsafe-tmp-elsewhere-2-ef01"]


def test_gc_not_a_run(base, capsys):
    code, _, err = run(capsys, "gc", base / "run1/checkpoints/30", "--keep", "1")
    assert code == 6 and "not a run directory" in err and "hint:" in err


def test_diff(tmp_path, capsys):
    a, b = state_at(3), state_at(3)
    b["params"]["embed"] = b["params"]["embed"] * 0 + a["params"]["embed"] + np.float32(0.25)
    b["params"]["extra"] = np.zeros(2, np.float32)
    del b["opt_state"]
    stepsafe.save(tmp_path / "a", a)
    stepsafe.save(tmp_path / "b", b)
    code, out, _ = run(capsys, "diff", tmp_path / "a", tmp_path / "b")
    assert code == 1  # they differ
    assert line_with(out, "added")[1:] == ["params/extra", "float32[2]"]
    assert line_with(out, "removed")[1:] == ["opt_state/mu", "float32[32,", "8]"]
    assert "1 added, 1 removed, 0 changed" in out and "Values" not in out
    code, out, _ = run(capsys, "diff", tmp_path / "a", tmp_path / "b", "--values", "--no-progress")
    assert code == 1
    assert line_with(out, "params/embed")[1] == "0.25"
    assert "Values: 1 of 3 compared arrays differ" in out
    doc = json.loads(run(capsys, "diff", tmp_path / "a", tmp_path / "a", "--values", "--json")[1])
    assert doc["added"] == {} and doc["removed"] == {} and doc["changed"] == []
    assert all(v["equal"] and v["max_abs_diff"] == 0.0 for v in doc["values"])
