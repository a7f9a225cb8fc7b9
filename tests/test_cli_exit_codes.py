"""What the ``stepsafe`` command tells its caller: exit codes a scheduler or script can act on,
one-line errors for what the operating system refused, log lines that do not run into the
progress bar, and names that are never cut to fit a terminal.

The trainer runs as a real ``.venv/bin/stepsafe train`` subprocess with a tiny model; signals,
a file-size limit and a pseudo-terminal are real, as a user's would be.
"""

from __future__ import annotations

import errno
import fcntl
import os
import pty
import re
import resource
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import numpy as np
import pytest
from cli_runs import build_base, flip_byte, state_at

import stepsafe
from stepsafe.cli.common import ExitCode
from stepsafe.cli.main import main

STEPSAFE = str(Path(sys.executable).with_name("stepsafe"))
README = Path(__file__).resolve().parents[1] / "README.md"
TINY = [
    "steps=40", "checkpoint_period=10", "log_period=1", "warmup_steps=5", "emb_dim=32",
    "mlp_dim=64", "max_target_length=16", "per_device_batch_size=4",
    "max_num_checkpoints_to_keep=0",
]  # fmt: skip
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}


def train(tmp_path: Path, run: str, *extra: str, bar: bool = False, **popen) -> subprocess.Popen:
    cmd = [STEPSAFE, "train", *([] if bar else ["--no-progress"])]
    cmd += [f"base_output_directory={tmp_path}", f"run_name={run}", *TINY]
    popen.setdefault("stdout", subprocess.PIPE)
    popen.setdefault("stderr", subprocess.PIPE)
    return subprocess.Popen([*cmd, *extra], text=True, env=ENV, **popen)


def cli(capsys, *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# -- the trainer's exit status --------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_signal_stop_exits_128_plus_signal_after_the_step_committed(tmp_path, sig):
    p = train(tmp_path, "sig")
    seen = []
    for line in p.stderr:
        seen.append(line)
        m = re.search(r"INFO step (\d+) loss", line)
        if m and int(m.group(1)) >= 5:
            p.send_signal(sig)
            break
    out, err = p.communicate(timeout=300)
    log = "".join(seen) + err
    assert p.returncode == 128 + sig, log  # 143 / 130: never 0, which means "finished"
    stopped = int(re.search(rf"stopped by {sig.name} at step (\d+)", out).group(1))
    assert stepsafe.info(tmp_path / "sig").step == stopped  # committed before the exit
    assert int(stepsafe.restore(tmp_path / "sig")["step"]) == stopped
    assert "Traceback" not in log


def test_wall_clock_limit_exits_3_after_the_step_committed(tmp_path):
    p = train(tmp_path, "t", "steps=100000", "wall_clock_limit_seconds=1")
    out, err = p.communicate(timeout=300)
    assert p.returncode == ExitCode.TIME_LIMIT == 3, err
    stopped = int(re.search(r"stopped by wall-clock limit at step (\d+)", out).group(1))
    assert 0 < stopped < 100000 and stepsafe.info(tmp_path / "t").step == stopped


# -- one line for what the operating system refused ----------------------------------------


def _limit_file_size() -> None:  # in the child: writes past 20 kB fail with EFBIG
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))


def test_train_that_cannot_write_says_where_and_why_not_flags(tmp_path):
    p = train(tmp_path, "full", preexec_fn=_limit_file_size)
    _, err = p.communicate(timeout=300)
    assert p.returncode == ExitCode.OS_ERROR, err
    errors = [line for line in err.splitlines() if line.startswith("stepsafe: error:")]
    assert len(errors) == 1, err
    where = str(tmp_path / "full" / "checkpoints")
    assert re.search(rf" {re.escape(where)}\S*: {os.strerror(errno.EFBIG)}$", errors[0]), err
    (hint,) = [line for line in err.splitlines() if line.startswith("hint:")]
    assert "flags" not in hint and "key=value" not in hint and "limit" in hint
    assert "Traceback" not in err


def test_another_command_reports_an_os_error_in_one_line(tmp_path):
    loop = tmp_path / "loop"
    loop.symlink_to("loop")  # every lookup through it fails with ELOOP
    p = subprocess.run(
        [STEPSAFE, "verify", str(loop), "--no-progress"],
        capture_output=True, text=True, env=ENV, timeout=60,
    )  # fmt: skip
    assert p.returncode == ExitCode.OS_ERROR, p.stderr
    first, hint = p.stderr.splitlines()
    assert re.fullmatch(
        rf"stepsafe: error: \w[\w ]* {re.escape(str(loop))}\S*: {os.strerror(errno.ELOOP)}",
        first,
    ), first
    assert hint.startswith("hint: ") and "link" in hint
    assert p.stdout == ""


# -- every family of failure has its own code ----------------------------------------------


def test_error_families_exit_with_distinct_codes(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    base = build_base(tmp_path / "out")
    assert cli(capsys, "ls", tmp_path / "missing")[0] == ExitCode.NOT_FOUND
    assert cli(capsys, "inspect", base / "run1/checkpoints/15")[0] == ExitCode.DAMAGED
    assert cli(capsys, "gc", base / "run1/checkpoints/30", "--keep", "1")[0] == ExitCode.FAILED
    code, _, err = cli(capsys, "train", "no_such_flag=1")
    assert code == ExitCode.USAGE and "flags" in err  # the hint about flags is for this case
    assert cli(capsys, "ls")[0] == ExitCode.USAGE
    codes = [c.value for c in ExitCode]
    assert len(set(codes)) == len(codes)


def test_diff_exits_1_when_the_checkpoints_differ(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    a, b = state_at(3), state_at(3)
    b["params"]["embed"] = b["params"]["embed"] + np.float32(0.25)  # same tree, other values
    stepsafe.save(tmp_path / "a", a)
    stepsafe.save(tmp_path / "b", b)
    del b["opt_state"]
    stepsafe.save(tmp_path / "c", b)
    assert cli(capsys, "diff", tmp_path / "a", tmp_path / "a", "--values")[0] == ExitCode.OK
    assert cli(capsys, "diff", tmp_path / "a", tmp_path / "b")[0] == ExitCode.NO  # checksums
    values = cli(capsys, "diff", tmp_path / "a", tmp_path / "b", "--values")
    assert values[0] == ExitCode.NO == 1
    assert cli(capsys, "diff", tmp_path / "a", tmp_path / "c", "--json")[0] == ExitCode.NO
    missing = cli(capsys, "diff", tmp_path / "a", tmp_path / "nope")
    assert missing[0] == ExitCode.NOT_FOUND != ExitCode.NO  # an error is not a difference


def test_exit_codes_are_documented_in_help_and_readme(capsys):
    code, out, _ = cli(capsys, "--help")
    assert code == ExitCode.OK
    table = out.split("exit status:")[1]
    readme = README.read_text().split("## Command line")[1]
    for c in ExitCode:
        shown = "128+N" if c == ExitCode.STOPPED_BY_SIGNAL else str(c.value)
        assert re.search(rf"^{re.escape(shown)}\s", table, re.M), shown
        assert f"| {shown} |" in readme, shown


# -- what a terminal shows ---------------------------------------------------------------


def _read_pty(master: int, p: subprocess.Popen, timeout_s: float = 300) -> bytes:
    chunks, deadline = [], time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if select.select([master], [], [], 1.0)[0]:
            try:
                data = os.read(master, 1 << 16)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif p.poll() is not None:
            break
    else:
        p.kill()
    return b"".join(chunks)


def test_log_lines_print_above_the_progress_bar_on_a_terminal(tmp_path):
    master, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 200, 0, 0))
    p = train(tmp_path, "tty", bar=True, stdin=child, stdout=child, stderr=child)
    os.close(child)
    try:
        screen = _read_pty(master, p)
    finally:
        os.close(master)
    assert p.wait(timeout=60) == ExitCode.OK  # a finished run, and only that, exits 0
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.decode(errors="replace"))
    lines = [s for s in re.split(r"[\r\n]", text) if s.strip()]
    assert any(re.match(r"train .* 40/40", s) for s in lines), lines  # the bar was drawn
    logged = [s for s in lines if re.search(r"\b(INFO|WARNING|ERROR)\b", s)]
    assert any("Saved checkpoint at step 10" in s for s in logged), lines
    stamp = r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ |\[?\d\d:\d\d:\d\d\]?\s+)"  # either format
    starts = rf"\s*{stamp}?(INFO|WARNING|ERROR)"
    collided = [s for s in logged if not re.match(starts, s)]
    assert not collided, collided  # e.g. "loss 0.00122026-11-30 ... INFO Saved ..."


def test_verify_keeps_full_names_at_80_columns(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    key = "params/" + "/".join(f"block_{i}_with_a_rather_long_name" for i in range(3)) + "/kernel"
    tree: dict = {}
    node = tree
    for part in key.split("/")[:-1]:
        node = node.setdefault(part, {})
    node["kernel"] = np.ones((4, 4), np.float32)
    step = tmp_path / "a_run_directory_with_a_long_name" / "checkpoints" / "1"
    stepsafe.save(step, tree)
    path, offset = flip_byte(step, key)
    code, out, _ = cli(capsys, "verify", step)
    assert code == ExitCode.NO
    assert len(key) > 80 and len(str(path)) > 80 // 2
    row = next(line for line in out.splitlines() if line.strip().startswith("checksum"))
    assert row.split()[1:4] == [key, str(path), str(offset)], out
    assert "…" not in out
