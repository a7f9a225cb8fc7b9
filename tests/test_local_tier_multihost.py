"""The local tier (emergency checkpoints) under jax.distributed: 2 real processes on 127.0.0.1,
each with a local directory of its own, the persistent tier shared (a directory, or a bucket on
the loopback S3 server). A resume takes the newest local step every process holds and restores,
bit-exact with each process's iterator; a wiped disk, a step missing or damaged on one process,
or another mesh, sends both processes to the same older step, loudly.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import jax_processes
import numpy as np
import pytest
import servers

import stepsafe

jax = pytest.importorskip("jax")

# argv: persistent, local, phase, gen_of_the_step_restored, gen_of_new_steps, stop, options
# A step's values depend on the step and on the "generation" (which run saved it): a step saved
# again after a resume from an older one holds other values, so a mix of runs shows.
SCRIPT = """
import json, logging, sys, numpy as np, jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from stepsafe import CheckpointManager, ManagerOptions
from stepsafe.errors import StepsafeError, TargetMismatchError
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
pers, local, phase = sys.argv[1:4]
restored_gen, new_gen, stop = map(int, sys.argv[4:7])
options = json.loads(sys.argv[7])
me = jax.process_index()
mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "model"))
S = NamedSharding(mesh, P("data", "model"))
R = NamedSharding(mesh, P())
D = NamedSharding(mesh, P("data"))  # each process's box held twice, on both its devices
OTHER = NamedSharding(mesh, P("model", "data"))  # boxes process 0 never held

class Data:
    def __init__(self): self.pos = -1
    def get_state(self): return {"pos": self.pos, "process": me}
    def set_state(self, st): self.pos = st["pos"]; assert st["process"] == me, st

def values(step, gen):
    return {
        "w": np.arange(32, dtype=np.float32).reshape(8, 4) * (step + 1) + gen * 1000,
        "b": np.full(3, step + gen * 0.5, np.float32),
        "v": np.arange(8, dtype=np.int32) - step * 3 - gen,
        "n": np.arange(6, dtype=np.int32) * step + gen,
        "step": step,
    }

def state_at(step, gen):
    v = values(step, gen)
    return {
        "w": jax.make_array_from_callback((8, 4), S, lambda i: v["w"][i]),
        "b": jax.make_array_from_callback((3,), R, lambda i: v["b"][i]),
        "v": jax.make_array_from_callback((8,), D, lambda i: v["v"][i]),
        "n": v["n"],
        "step": v["step"],
    }

def target(w_sharding=S):
    return {
        "w": jax.ShapeDtypeStruct((8, 4), np.float32, sharding=w_sharding),
        "b": jax.ShapeDtypeStruct((3,), np.float32, sharding=R),
        "v": jax.ShapeDtypeStruct((8,), np.int32, sharding=D),
        "n": np.zeros(6, np.int32),
        "step": 0,
    }

def check(step, gen, got, data):
    v = values(step, gen)
    for k in ("w", "b", "v"):
        for sh in got[k].addressable_shards:
            assert np.array_equal(np.asarray(sh.data), v[k][sh.index]), (step, gen, k)
    np.testing.assert_array_equal(got["n"], v["n"])
    assert got["step"] == step and type(got["step"]) is int, got["step"]
    assert data.pos == step * 10 + me + gen * 1000, (step, gen, data.pos)

def train(m, start, gen):
    data = Data()
    for step in range(start + 1, stop + 1):
        data.pos = step * 10 + me + gen * 1000
        m.save(step, state_at(step, gen), data_iterator=data)
    m.wait_until_finished()

opts = {"save_interval_steps": 10, "local_directory": local, "local_save_interval_steps": 2}
opts.update(options)
try:
    m = CheckpointManager(pers, ManagerOptions(**opts))
except StepsafeError as e:
    print(f"refused {type(e).__name__}: {e}", flush=True)
    print("ok local steps -", flush=True)
    sys.exit(0)
with m:
    if phase == "train":
        train(m, 0, new_gen)
    elif phase in ("resume", "resume-train"):
        data = Data()
        step, got = m.restore_newest(target(), data_iterator=data)
        check(step, restored_gen, got, data)
        print(f"restored {step} from {m.restored_path}", flush=True)
        if phase == "resume-train":
            train(m, step, new_gen)
    elif phase == "explicit-14":
        try:
            m.restore(14, target(), data_iterator=Data())
        except StepsafeError as e:
            print(f"failed {type(e).__name__}: {e}", flush=True)
    elif phase == "resume-or-fail":
        try:
            m.restore_newest(target(), data_iterator=Data())
        except StepsafeError as e:
            print(f"failed {type(e).__name__}: {e}", flush=True)
    elif phase == "other-mesh":
        data = Data()
        step, got = m.restore_newest(target(OTHER), data_iterator=data)
        check(step, restored_gen, got, data)
        print(f"restored {step} from {m.restored_path}", flush=True)
        try:
            m.restore(14, target(OTHER), data_iterator=Data())
        except TargetMismatchError as e:
            print(f"explicit TargetMismatchError: {e}", flush=True)
    print(f"ok local steps {m.local_steps()}", flush=True)
"""


def run(
    pers: str, locals_: list[Path], phase: str, *, restored_gen: int = 0, new_gen: int = 0,
    stop: int = 15, **options: object,
) -> list[jax_processes.Result]:  # fmt: skip
    results = jax_processes.run(
        SCRIPT,
        2,
        args=lambda i, port: [
            pers,
            str(locals_[i]),
            phase,
            str(restored_gen),
            str(new_gen),
            str(stop),
            json.dumps(options),
        ],
        timeout_s=180,
    )
    everything = "\n".join(r.describe() for r in results)
    for r in results:
        assert r.returncode == 0 and "ok local steps" in r.stdout, everything
    return results


def restored(results: list[jax_processes.Result]) -> list[tuple[int, str]]:
    """(step, path) each process restored, as the script printed it."""
    found = []
    for r in results:
        line = next(s for s in r.stdout.splitlines() if s.startswith("restored "))
        _, step, _, path = line.split(" ", 3)
        found.append((int(step), path))
    return found


def failure(r: jax_processes.Result, pers: str) -> str:
    """The error the script printed, its test directory left out (its name may say "local")."""
    line = next(s for s in r.stdout.splitlines() if s.startswith("failed "))
    return line.replace(str(Path(pers).parent), "<tmp>")


def local_steps(results: list[jax_processes.Result]) -> list[str]:
    return [r.stdout.strip().splitlines()[-1].removeprefix("ok local steps ") for r in results]


@pytest.fixture
def job(tmp_path: Path) -> tuple[str, list[Path]]:
    """Steps 1..15 saved: local every 2 steps (12 and 14 kept), persistent step 10; returns
    (persistent, [local_p0, local_p1]). Trained for each test: a local directory is claimed by
    its run's persistent directory (``_LOCAL_TIER.json``), so a copy elsewhere is not the run's.
    """
    pers, locals_ = str(tmp_path / "persistent"), [tmp_path / "local_p0", tmp_path / "local_p1"]
    run(pers, locals_, "train")
    return pers, locals_


def step_names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.isdigit())


def test_each_process_saves_its_own_local_steps(job):
    pers, locals_ = job
    assert step_names(Path(pers)) == ["10"]
    for i, local in enumerate(locals_):
        assert step_names(local) == ["12", "14"]
        record = json.loads((local / "14" / "_CHECKPOINT_METADATA").read_text())
        assert "own_shards.json" in record["extra_files"]
        assert f"iter/process_{i}.json" in record["extra_files"]
        (raw,) = (local / "14").glob("own_shards.*.json")
        descriptor = json.loads(raw.read_text())
        assert (descriptor["process_index"], descriptor["process_count"]) == (i, 2)


def test_restart_resumes_from_the_newest_local_step_bit_exact(job):
    pers, locals_ = job
    results = run(pers, locals_, "resume")
    assert restored(results) == [(14, str(locals_[0] / "14")), (14, str(locals_[1] / "14"))]
    for r in results:
        assert "Restored step 14 from the local tier" in r.stderr, r.describe()


def test_a_wiped_local_disk_sends_both_to_the_persistent_tier_then_saves_anew(job):
    pers, locals_ = job
    shutil.rmtree(locals_[1])
    results = run(pers, locals_, "resume-train", restored_gen=0, new_gen=1)
    assert [s for s, _ in restored(results)] == [10, 10]
    for r in results:
        assert "Restored step 10 from the persistent tier" in r.stderr, r.describe()
        assert "lost its local disk" in r.stderr, r.describe()
    # process 0's steps 12 and 14 belong to the run that was not resumed: dropped, loudly
    assert "Deleting local checkpoint at step 14" in results[0].stderr
    assert local_steps(results) == ["[12, 14]", "[12, 14]"]
    # the next restart takes the new local step 14, the same values on both processes
    results = run(pers, locals_, "resume", restored_gen=1)
    assert [s for s, _ in restored(results)] == [14, 14]


def test_steps_that_differ_between_processes_take_the_common_newest(job):
    pers, locals_ = job
    shutil.rmtree(locals_[1] / "14")
    results = run(pers, locals_, "resume-train", new_gen=1)
    assert [s for s, _ in restored(results)] == [12, 12]
    for r in results:
        assert "Restored step 12 from the local tier" in r.stderr, r.describe()
    # process 0's old step 14 is dropped before the new one is saved: no mix of two runs
    assert "Deleting local checkpoint at step 14" in results[0].stderr, results[0].describe()
    results = run(pers, locals_, "resume", restored_gen=1)
    assert [s for s, _ in restored(results)] == [14, 14]


def test_a_damaged_local_step_on_one_process_is_passed_by_on_both(job):
    pers, locals_ = job
    data = next(p for p in (locals_[1] / "14" / "items").iterdir() if p.suffix == ".data")
    raw = bytearray(data.read_bytes())
    raw[0] ^= 0xFF
    data.write_bytes(bytes(raw))
    results = run(pers, locals_, "resume")
    assert [s for s, _ in restored(results)] == [12, 12]
    for r in results:
        assert "ERROR Local checkpoint at step 14 cannot be restored on process 1" in r.stderr
    assert data.exists()  # left in place for the user to inspect
    # asked for by number, the damaged step fails on both processes, naming process 1
    for r in run(pers, locals_, "explicit-14"):
        line = next(s for s in r.stdout.splitlines() if s.startswith("failed "))
        assert "CorruptCheckpointError" in line or "Checksum" in line, line
        assert r.index == 1 or "on process 1 of 2" in line, line


def test_swapped_local_disks_send_both_to_the_persistent_tier(job):
    """Each process finds the other's local directory (hosts reassigned): a step holds another
    process's shards and iterator, so neither counts it as its own."""
    pers, locals_ = job
    results = run(pers, locals_[::-1], "resume")
    assert [s for s, _ in restored(results)] == [10, 10]
    for r in results:
        assert "Restored step 10 from the persistent tier" in r.stderr, r.describe()
        assert "no local step is on every process" in r.stderr, r.describe()


def test_a_local_step_does_not_restore_onto_another_mesh(job):
    pers, locals_ = job
    results = run(pers, locals_, "other-mesh")
    assert [s for s, _ in restored(results)] == [10, 10]
    for r in results:
        assert "ERROR Local checkpoint at step 14 cannot be restored" in r.stderr, r.describe()
        assert "Restored step 10 from the persistent tier" in r.stderr, r.describe()
        line = next(s for s in r.stdout.splitlines() if s.startswith("explicit "))
        assert "persistent tier" in line, line


def test_two_processes_with_one_local_directory_are_refused(tmp_path):
    shared = tmp_path / "local"
    results = run(str(tmp_path / "persistent"), [shared, shared], "train")
    for r in results:
        assert "refused ConfigError" in r.stdout and "both use local" in r.stdout, r.describe()


def test_persistent_tier_in_a_bucket_local_tier_on_disk(s3_server, tmp_path):
    pers = f"s3://{servers.BUCKET}/local-tier-{uuid.uuid4().hex[:8]}"
    locals_ = [tmp_path / "local_p0", tmp_path / "local_p1"]
    run(pers, locals_, "train")
    results = run(pers, locals_, "resume")
    assert [s for s, _ in restored(results)] == [14, 14]
    shutil.rmtree(locals_[0])
    results = run(pers, locals_, "resume-train", restored_gen=0, new_gen=1, stop=17)
    assert [s for s, _ in restored(results)] == [10, 10]
    assert all("from the persistent tier" in r.stderr for r in results)
    assert restored(results)[0][1] == f"{pers}/10"
    results = run(pers, locals_, "resume", restored_gen=1)
    assert [s for s, _ in restored(results)] == [16, 16]


def test_no_step_that_restores_names_the_local_steps_that_did_not(job):
    """Both local steps damaged on process 1 and no persistent step: the error must not say
    that there is no checkpoint at all (the user would look for one in the wrong place), but
    why the newest local step did not restore, on both processes."""
    pers, locals_ = job
    shutil.rmtree(Path(pers) / "10")
    for step in ("12", "14"):
        data = next(p for p in (locals_[1] / step / "items").iterdir() if p.suffix == ".data")
        data.write_bytes(b"\0" * data.stat().st_size)
    results = run(pers, locals_, "resume-or-fail")
    for r in results:
        line = failure(r, pers)
        assert "ChecksumMismatchError" in line and "<tmp>/local_p1/14/" in line, line
        assert r.index == 1 or "on process 1 of 2" in line, line


def test_asking_for_a_local_step_one_process_lacks_says_so(job):
    """Step 14 is on process 0's local disk only: the error must say where it is and why it
    cannot be restored, not only that the persistent tier has no step 14."""
    pers, locals_ = job
    shutil.rmtree(locals_[1] / "14")
    for r in run(pers, locals_, "explicit-14"):
        line = failure(r, pers)
        assert "CheckpointNotFoundError" in line and "local" in line, line


def test_stepsafe_restore_of_one_process_s_local_step_says_what_it_is(job):
    """A local step of a many-process job holds one process's shards in an internal tree
    ({"leaves": ...}): ``stepsafe.restore`` (a user following the "resume: <path>" log line)
    must say so instead of returning that tree, or a mismatch listing 'leaves/0/0'."""
    step = str(job[1][1] / "14")
    like = {
        "w": np.zeros((8, 4), np.float32), "b": np.zeros(3, np.float32),
        "v": np.zeros(8, np.int32), "n": np.zeros(6, np.int32), "step": 0,
    }  # fmt: skip
    for target in (None, like):
        with pytest.raises(stepsafe.StepsafeError, match=r"holds the shards of process"):
            stepsafe.restore(step, target)
