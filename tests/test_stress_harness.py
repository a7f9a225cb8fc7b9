"""The torture harness (stress/) must be able to fail: its detectors flag each broken promise,
and the command exits 1 with a rerun line. (The short campaigns themselves run after pytest in
scripts/test; these tests cover what a run against a healthy library never exercises.)"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from stress import checks, runner
from stress.kill import manager
from stress.report import Result
from stress.states import make_state


@pytest.fixture
def run_dir(tmp_path: Path) -> str:
    run = str(tmp_path / "run")
    with manager(run) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, make_state(step, 4096), force=True)
    return run


def test_a_step_holding_another_steps_state_is_committed_but_wrong(run_dir):
    assert checks.wrong_steps(run_dir, dict.fromkeys((1, 2, 3), 4096)) == []
    ckpt = Path(checks.ckpt_dir(run_dir))
    shutil.rmtree(ckpt / "2")
    shutil.copytree(ckpt / "3", ckpt / "2")  # committed, intact, but the state of step 3
    problems = checks.wrong_steps(run_dir, dict.fromkeys((1, 2, 3), 4096))
    assert len(problems) == 1 and "step 2 restores WRONG data" in problems[0], problems


def test_a_vanished_step_is_lost_unless_retention_could_remove_it(run_dir):
    shutil.rmtree(Path(checks.ckpt_dir(run_dir)) / "1")
    assert checks.lost_steps(run_dir, {1, 2, 3}, keep=2) == []  # 2 and 3 are newer: fine
    problems = checks.lost_steps(run_dir, {1, 2, 3}, keep=0)
    assert len(problems) == 1 and "step 1 was committed before" in problems[0], problems


def test_half_deleted_steps_and_temporaries_are_leftovers(run_dir):
    assert checks.leftovers(run_dir) == []
    ckpt = Path(checks.ckpt_dir(run_dir))
    (ckpt / "1" / "_CHECKPOINT_METADATA").unlink()  # a deletion cut short
    (ckpt / "4.stepsafe-tmp-elsewhere-1-abc").mkdir()
    found = checks.leftovers(run_dir)
    assert any(x.startswith("1 ") for x in found) and any("tmp" in x for x in found), found


class BrokenCampaign:
    NAME, PROMISE, TRIALS = "broken", "a promise", {"short": 3, "full": 3}

    @staticmethod
    def run(result: Result, trials: list[int]) -> None:
        result.trials = len(trials)
        result.fail(trials[1], "committed step 5 restores WRONG data")


def test_a_broken_promise_exits_1_and_prints_how_to_rerun_it(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(runner.CAMPAIGNS, "broken", BrokenCampaign)
    out = tmp_path / "figures.json"
    rc = runner.main(["--campaign", "broken", "--seed", "40", "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 1
    assert "BROKEN" in text and "--campaign broken --seed 41 --trials 1" in text, text
    assert '"failed_trials": 1' in out.read_text()
