"""The README's first Python example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest.importorskip("jax")


def test_readme_python_example_runs(tmp_path, monkeypatch):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert int(namespace["state"]["step"]) == 1000
    assert set(namespace["params"]) == {"dense"}
    assert (tmp_path / "ckpt" / "1000" / "_CHECKPOINT_METADATA").exists()
