"""The ``distributed`` layer with real jax.distributed processes on 127.0.0.1.

Each multi-process test starts 2 processes (tests/jax_processes.py); every process runs several
checks and prints ``ok``-lines, and the test asserts on every process's lines.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import jax_processes
import pytest

from stepsafe.distributed import CoordinationError, coordinator, process_count, process_index
from stepsafe.errors import StepsafeError

jax = pytest.importorskip("jax")

SRC = Path(__file__).resolve().parents[1] / "src" / "stepsafe"

EXCHANGES = """
import threading, time
from stepsafe.distributed import coordinator, is_multiprocess, process_count, process_index
from stepsafe.distributed.client import jax_client

c = coordinator()
me = process_index()
assert is_multiprocess() and process_count() == 2 and me == _index, (me, process_count())
assert type(jax_client()).__name__ == "DistributedRuntimeClient"

# set in one process, get in the other, both from background threads
got = {}
def worker():
    c.set(f"hello/{me}", f"from {me}".encode())
    got["v"] = c.get(f"hello/{1 - me}", timeout_s=30)
t = threading.Thread(target=worker); t.start(); t.join(60)
assert got["v"] == f"from {1 - me}".encode(), got
print("ok set/get from threads")

# the same barrier name twice, and a barrier from a background thread
c.barrier("twice", timeout_s=30); c.barrier("twice", timeout_s=30)
t = threading.Thread(target=c.barrier, args=("threaded", 30)); t.start(); t.join(60)
print("ok barriers")

for size in (3000, 1 << 20):
    value = bytes((i * 7 + size) % 251 for i in range(size)) if me == 0 else None
    out = c.broadcast(f"bc{size}", value, timeout_s=30)
    assert out == bytes((i * 7 + size) % 251 for i in range(size)), (size, len(out))
    mine = bytes([me + 1]) * (size + me)
    parts = c.all_gather(f"ag{size}", mine, timeout_s=30)
    assert parts == [b"\\x01" * size, b"\\x02" * (size + 1)], [len(p) for p in parts]
print("ok broadcast and all_gather of 3000 B and 1 MiB")

got = c.gather("g", bytes([me]) * 3, timeout_s=30)  # to process 0 only
assert got == ([b"\\x00" * 3, b"\\x01" * 3] if me == 0 else None), got
c.barrier("gathered", timeout_s=30)
print("ok gather")

# nothing of a finished exchange stays in the store (only the two set/get keys). Process 0
# deletes an exchange's keys after everyone has its result, so look only once both processes
# passed one more barrier (whose arrival keys, and the next one's, may be there).
c.barrier("end", timeout_s=30)
left = sorted(k for k, _ in c.store.dir_get("stepsafe/") if not ("/end#" in k or "/checked#" in k))
assert left == ["stepsafe/kv/hello/0", "stepsafe/kv/hello/1"], left
c.barrier("checked", timeout_s=30)
if me == 0:
    c.delete("hello")
    assert c.store.dir_get("stepsafe/kv/") == [], c.store.dir_get("stepsafe/kv/")
print("ok keys cleaned up")
"""

ABSENT = """
import os, signal, time
from stepsafe.distributed import CoordinationError, coordinator, process_index
from stepsafe.errors import StepsafeError

c = coordinator()
me = process_index()
c.barrier("start", timeout_s=30)
if me == 0:
    # process 1 is alive but never comes to this barrier
    t0 = time.monotonic()
    try:
        c.barrier("never", timeout_s=3)
        print("barrier returned")
    except CoordinationError as e:
        assert isinstance(e, StepsafeError) and "\\n" not in str(e), repr(e)
        print(f"barrier raised after {time.monotonic() - t0:.1f}s: {e}", flush=True)
    c.set("p0-done", b"")
    # process 1 is now gone (SIGKILL) and never sends its part
    try:
        c.all_gather("after-kill", b"x", timeout_s=3)
        print("all_gather returned")
    except CoordinationError as e:
        print(f"all_gather raised: {e}", flush=True)
    os._exit(0)  # JAX's shutdown at exit would wait for the dead process
else:
    c.get("p0-done", timeout_s=30)
    print("process 1 killing itself", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_set_get_barrier_broadcast_all_gather_between_two_processes() -> None:
    results = jax_processes.run(EXCHANGES, timeout_s=90)
    everything = "\n".join(r.describe() for r in reversed(results))  # the first to fail: often 1
    for r in results:
        assert r.returncode == 0, everything
        assert r.stdout.count("ok ") == 5, everything


def test_a_process_that_never_comes_or_dies_raises_coordination_error_within_the_timeout() -> None:
    p0, p1 = jax_processes.run(ABSENT, timeout_s=90, heartbeat_s=60)
    assert p0.returncode == 0, p0.describe()
    assert p1.returncode == -9, p1.describe()
    barrier, gather = p0.stdout.splitlines()
    assert barrier.startswith("barrier raised after "), p0.describe()
    assert float(barrier.split()[3].rstrip("s:")) < 30, barrier  # the 3 s timeout, not jax's
    for line, exchange in ((barrier, "barrier 'never'"), (gather, "all_gather 'after-kill'")):
        assert exchange in line and "within 3 s" in line, line
        assert "process(es) [1] did not answer" in line, line


def test_a_single_process_gets_trivial_exchanges_without_importing_jax() -> None:
    code = (
        "import sys\n"
        "from stepsafe.distributed import coordinator, is_multiprocess, process_count, "
        "process_index, CoordinationError\n"
        "c = coordinator()\n"
        "assert (process_index(), process_count(), is_multiprocess()) == (0, 1, False)\n"
        "c.barrier('b', timeout_s=1); c.barrier('b', timeout_s=1)\n"
        "assert c.broadcast('x', b'mine', timeout_s=1) == b'mine'\n"
        "assert c.all_gather('y', b'me', timeout_s=1) == [b'me']\n"
        "assert c.gather('z', b'me', timeout_s=1) == [b'me']\n"
        "c.set('k', b'v'); assert c.get('k', timeout_s=1) == b'v'\n"
        "assert [k for k, _ in c.store.dir_get('stepsafe/')] == ['stepsafe/kv/k']\n"
        "try:\n"
        "    c.get('missing', timeout_s=0.2); raise SystemExit('no error')\n"
        "except CoordinationError as e:\n"
        "    assert \"get 'missing'\" in str(e) and 'within 0.2 s' in str(e), e\n"
        "assert coordinator() is c\n"
        "assert 'jax' not in sys.modules, 'jax was imported'\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout == "ok\n", done.stderr[-3000:]


def test_jax_not_initialised_in_this_process_means_one_local_process() -> None:
    assert not jax.distributed.is_initialized()
    assert (process_index(), process_count()) == (0, 1)
    c = coordinator()
    assert c.broadcast("local", b"v", timeout_s=1) == b"v"
    with pytest.raises(StepsafeError):
        c.set("dup", b"1")
        c.set("dup", b"2")
    c.delete("dup")
    assert issubclass(CoordinationError, StepsafeError)


def test_the_private_jax_client_methods_stepsafe_relies_on_still_exist() -> None:
    """A JAX upgrade that renames the coordinator client's methods must fail here, loudly."""
    from jax._src import distributed as private
    from jaxlib import _jax

    from stepsafe.distributed.client import CLIENT_METHODS

    assert hasattr(private, "global_state") and hasattr(private.global_state, "client")
    missing = [m for m in CLIENT_METHODS if not hasattr(_jax.DistributedRuntimeClient, m)]
    assert missing == [], f"jaxlib._jax.DistributedRuntimeClient lacks {missing}"
    stores = (SRC / "distributed" / "stores.py").read_text()
    assert all(f'"{m}"' in stores for m in CLIENT_METHODS)
    touching = sorted(
        str(p.relative_to(SRC)) for p in SRC.rglob("*.py") if "jax._src" in p.read_text()
    )
    assert touching == ["distributed/client.py"], touching
