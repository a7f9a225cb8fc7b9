"""Library functions behind the CLI: inventory, gc, verify, diff, checkpoint kind."""

from __future__ import annotations

import numpy as np
import pytest
from cli_runs import build_base, chunk_of, flip_byte, state_at

import stepsafe
from stepsafe.checkpoint.diff import diff
from stepsafe.checkpoint.kind import classify
from stepsafe.checkpoint.run_layout import step_of
from stepsafe.checkpoint.summary import summarize
from stepsafe.checkpoint.verify import verify, verify_targets
from stepsafe.cli.main import main
from stepsafe.manager.gc import gc
from stepsafe.manager.inventory import list_runs


@pytest.fixture
def base(tmp_path):
    return build_base(tmp_path / "out")


def test_inventory_lists_runs_steps_status_and_sizes(base):
    inv = list_runs(str(base))
    assert [r.name for r in inv.runs] == ["run1", "run2"]
    run1 = inv.runs[0]
    assert [(s.step, s.status, s.temporary) for s in run1.steps] == [
        (5, "Incomplete", True),
        (10, "Complete", False),
        (15, "Incomplete", False),
        (20, "Complete", False),
        (30, "Complete", False),
        (40, "Incomplete", True),
    ]
    assert run1.latest.step == 30
    s10 = run1.steps[1]
    files = [p for p in (base / "run1/checkpoints/10").rglob("*") if p.is_file()]
    assert s10.num_files == len(files) == 3
    assert s10.size_bytes == sum(p.stat().st_size for p in files)
    assert s10.created_nsecs is not None and run1.steps[0].created_nsecs is None
    assert inv.size_bytes == sum(s.size_bytes for r in inv.runs for s in r.steps)
    assert [r.name for r in list_runs(str(base), "run2").runs] == ["run2"]
    assert list_runs(str(base), "nope").runs == []
    assert [r.name for r in list_runs(str(base / "run2")).runs] == ["run2"]  # a run dir itself


def test_step_of():
    local = stepsafe.storage.LocalStorage()
    assert step_of(local, "300") == 300 and step_of(local, "300.stepsafe-tmp-h-1-ab") == 300
    assert step_of(local, "tensorboard") is None and step_of(local, "x.stepsafe-tmp-h-1-ab") is None


def test_gc_dry_run_then_real_keeps_newest_and_running_saves(base):
    d = base / "run1" / "checkpoints"
    before = sorted(p.name for p in d.iterdir())
    plan = gc(str(base / "run1"), keep=2, dry_run=True)
    assert sorted(p.name for p in d.iterdir()) == before  # nothing deleted
    assert sorted(a.entry.name for a in plan.delete) == [
        "10",
        "15",
        "5.stepsafe-tmp-elsewhere-1-abcd",
    ]
    assert sorted(a.entry.name for a in plan.keep) == [
        "20",
        "30",
        "40.stepsafe-tmp-elsewhere-2-ef01",
    ]
    plan = gc(str(d), keep=1)
    assert plan.done and not plan.dry_run
    assert sorted(p.name for p in d.iterdir()) == ["30", "40.stepsafe-tmp-elsewhere-2-ef01"]
    assert stepsafe.restore(str(base / "run1"))["step"] == 30
    with pytest.raises(ValueError):
        gc(str(base / "run1"), keep=0)


def test_verify_clean_and_flipped_byte(base):
    step20 = base / "run1/checkpoints/20"
    ok = verify(str(step20))
    assert ok.ok and ok.step == 20 and ok.bytes_checked == ok.bytes_total > 0
    path, offset = flip_byte(step20, "params/embed")
    seen = []
    bad = verify(str(step20), progress=lambda done, total: seen.append((done, total)))
    assert [(p.kind, p.key, p.file, p.offset) for p in bad.problems] == [
        ("checksum", "params/embed", str(path), offset)
    ]
    assert seen[-1] == (bad.bytes_total, bad.bytes_total)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_verify_missing_file_and_corrupt_metadata(base):
    step10 = base / "run1/checkpoints/10"
    name, _, _ = chunk_of(step10, "params/embed")
    (step10 / "items" / name).unlink()
    r = verify(str(step10))
    kinds = {p.kind for p in r.problems}
    assert kinds == {"missing"}
    assert "params/embed" in {p.key for p in r.problems}
    meta = base / "run1/checkpoints/30/_CHECKPOINT_METADATA"
    meta.write_text(meta.read_text().replace('"step": 30', '"step": 31'))
    r = verify(str(base / "run1/checkpoints/30"))
    assert [p.kind for p in r.problems] == ["metadata"] and r.problems[0].file == str(meta)
    # a run: every step with a marker, the corrupt one included; never-committed 15 left out
    targets = verify_targets(str(base / "run1"))
    assert [t.rsplit("/", 1)[1] for t in targets] == ["10", "20", "30"]


def test_diff_structure_and_values(tmp_path):
    a = state_at(1)
    b = state_at(1)
    b["params"]["embed"] = b["params"]["embed"] + np.float32(0.5)
    del b["opt_state"]
    b["params"]["new"] = np.zeros(3, np.int8)
    b["params"]["layers"]["norm"]["scale"] = np.ones((3, 8), np.float32)
    stepsafe.save(tmp_path / "a", a)
    stepsafe.save(tmp_path / "b", b)
    d = diff(str(tmp_path / "a"), str(tmp_path / "b"), values=True)
    assert list(d.added) == ["params/new"] and str(d.added["params/new"]) == "int8[3]"
    assert list(d.removed) == ["opt_state/mu"]
    assert [(c.key, str(c.before), str(c.after)) for c in d.changed] == [
        ("params/layers/norm/scale", "float32[2, 8]", "float32[3, 8]")
    ]
    by_key = {v.key: v for v in d.values}
    assert by_key["params/embed"].max_abs_diff == pytest.approx(0.5, abs=1e-6)
    assert by_key["params/layers/mlp/kernel"].equal
    assert "params/layers/norm/scale" not in by_key  # shapes differ: not comparable
    assert diff(str(tmp_path / "a"), str(tmp_path / "b")).values is None


def test_diff_without_values_finds_other_bytes_from_checksums(tmp_path, capsys):
    """Same keys, dtypes and shapes, other contents: the checksums tell, without reading."""
    a, b = state_at(1), state_at(1)
    b["params"]["embed"] = b["params"]["embed"] + np.float32(0.5)
    stepsafe.save(tmp_path / "a", a)
    stepsafe.save(tmp_path / "b", b)
    stepsafe.save(tmp_path / "c", state_at(1), data_file_size_bytes=64)  # cut differently
    d = diff(str(tmp_path / "a"), str(tmp_path / "b"))
    assert d.structure_equal and d.contents_differ == ["params/embed"] and not d.contents_unknown
    assert diff(str(tmp_path / "a"), str(tmp_path / "a")).contents_differ == []
    assert main(["diff", str(tmp_path / "a"), str(tmp_path / "b")]) == 1
    assert "params/embed" in capsys.readouterr().out
    assert main(["diff", str(tmp_path / "a"), str(tmp_path / "a")]) == 0
    d = diff(str(tmp_path / "a"), str(tmp_path / "c"))
    assert not d.contents_differ and d.contents_unknown


def test_kind_heuristic():
    stacked = {"params/layers/mlp/kernel": (4, 8, 8), "params/layers/norm": (4, 8)}
    assert classify({**stacked, "opt_state/mu/layers/mlp/kernel": (4, 8, 8)}).label == (
        "Stacked Training Checkpoint"
    )
    unstacked = {"params/layers_0/mlp": (8, 8), "params/layers_1/mlp": (8, 8)}
    k = classify(unstacked)
    assert (k.training, k.stacking) == (False, "unstacked")
    assert "layers_0" in k.evidence
    mixed_lead = {"params/layers/mlp/kernel": (4, 8), "params/layers/norm": (3,)}
    assert classify(mixed_lead).stacking == "unknown"
    assert classify({"params/dense": (8, 8)}).stacking == "unknown"
    maxtext = {  # MaxText's scanned layers: the layer axis is 1 (param_scan_axis)
        "params/decoder/layers/mlp/wi/kernel": (16, 3, 64),
        "params/decoder/layers/mlp/wo/kernel": (64, 3, 16),
        "params/decoder/layers/norm/scale": (16, 3),
    }
    k = classify(maxtext)
    assert k.stacking == "stacked" and "share axis 1, of length 3" in k.evidence


def test_summary_tree_depth_and_groups(base):
    s = summarize(str(base / "run1"))  # a run: its latest committed step
    assert s.info.step == 30 and s.kind.label == "Stacked Training Checkpoint"
    groups = {g.name: (g.num_arrays, g.nbytes) for g in s.groups}
    assert groups == {
        "opt_state": (1, 32 * 8 * 4),
        "params": (3, (256 + 16 + 256) * 4),
        "step": (0, 0),
    }
    full = [r.key for r in s.tree()]
    assert "params/layers/mlp/kernel" in full
    folded = s.tree(depth=2)
    assert [r.key for r in folded if r.level == 1 and r.collapsed] == ["params/layers"]
    assert max(r.level for r in folded) == 1
