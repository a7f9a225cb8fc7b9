"""Tunables have one home, stepsafe.knobs: each is overridable from the environment, a bad
override is a clear error naming the variable, and no module keeps a tunable of its own."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "stepsafe"


def _knob(env: dict[str, str], name: str) -> subprocess.CompletedProcess:
    code = f"import stepsafe.knobs as k; print(k.{name})"
    return subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_environment_overrides_a_knob():
    p = _knob({"STEPSAFE_PART_SIZE": str(16 << 20)}, "PART_SIZE")
    assert p.returncode == 0, p.stderr
    assert int(p.stdout) == 16 << 20
    p = _knob({"STEPSAFE_LEASE_RENEW_S": "2.5"}, "LEASE_RENEW_S")
    assert float(p.stdout) == 2.5


@pytest.mark.parametrize(
    ("var", "value", "words"),
    [
        ("STEPSAFE_IO_THREADS", "eight", "is not an integer"),
        ("STEPSAFE_IO_THREADS", "0", "below its minimum"),
        ("STEPSAFE_PART_SIZE", str(1 << 20), "below its minimum"),
        ("STEPSAFE_LEASE_TIMEOUT_S", "-1", "positive number of seconds"),
    ],
)
def test_a_bad_override_names_the_variable(var, value, words):
    p = _knob({var: value}, var.removeprefix("STEPSAFE_"))
    assert p.returncode != 0
    last = p.stderr.strip().splitlines()[-1]
    assert "ConfigError" in last and var in last and words in last, last


def test_every_knob_is_documented():
    from stepsafe import knobs

    assert len(knobs.KNOBS) >= 15
    for knob in knobs.KNOBS.values():
        assert len(knob.doc) > 30 and knob.unit in ("bytes", "count", "elements", "seconds")
        assert knob.variable.startswith("STEPSAFE_"), knob
        assert getattr(knobs, knob.name) == knob.default  # no variable set in the tests


def test_a_bad_setting_fails_where_it_is_used_not_at_import(tmp_path):
    """A bad S3 setting must not stop a local save; a setting made after import counts."""
    code = (
        "import os, numpy as np, stepsafe\n"
        "from stepsafe import knobs\n"
        f"stepsafe.save({str(tmp_path / 'c')!r}, {{'w': np.ones(3)}})\n"
        "os.environ['STEPSAFE_S3_READ_TIMEOUT'] = '7'\n"
        "print(knobs.S3_READ_TIMEOUT_S)\n"
        "knobs.S3_READ_TIMEOUT_S = 3.0\n"
        "print(knobs.S3_READ_TIMEOUT_S)\n"
        "del knobs.S3_READ_TIMEOUT_S\n"
        "print(knobs.S3_READ_TIMEOUT_S)\n"
        "knobs.S3_MAX_ATTEMPTS\n"
    )
    p = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "STEPSAFE_S3_MAX_ATTEMPTS": "many"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.stdout.split() == ["7.0", "3.0", "7.0"], p.stderr
    assert (tmp_path / "c" / "_CHECKPOINT_METADATA").exists()
    last = p.stderr.strip().splitlines()[-1]
    assert "ConfigError" in last and "STEPSAFE_S3_MAX_ATTEMPTS='many'" in last, last


TUNABLES = re.compile(
    r"^(WINDOW_BYTES|PART_SIZE|SINGLE_UPLOAD_MAX|READ_SPAN|READ_GAP|FILE_SIZE|IO_THREADS|"
    r"PARALLEL_BYTES|PARALLEL_COPY_BYTES|MAX_PARTS_IN_FLIGHT|PARTS_PER_FILE|_SYNC_NOW|"
    r"_KICK_BYTES|_GATHER|BLOCK_ELEMENTS|RENEW_S|TIMEOUT_S|DEFAULT_CONCURRENT_BYTES)\s*=",
    re.M,
)


def test_no_module_keeps_its_own_tunable():
    found = [
        f"{p.relative_to(SRC)}: {m.group(1)}"
        for p in SRC.rglob("*.py")
        if p.name != "knobs.py"
        for m in TUNABLES.finditer(p.read_text())
    ]
    assert not found, found


def test_no_module_reads_a_stepsafe_variable_outside_its_home():
    """Tunables are read in knobs.py; connection settings (endpoints, credentials) in the
    backend that uses them. Nothing else reads STEPSAFE_* variables."""
    homes = {"knobs.py", "storage/s3.py", "storage/gcs.py", "storage/dispatch.py"}
    readers = [
        str(p.relative_to(SRC))
        for p in SRC.rglob("*.py")
        if "STEPSAFE_" in p.read_text() and str(p.relative_to(SRC)) not in homes
    ]
    assert not readers, readers
