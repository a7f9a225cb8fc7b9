"""The public surface: what ``import stepsafe`` offers, and what its errors say.

Every class in ``stepsafe.errors`` is exported at the top level (one ``except`` target per kind
of failure, without importing submodules); the top level holds the public API only, no
local-disk helpers; ``ManagerOptions`` refuses bad values with a ``ConfigError`` naming its own
field and the MaxText flag behind it; a malformed saved structure is a ``ManifestError``, never a
bare ``ValueError``; public functions document their arguments, failures and use.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
import types
from pathlib import Path

import numpy as np
import pytest

import stepsafe
from stepsafe import errors

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "stepsafe"


def _error_classes() -> dict[str, type]:
    return {
        name: obj
        for name, obj in vars(errors).items()
        if isinstance(obj, type)
        and issubclass(obj, BaseException)
        and obj.__module__ == errors.__name__
    }


def test_every_exported_name_is_importable():
    namespace: dict = {}
    exec("from stepsafe import *", namespace)
    for name in stepsafe.__all__:
        assert namespace[name] is getattr(stepsafe, name), name
    for name in ("CheckpointManager", "ManagerOptions", "StopRequest", "save", "restore"):
        assert name in stepsafe.__all__, name


def test_every_error_class_is_exported_and_is_a_stepsafe_error():
    classes = _error_classes()
    assert len(classes) >= 18, sorted(classes)
    for name, cls in classes.items():
        assert name in stepsafe.__all__, f"stepsafe does not export {name}"
        assert getattr(stepsafe, name) is cls, name
        assert issubclass(cls, stepsafe.StepsafeError), name


def test_top_level_is_the_public_api_only():
    """Besides submodules and ``__version__``, every public name at the top level is in
    ``__all__``: local-disk helpers (stale temporaries) live in ``stepsafe.storage``."""
    for helper in ("stale_temporaries", "remove_stale_temporaries"):
        assert not hasattr(stepsafe, helper), helper
        assert helper not in stepsafe.__all__, helper
    loose = [
        name
        for name, obj in vars(stepsafe).items()
        if not name.startswith("_") and not isinstance(obj, types.ModuleType)
    ]
    assert sorted(set(loose) - set(stepsafe.__all__)) == []


def test_background_save_error_is_one_class_in_every_home():
    from stepsafe.manager import BackgroundSaveError
    from stepsafe.manager.async_writer import BackgroundSaveError as from_writer

    assert BackgroundSaveError is errors.BackgroundSaveError is stepsafe.BackgroundSaveError
    assert from_writer is errors.BackgroundSaveError
    assert errors.BackgroundSaveError.__module__ == "stepsafe.errors"


@pytest.mark.parametrize(
    "field, value, flag, rule",
    [
        ("save_interval_steps", 0, "checkpoint_period", ">= 1"),
        ("max_to_keep", -1, "max_num_checkpoints_to_keep", ">= 0"),
        ("concurrent_bytes", 0, "checkpoint_storage_concurrent_gb", ">= 1"),
        ("data_file_size_bytes", 10, "checkpoint_storage_target_data_file_size_bytes", ">= 64"),
    ],
)
def test_manager_options_errors_name_the_field_and_the_flag(field, value, flag, rule):
    with pytest.raises(stepsafe.ConfigError) as e:
        stepsafe.ManagerOptions(**{field: value})
    message = str(e.value)
    assert f"ManagerOptions.{field}" in message and f"flag {flag}" in message, message
    assert rule in message and str(value) in message, message
    assert isinstance(e.value, ValueError)  # ``except ValueError`` callers still catch it


def test_manager_options_flags_cover_every_field():
    from stepsafe.manager.options import FLAGS

    assert list(FLAGS) == [f.name for f in dataclasses.fields(stepsafe.ManagerOptions)]


def test_a_data_file_size_too_small_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(stepsafe.ConfigError, match="data_file_size_bytes must be at least 64"):
        stepsafe.save(tmp_path / "1", {"w": np.ones(4)}, data_file_size_bytes=10)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "structure",
    [
        "leaf",
        [],
        ["leaf", "extra"],
        ["dict", ["a"], "not a list"],
        ["dict", ["a", "b"], [["leaf"]]],
        ["namedtuple", 3, ["a"], [["leaf"]]],
        ["dict", [1.5], [["leaf"]]],
        ["bogus"],
    ],
)
def test_malformed_structures_are_manifest_errors(structure):
    from stepsafe.tree import check_structure

    with pytest.raises(stepsafe.ManifestError) as e:
        check_structure(structure)
    assert isinstance(e.value, stepsafe.StepsafeError)


def test_too_deep_and_unknown_structures_are_manifest_errors():
    from stepsafe.tree import check_structure, structure_paths

    deep: list = ["leaf"]
    for _ in range(300):
        deep = ["list", [deep]]
    with pytest.raises(stepsafe.ManifestError, match="deeper"):
        check_structure(deep)
    with pytest.raises(stepsafe.ManifestError, match="unknown structure node"):
        structure_paths(["dict", ["a"], [["bogus", 1]]])


def test_a_manifest_with_a_malformed_structure_names_the_file(tmp_path):
    """End to end: a structure edited into a saved manifest is reported as a corrupt manifest
    naming its file (a ``CorruptCheckpointError``), not as a bare ValueError."""
    from stepsafe.format import Manifest

    stepsafe.save(tmp_path / "1", {"w": np.ones(4)})
    (path,) = (tmp_path / "1" / "items").glob("manifest.*.json")
    doc = json.loads(path.read_text())
    doc["structure"] = ["dict", ["w", "x"], [["leaf"]]]
    with pytest.raises(stepsafe.ManifestError, match=re.escape(path.name)) as e:
        Manifest.from_json(json.dumps(doc).encode(), str(path))
    assert isinstance(e.value, stepsafe.CorruptCheckpointError)


def _raises_value_error(path: Path) -> list[str]:
    text = path.read_text()
    return [
        f"{path.name}:{i}"
        for i, line in enumerate(text.splitlines(), 1)
        if "raise ValueError" in line
    ]


def test_no_plain_value_error_is_raised_by_the_tree_or_the_manager():
    files = [*sorted((SRC / "tree").glob("*.py"))] + [
        SRC / "manager" / name
        for name in ("manager.py", "options.py", "existing_steps.py", "resume.py")
    ]
    found = [hit for f in files for hit in _raises_value_error(f)]
    assert found == []


PUBLIC = [
    stepsafe.save,
    stepsafe.restore,
    stepsafe.metadata,
    stepsafe.info,
    stepsafe.CheckpointManager,
    stepsafe.CheckpointManager.save,
    stepsafe.CheckpointManager.restore,
    stepsafe.CheckpointManager.restore_newest,
    stepsafe.ManagerOptions,
    stepsafe.StopRequest,
]


@pytest.mark.parametrize("obj", PUBLIC, ids=lambda o: o.__qualname__)
def test_public_functions_document_args_raises_and_an_example(obj):
    doc = inspect.getdoc(obj) or ""
    for section in ("Args:", "Example:"):
        assert section in doc, f"{obj.__qualname__} has no {section}"
    if obj is not stepsafe.StopRequest:
        assert "Raises:" in doc, f"{obj.__qualname__} has no Raises:"
    if inspect.isfunction(obj):
        assert "Returns:" in doc, f"{obj.__qualname__} has no Returns:"
        params = [p for p in inspect.signature(obj).parameters if p != "self"]
        for name in params:
            assert re.search(rf"^\s+{name} \(", doc, re.M), f"{obj.__qualname__}: {name}"


def test_diff_and_config_loading_are_documented():
    from stepsafe.checkpoint.diff import diff
    from stepsafe.config import load_config, validate

    for fn in (diff, load_config, validate):
        doc = inspect.getdoc(fn) or ""
        assert all(s in doc for s in ("Args:", "Raises:", "Example:")), fn.__name__


def test_no_internal_document_numbers_are_cited():
    """Readers outside the project have no numbered design documents: the code, the README
    and the help texts cite MaxText's checkpoint docs, or state the rule."""
    cited = re.compile(r"\bseeds?\s+\d{3}\b|\bthe seeds\b", re.I)
    paths = [ROOT / "README.md", *SRC.rglob("*.py")]
    found = [str(p.relative_to(ROOT)) for p in paths if cited.search(p.read_text())]
    assert found == []
