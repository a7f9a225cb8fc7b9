"""Every example runs as shipped, so none can rot: each script in examples/ in a subprocess of
the project's Python from an empty directory, each config through the flag checks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from stepsafe.config import load_config

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SCRIPTS = sorted(EXAMPLES.glob("*.py"))
CONFIGS = sorted(EXAMPLES.glob("configs/*.yml"))


def test_there_are_examples():
    assert SCRIPTS and CONFIGS  # a moved folder must not make the tests below vacuous


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_example_script_runs(script, tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    p = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert p.returncode == 0, p.stdout + p.stderr
    assert "Traceback" not in p.stderr


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_example_config_loads(config):
    load_config(str(config), [])
